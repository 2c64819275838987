"""Where an optimizer's variables live: the one interface, and its local
implementation.

A `Placement` makes the optimizer's variables (slots and scalars), checks
that a model variable can be updated there, brings gradients and
hyperparameters to where the variables live, and moves values between the
variables and the host. The optimizer calls these methods and never asks
where it runs:

- `LocalPlacement` (here): plain `tf.Variable`s, also mirrored or
  distributed by a `tf.distribute` strategy. Keras' own variable creation.
- `keras_adamw.dtensor.MeshPlacement`: `DVariable`s on a DTensor mesh,
  laid out like their model variables.

`placement_for(mesh)` picks one. The core never imports the DTensor
subpackage: `keras_adamw.dtensor` registers its placement here when it is
imported (which `import keras_adamw` does).
"""

import typing

import keras
import numpy as np
import tensorflow as tf

from keras_adamw import _keras_compat
from keras_adamw import adam_math
from keras_adamw import lazy_sparse
from keras_adamw import validation


class Placement(typing.Protocol):
    """What an optimizer needs from the place its variables live."""

    mesh: typing.Any  # The DTensor mesh, or None.

    def adopt_scalars(self, variables):
        """Moves scalar optimizer variables the Keras base class made (step
        counter, learning rate) to this placement."""

    def add_variable(
        self, optimizer, shape, initializer, dtype, aggregation, layout, name
    ):
        """Makes (and tracks on `optimizer`) one optimizer variable."""

    def add_slot(
        self, optimizer, reference, shape, initializer, name, dtype=None
    ):
        """Makes the slot `name` of model variable `reference` (its own shape
        when `shape` is None, its own dtype when `dtype` is None)."""

    def make_scalar(self, value, dtype, name):
        """Makes a scalar variable the optimizer keeps for itself (not one
        of `optimizer.variables`, not checkpointed)."""

    def check_variable(self, variable):
        """Raises if model variable `variable` cannot be updated here."""

    def place_gradient(self, gradient, variable, keep_rows=False):
        """The dense gradient in `variable`'s compute dtype (duplicate
        sparse indices summed in that dtype), where `variable` lives; with
        `keep_rows` (`sparse_updates="lazy"`), where the placement can
        scatter, a `tf.IndexedSlices` stays one with unique indices."""

    def place_scalars(self, scalars):
        """A dict of hyperparameter tensors, where the variables live."""

    def numpy(self, variable):
        """The whole value of an optimizer variable as a NumPy array."""

    def assign(self, variable, value):
        """Assigns a host value to an optimizer variable."""

    def get_config(self):
        """Constructor arguments that recreate this placement."""

    def layout_of(self, variable):
        """How model variable `variable` is laid out, in words (`None`
        where there is no layout to tell)."""


class LocalPlacement:
    """Variables on this process' devices, as Keras makes them.

    Under a `tf.distribute` strategy Keras creates mirrored variables
    colocated with their model variable; nothing here needs to know.

    Example:

    >>> placement = LocalPlacement()
    >>> placement.place_gradient(tf.IndexedSlices(
    ...     tf.ones([2, 1]), tf.constant([0, 0]), tf.constant([2, 1])),
    ...     tf.Variable([[0.0], [0.0]])).numpy().tolist()
    [[2.0], [0.0]]
    """

    mesh = None

    def adopt_scalars(self, variables):
        del variables  # Keras made them where they belong.

    def add_variable(
        self, optimizer, shape, initializer, dtype, aggregation, layout, name
    ):
        return _keras_compat.base_add_variable(
            optimizer, shape, initializer, dtype, aggregation, layout, name
        )

    def add_slot(
        self, optimizer, reference, shape, initializer, name, dtype=None
    ):
        if shape is None and dtype is None:
            return keras_add_variable_from_reference(
                optimizer, reference, name, initializer
            )
        # Colocated with its variable, as Keras' own slots.
        strategy = tf.distribute.get_strategy()
        with strategy.extended.colocate_vars_with(
            validation.tf_variable(reference)
        ):
            return optimizer.add_variable(
                shape=tuple(reference.shape) if shape is None else shape,
                initializer=initializer,
                dtype=dtype or reference.dtype,
                name=slot_name(reference, name),
            )

    def make_scalar(self, value, dtype, name):
        with tf.init_scope():
            return tf.Variable(value, dtype=dtype, trainable=False, name=name)

    def check_variable(self, variable):
        del variable  # Any floating variable (checked by validation).

    # Per variable on a step's first call: not for autograph (see
    # execution.not_converted).
    @tf.autograph.experimental.do_not_convert
    def place_gradient(self, gradient, variable, keep_rows=False):
        dtype = adam_math.compute_dtype(variable.dtype)
        if keep_rows and lazy_sparse.is_sparse(gradient):
            return lazy_sparse.unique_rows(gradient, dtype)
        return adam_math.densify(gradient, dtype)

    def place_scalars(self, scalars):
        return scalars

    def numpy(self, variable):
        return np.asarray(variable.numpy())

    def assign(self, variable, value):
        variable.assign(value)

    def get_config(self):
        return {}

    def layout_of(self, variable):
        return None


def keras_add_variable_from_reference(optimizer, reference, name, initializer):
    """Keras' own `add_variable_from_reference` (which colocates the slot
    with its variable under a `tf.distribute` strategy)."""
    return keras.optimizers.Optimizer.add_variable_from_reference(
        optimizer, reference, name=name, initializer=initializer
    )


def slot_name(reference, name):
    """Keras' name for slot `name` of `reference`: `{path}_{name}`, with
    `/` and `:` replaced by `_`.

    Example:

    >>> slot_name(tf.Variable(1.0, name="w"), "momentum")
    'w_0_momentum'
    """
    prefix = validation.variable_name(reference)
    prefix = prefix.replace("/", "_").replace(":", "_")
    return f"{prefix}_{name or 'var'}"


_mesh_placement_factory = None


def register_mesh_placement(factory):
    """Called by `keras_adamw.dtensor` on import: `factory(mesh)` makes a
    placement for a DTensor mesh (or a mesh's string form)."""
    global _mesh_placement_factory
    _mesh_placement_factory = factory


def placement_for(mesh):
    """The placement for an optimizer's `mesh` argument: local for `None`,
    a given `Placement` as it is, else a mesh placement.

    Example:

    >>> type(placement_for(None)).__name__
    'LocalPlacement'
    """
    if mesh is None:
        return LocalPlacement()
    if hasattr(mesh, "place_gradient"):
        return mesh
    if _mesh_placement_factory is None:
        raise ValueError(
            "Argument `mesh` needs keras_adamw's DTensor support: "
            "`import keras_adamw.dtensor` first. Received: mesh={mesh!r}"
        )
    return _mesh_placement_factory(mesh)


__all__ = [
    "Placement",
    "LocalPlacement",
    "placement_for",
    "register_mesh_placement",
    "slot_name",
]
