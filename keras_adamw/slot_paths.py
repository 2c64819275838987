"""Which model variable each optimizer variable belongs to, saved beside
the state, so that a restore gives every slot to its own variable.

Keras' formats match an optimizer's variables by position: restored into an
optimizer built on the same variables in another order, the slots of
same-shaped variables change places without a word (Keras too; through
`tf.train.Checkpoint` the model variables the optimizer tracks change
places as well). keras_adamw saves one entry per optimizer variable
(`"iterations"`, `"learning_rate"` or `"{variable path}|{slot}"`) where
Keras' loaders ignore it, so files and checkpoints still move both ways
between keras_adamw and `keras.optimizers.Adam`/`AdamW`:

- `.keras` files: an asset file (`save_assets`/`load_assets`; Keras'
  `load_model` calls `load_assets` after `load_own_variables`), so the
  weights store keeps exactly Keras' entries (Keras' `load_own_variables`
  skips a store with any other count);
- `tf.train.Checkpoint`: two string attributes of the optimizer's own
  node, its entries and its variables' shapes. TensorFlow restores them
  before the optimizer's variables (its children), so a refusal there
  writes none of the optimizer's variables, nor the model's variables
  below it in the checkpoint's graph.

On restore: the same entries in another order are put in place (a
`.keras` file; a checkpoint restored before `build`, which then builds in
the saved order); a checkpoint restored into an optimizer built in another
order, or with other shapes, is refused before any write; other slots
(`amsgrad`, `use_ema` or `gradient_accumulation_steps` differ) raise, also
at `build` after a deferred restore (nothing built then). Paths are
compared without the parts they all share (a model loaded from a `.keras`
file has no model name in them); paths that differ only by Keras'
numbering (`dense_1` for `dense` in a re-created model) match by position,
other paths warn and match by position. Not covered: weights-only files
(`save_weights`; Keras gives them no assets and no room in the store) and
files or checkpoints written by Keras, which load by position as in Keras.
"""

import json
import os
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_adamw import _keras_compat

CHECKPOINT_KEY = "keras_adamw_variable_slots"
CHECKPOINT_SHAPES_KEY = "keras_adamw_variable_shapes"
ASSET_FILE = "keras_adamw_variable_slots.json"


class _Hidden:
    """Holds a value out of sight of TensorFlow's object tracking."""

    def __init__(self, value):
        self.value = value


def variable_path(variable):
    """A model variable's path (Keras' `path`, else the `tf.Variable`'s
    name)."""
    return getattr(variable, "path", None) or variable.name


def describe(optimizer):
    """One entry per optimizer variable, in the order of `variables`.

    Example:

    >>> opt = keras_adamw.Adam()
    >>> opt.build([keras.Variable([1.0], name="w")])
    >>> describe(opt)
    ['iterations', 'learning_rate', 'w|momentum', 'w|velocity']
    """
    owners = {id(_keras_compat.iterations_variable(optimizer)): "iterations"}
    rate = _keras_compat.learning_rate_value(optimizer)
    if isinstance(rate, keras.Variable):
        owners[id(rate)] = "learning_rate"
    if optimizer.built:
        paths = [
            variable_path(v) for v in _keras_compat.built_variables(optimizer)
        ]
        slot_lists = {
            "momentum": optimizer._momentums,
            "velocity": optimizer._velocities,
            "velocity_hat": optimizer._velocity_hats,
        }
        if optimizer.use_ema:
            slot_lists["average"] = _keras_compat.moving_averages(optimizer)
        if optimizer.gradient_accumulation_steps:
            slot_lists["gradient_accumulator"] = (
                _keras_compat.gradient_accumulators(optimizer)
            )
        for slot, slot_list in slot_lists.items():
            for path, variable in zip(paths, slot_list or ()):
                owners[id(variable)] = f"{path}|{slot}"
    return [owners.get(id(v), v.name) for v in optimizer.variables]


def relative(entries):
    """`entries` with the leading path parts that all their paths share
    taken off: a model loaded from a `.keras` file has paths without the
    model's name (`d1/kernel` for `m/d1/kernel`).

    Example:

    >>> relative(["iterations", "m/d1/kernel|momentum", "m/d2/bias|momentum"])
    ['iterations', 'd1/kernel|momentum', 'd2/bias|momentum']
    """
    paths = [e.rpartition("|")[0].split("/") for e in entries if "|" in e]
    shared = 0
    if paths:
        shortest = min(len(p) for p in paths)
        while shared < shortest - 1 and len({p[shared] for p in paths}) == 1:
            shared += 1
    result = []
    for entry in entries:
        path, bar, slot = entry.rpartition("|")
        if bar:
            entry = "/".join(path.split("/")[shared:]) + bar + slot
        result.append(entry)
    return result


def _numbering_removed(entry):
    return "/".join(re.sub(r"_\d+$", "", part) for part in entry.split("/"))


def _slot(entry):
    return entry.rpartition("|")[2]


def saved_order(saved, current, name):
    """For each of `current` entries, the index of its entry in `saved`.

    Raises:
        ValueError: If the slots differ (not only the paths).

    Example:

    >>> saved_order(["a|m", "b|m"], ["b|m", "a|m"], "adam")
    [1, 0]
    """
    identity = list(range(len(current)))
    saved, current = relative(saved), relative(current)
    if saved == current:
        return identity
    if len(set(current)) == len(current) and sorted(saved) == sorted(current):
        where = {entry: i for i, entry in enumerate(saved)}
        return [where[entry] for entry in current]
    if [_slot(e) for e in saved] != [_slot(e) for e in current]:
        raise ValueError(
            f"Optimizer {name!r} has other slots than the saved state: "
            f"saved {_differences(saved, current)}, this optimizer "
            f"{_differences(current, saved)} ({len(saved)} saved entries, "
            f"{len(current)} here). Is `amsgrad`, `use_ema` or "
            "`gradient_accumulation_steps` set differently?"
        )
    if list(map(_numbering_removed, saved)) != list(
        map(_numbering_removed, current)
    ):
        warnings.warn(
            f"Optimizer {name!r}: the saved slots belong to variables with "
            f"other paths ({_differences(saved, current)} saved, "
            f"{_differences(current, saved)} here); they are restored by "
            "position.",
            stacklevel=3,
        )
    return identity


def _differences(entries, others):
    extra = [e for e in entries if e not in set(others)]
    return f"{extra[:4]}{' ...' if len(extra) > 4 else ''}"


def _shape_text(shape):
    return ",".join(str(d) for d in shape)


def _shape_tuple(text):
    return tuple(int(d) for d in text.split(",") if d)


def _saved_variables(entries, shapes):
    """{relative path: shape text} of the model variables in `entries`, in
    their saved order."""
    result = {}
    for entry, shape in zip(relative(entries), shapes):
        path = entry.rpartition("|")[0]
        if path:
            result.setdefault(path, shape)
    return result


def prepare_build(optimizer, var_list):
    """Before `build`, after a checkpoint was restored into the unbuilt
    optimizer: `var_list` in the saved order, so that the slots `build`
    makes (restored then, by position) are their own variables'.

    Raises:
        ValueError: If the saved slots or shapes differ from what `build`
            would make. Nothing is built then.
    """
    pending = getattr(optimizer, "_restored_slot_entries", None)
    if pending is None or pending.value is None:
        return var_list
    entries, shapes = pending.value
    kinds = {"momentum", "velocity"}
    kinds |= {"velocity_hat"} if optimizer.amsgrad else set()
    kinds |= {"average"} if optimizer.use_ema else set()
    if optimizer.gradient_accumulation_steps:
        kinds.add("gradient_accumulator")
    saved_kinds = {_slot(e) for e in entries if "|" in e}
    if saved_kinds != kinds:
        raise ValueError(
            f"Optimizer {optimizer.name!r} would make slots "
            f"{sorted(kinds)}, but the checkpoint restored into it holds "
            f"{sorted(saved_kinds)}. Is `amsgrad`, `use_ema` or "
            "`gradient_accumulation_steps` set differently?"
        )
    saved = _saved_variables(entries, shapes)
    current = relative([f"{variable_path(v)}|" for v in var_list])
    by_path = {entry[:-1]: v for entry, v in zip(current, var_list)}
    if len(by_path) == len(var_list) and sorted(by_path) == sorted(saved):
        var_list = [by_path[path] for path in saved]
    if len(saved) != len(var_list):
        raise ValueError(
            f"The checkpoint restored into optimizer {optimizer.name!r} holds "
            f"slots for {len(saved)} variables; it is being built on "
            f"{len(var_list)}."
        )
    for (path, shape), variable in zip(saved.items(), var_list):
        if _shape_text(variable.shape) != shape:
            raise ValueError(
                f"The checkpoint restored into optimizer {optimizer.name!r} "
                f"holds slots of shape {_shape_tuple(shape)} for {path!r}; "
                "variable "
                f"{variable_path(variable)!r} has shape "
                f"{tuple(variable.shape)}."
            )
    return var_list


def check_restored_before_build(optimizer):
    """After `build`: the slots a checkpoint restored by position while
    building were the saved state's, slot for slot."""
    pending = getattr(optimizer, "_restored_slot_entries", None)
    if pending is None or pending.value is None:
        return
    (saved, _), pending.value = pending.value, None
    saved_order(saved, describe(optimizer), optimizer.name)


class SlotPaths:
    """The optimizer's save and restore hooks for the entries."""

    def save_assets(self, dir_path):
        """Writes the entries beside a `.keras` file's weights.

        Example:

        >>> import tempfile
        >>> opt, folder = keras_adamw.Adam(), tempfile.mkdtemp()
        >>> opt.save_assets(folder)
        >>> sorted(os.listdir(folder))
        ['keras_adamw_variable_slots.json']
        """
        with open(os.path.join(dir_path, ASSET_FILE), "w") as file:
            json.dump(describe(self), file)

    def load_assets(self, dir_path):
        """Puts each slot `load_own_variables` loaded by position back on
        its own variable, by the entries `save_assets` wrote.

        Raises:
            ValueError: If the saved slots differ from this optimizer's.
        """
        loaded = getattr(self, "_loaded_by_position", False)
        self._loaded_by_position = False
        path = dir_path and os.path.join(dir_path, ASSET_FILE)
        if not loaded or not path or not os.path.exists(path):
            return
        with open(path) as file:
            saved = json.load(file)
        try:
            order = saved_order(saved, describe(self), self.name)
        except ValueError as error:
            raise ValueError(
                f"{error} `load_own_variables` has loaded the file's values "
                "by position: build an optimizer with the saved "
                "configuration and load again."
            ) from None
        if order == sorted(order):
            return
        values = [self._placement.numpy(v) for v in self.variables]
        for variable, i in zip(self.variables, order):
            self._placement.assign(variable, values[i])

    def _serialize_to_tensors(self):
        """Two `tf.train.Checkpoint` attributes of the optimizer: its
        entries and the shapes of its variables."""
        entries = describe(self)
        shapes = [_shape_text(v.shape) for v in self.variables]
        return {
            CHECKPOINT_KEY: _strings(entries),
            CHECKPOINT_SHAPES_KEY: _strings(shapes),
        }

    def _restore_from_tensors(self, restored_tensors):
        """Checks the saved entries and shapes against the optimizer's.
        TensorFlow restores the optimizer's own attributes before its
        variables (its children), so raising here writes none of them."""
        tensors = [
            restored_tensors[key]
            for key in (CHECKPOINT_KEY, CHECKPOINT_SHAPES_KEY)
        ]
        if any(tf.is_symbolic_tensor(t) for t in tensors):
            # Traced (a SavedModel's restore function): nothing to read.
            return tf.no_op()
        saved, shapes = (
            [s.decode() for s in np.array(t).ravel()] for t in tensors
        )
        if not self.built:
            self._restored_slot_entries = _Hidden((saved, shapes))
            return tf.no_op()
        order = saved_order(saved, describe(self), self.name)
        if order != sorted(order):
            raise ValueError(
                f"Optimizer {self.name!r} was built on its variables in "
                "another order than the checkpoint's optimizer: "
                "`tf.train.Checkpoint` matches by position and would give "
                "each slot (and each model variable it restores through the "
                "optimizer) to another variable. Restore before the "
                "optimizer is built (keras_adamw then builds in the saved "
                "order) or build it on the variables in the saved order: "
                f"{[e.rpartition('|')[0] for e in saved if '|' in e][:8]}."
            )
        for variable, i in zip(self.variables, order):
            if _shape_text(variable.shape) != shapes[i]:
                raise ValueError(
                    f"Optimizer variable {variable.name!r} has shape "
                    f"{tuple(variable.shape)} but the checkpoint's has "
                    f"{_shape_tuple(shapes[i])}. Nothing was restored into "
                    "the optimizer."
                )
        return tf.no_op()


def _strings(texts):
    return tf.constant(np.array(texts, dtype=object), tf.string, [len(texts)])
