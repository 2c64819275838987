"""Moving the optimizer's state in and out: `set_weights`,
`save_own_variables` (what `.keras` files store) and `load_own_variables`.

A mixin of `keras_adamw.Adam`; values go through the optimizer's placement,
so a sharded `DVariable` is gathered when saved and keeps its layout when
loaded. Every entry is checked before any is written.
"""

import warnings

import numpy as np
import tensorflow as tf

from keras_adamw import _keras_compat
from keras_adamw import validation


class StateIO:
    """`set_weights`, `save_own_variables`, `load_own_variables`."""

    def set_weights(self, weights):
        """Sets the optimizer's variables from a list of arrays.

        Overrides Keras to check every array before assigning any.

        Args:
            weights: Arrays in the order of `optimizer.variables`.

        Raises:
            ValueError: If unbuilt, or the count, a shape or a kind of dtype
                differs, or a scalar (step counter, learning rate) is not
                finite. Nothing is assigned then.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> opt.build([keras.Variable([1.0])])
        >>> opt.set_weights([v.numpy() for v in opt.variables])
        """
        if not self.built:
            raise ValueError(
                f"Optimizer {self.name!r} is not built; call "
                "`optimizer.build(variables)` before `set_weights()`."
            )
        weights = list(weights)
        if len(weights) != len(self.variables):
            raise ValueError(
                f"Optimizer {self.name!r} has {len(self.variables)} variables "
                f"but `set_weights` received {len(weights)} arrays."
            )
        check_entries(self.variables, weights, "the array")
        for variable, weight in zip(self.variables, weights):
            self._placement.assign(variable, weight)

    def save_own_variables(self, store):
        """Writes the optimizer's variables to `store` (a dict-like) as
        arrays, keyed `"0"`, `"1"`, ... in the order of `variables`.

        Overrides Keras to gather sharded `DVariable`s first.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> store = {}
        >>> opt.save_own_variables(store)
        >>> sorted(store)
        ['0', '1']
        """
        for i, variable in enumerate(self.variables):
            store[str(i)] = self._placement.numpy(variable)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` wrote. A count mismatch warns and
        loads nothing, as in Keras (an unbuilt optimizer has only two
        variables); every entry is checked (see `check_entries`) before any
        is assigned.

        Overrides Keras to keep each variable's layout on a mesh.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> opt.load_own_variables({"0": 0, "1": 0.5})
        >>> float(opt.learning_rate)
        0.5
        """
        if len(store.keys()) != len(self.variables):
            warnings.warn(
                f"Skipping variable loading for optimizer {self.name!r}: it "
                f"has {len(self.variables)} variables but the store has "
                f"{len(store.keys())}.{_count_hint(self, len(store.keys()))}",
                stacklevel=2,
            )
            return
        values = [store[str(i)] for i in range(len(self.variables))]
        check_entries(self.variables, values, "the saved value")
        for variable, value in zip(self.variables, values):
            self._placement.assign(variable, value)
        # `load_assets` (`slot_paths`) then puts each slot on its variable.
        self._loaded_by_position = True


def check_entries(variables, values, what):
    """Checks values about to be assigned to the optimizer's `variables`,
    all before any is assigned: the same shape, a floating value for a
    floating variable and an integer one for the step counter, and finite
    scalars.

    Raises:
        ValueError: Naming the variable and what is wrong.

    Example:

    >>> check_entries([tf.Variable(0.1, name="learning_rate")],
    ...               [np.float32("nan")], "the array")
    Traceback (most recent call last):
    ...
    ValueError: Optimizer variable 'learning_rate:0' would get a non-finite
    value (nan) from the array.
    """
    for variable, value in zip(variables, values):
        value = np.asarray(value)
        name = validation.variable_name(variable)
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"Optimizer variable {name!r} has shape "
                f"{tuple(variable.shape)} but {what} for it has shape "
                f"{value.shape}."
            )
        # Numbers only; no fraction for the integer step counter ("V" is
        # ml_dtypes' bfloat16).
        accepted = "fiuV" if tf.as_dtype(variable.dtype).is_floating else "iu"
        if value.dtype.kind not in accepted:
            raise ValueError(
                f"Optimizer variable {name!r} has dtype {variable.dtype} but "
                f"{what} for it has dtype {value.dtype}."
            )
        if (
            value.ndim == 0
            and value.dtype.kind == "f"
            and not np.isfinite(value.astype(np.float64))
        ):
            raise ValueError(
                f"Optimizer variable {name!r} would get a non-finite value "
                f"({value}) from {what}."
            )


def _count_hint(optimizer, saved_count):
    """What a count mismatch of a built optimizer likely means."""
    if not optimizer.built:
        return " It is not built yet; build it before loading."
    # The step counter, and the learning rate unless it is a schedule.
    rate = _keras_compat.learning_rate_value(optimizer)
    scalars = 1 + any(v is rate for v in optimizer.variables)
    per_variable = len(_keras_compat.built_variables(optimizer))
    slots = (len(optimizer.variables) - scalars) / max(per_variable, 1)
    saved = (saved_count - scalars) / max(per_variable, 1)
    return (
        f" The store holds {saved:g} slots per model variable, this "
        f"optimizer {slots:g}: is `amsgrad`, `use_ema` or "
        "`gradient_accumulation_steps` set differently, or was it built on "
        "other variables? Nothing was loaded."
    )
