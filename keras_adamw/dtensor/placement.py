"""`MeshPlacement`: the `keras_adamw.placement.Placement` of a DTensor mesh.

This is all the DTensor mode changes: slots become `DVariable`s laid out
like their model variable (or sharded further, see `slot_layout`), the step
counter and learning rate become replicated scalars on the mesh, and
gradients and hyperparameters are brought onto the mesh in the variable's
layout before the step. The update itself is `keras_adamw.step.apply_step`,
as everywhere.
"""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

from keras_adamw import _keras_compat
from keras_adamw import _tf_compat
from keras_adamw import adam_math
from keras_adamw import placement
from keras_adamw import validation

COMBINE_FLAG = "DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION"


def turn_off_all_reduce_combining():
    """Makes sure DTensor's all-reduce combining pass is off, or raises.

    That pass re-sorts a step's operations by data dependencies only, so a
    read of a variable can move before an earlier write to it (seen in TF
    2.21: the EMA read the pre-step weights). DTensor reads
    DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION once, when its device
    starts (the first DTensor operation of the process): unset, it is set
    to "0" here if the device has not started yet; a value other than "0",
    or a device started with the variable unset, raises a `ValueError`."""
    flag = os.environ.get(COMBINE_FLAG)
    if flag is None and not _tf_compat.dtensor_device_started():
        os.environ[COMBINE_FLAG] = "0"
        return
    if flag != "0":
        raise ValueError(
            f"{COMBINE_FLAG} must be '0' for keras_adamw's DTensor mode "
            "(that pass can reorder a variable's read before its write). "
            f"Received: {flag!r}"
            + (
                " after DTensor started. Create the MeshPlacement or "
                "optimizer before the first DTensor operation (copy_to_mesh, "
                "DVariable, ...), or set the variable to '0' before it."
                if flag is None
                else ". Unset it or set it to '0'."
            )
        )


class MeshPlacement:
    """Places an optimizer's state on a DTensor mesh.

    Args:
        mesh: A `tf.experimental.dtensor.Mesh`.
        state_sharding_axis: Optional mesh dimension name. Slots of variables
            that are replicated along it are sharded along it instead (ZeRO
            stage 1): per-device optimizer state shrinks by that dimension's
            size; the numbers are unchanged.

    Example:

    >>> mesh = dtensor.create_mesh([("batch", 2), ("model", 2)],
    ...                            device_type="CPU")
    >>> placement = MeshPlacement(mesh, state_sharding_axis="batch")
    """

    def __init__(self, mesh, state_sharding_axis=None):
        if isinstance(mesh, str):  # The form get_config writes.
            try:
                mesh = dtensor.Mesh.from_string(mesh)
            except ValueError:
                pass  # Reported below as not a mesh.
        if not isinstance(mesh, dtensor.Mesh):
            raise TypeError(
                "Argument `mesh` must be a tf.experimental.dtensor.Mesh (or "
                "the string form `Mesh.to_string()` gives). "
                f"Received: mesh={mesh!r}"
            )
        if (
            state_sharding_axis is not None
            and state_sharding_axis not in mesh.dim_names
        ):
            raise ValueError(
                "Argument `state_sharding_axis` must name a dimension of the "
                f"mesh {list(mesh.dim_names)}. Received: "
                f"state_sharding_axis={state_sharding_axis!r}"
            )
        turn_off_all_reduce_combining()
        self.mesh = mesh
        self.state_sharding_axis = state_sharding_axis

    def replicated(self, rank):
        return dtensor.Layout.replicated(self.mesh, rank)

    def to_mesh(self, value, layout, dtype=None):
        """`value` (array, tensor or DTensor) as a DTensor with `layout`.

        Eagerly, a regular tensor is first copied to the mesh; inside a
        `tf.function` running on the mesh every tensor is already a DTensor
        and only its layout is set.
        """
        if tf.executing_eagerly() and not (
            tf.is_tensor(value) and dtensor.is_dtensor(value)
        ):
            value = tf.convert_to_tensor(value, dtype=dtype)
            value = dtensor.copy_to_mesh(
                value, self.replicated(value.shape.rank)
            )
        value = tf.convert_to_tensor(value)
        if dtype is not None:
            value = tf.cast(value, dtype)
        if tf.executing_eagerly() and dtensor.fetch_layout(value) == layout:
            return value
        return dtensor.relayout(value, layout)

    def make_variable(self, value, layout, name, trainable=False):
        """A `DVariable` holding `value` with `layout`, made eagerly."""
        with tf.init_scope():
            return dtensor.DVariable(
                self.to_mesh(value, layout), trainable=trainable, name=name
            )

    def slot_layout(self, reference_layout, shape):
        """The layout of a slot of a variable with `reference_layout` and
        `shape`: the same, or (with `state_sharding_axis`) with the first
        unsharded dimension that the axis size divides sharded along that
        axis, when the variable is replicated along it."""
        axis = self.state_sharding_axis
        specs = list(reference_layout.sharding_specs)
        if axis is None or axis in specs:
            return reference_layout
        size = self.mesh.dim_size(axis)
        for dim, spec in enumerate(specs):
            if spec == dtensor.UNSHARDED and shape[dim] % size == 0:
                specs[dim] = axis
                return dtensor.Layout(specs, self.mesh)
        return reference_layout

    def adopt_scalars(self, variables):
        """Moves the step counter and learning rate the Keras base class made
        onto the mesh, as replicated scalar `DVariable`s, keeping them
        `keras.Variable`s (so Keras' code that uses them is unchanged)."""
        for variable in variables:
            _keras_compat.replace_backing_variable(
                variable,
                self.make_variable(
                    tf.convert_to_tensor(variable.value),
                    self.replicated(0),
                    name=variable.path,
                ),
            )

    def add_variable(
        self, optimizer, shape, initializer, dtype, aggregation, layout, name
    ):
        """A `keras.Variable` holding a `DVariable` (replicated unless
        `layout` says otherwise), tracked by `optimizer`."""
        del aggregation  # tf.distribute only.
        shape = tuple(shape)
        layout = layout or self.replicated(len(shape))
        dtype = dtype or keras.backend.floatx()
        value = keras.initializers.get(initializer)(shape, dtype=dtype)
        with keras.name_scope(optimizer.name, caller=optimizer):
            variable = keras.Variable(
                self.make_variable(value, layout, name=name),
                dtype=dtype,
                trainable=False,
                name=name,
            )
        _keras_compat.track_variable(optimizer, variable)
        return variable

    def make_scalar(self, value, dtype, name):
        """A replicated scalar `DVariable`, not tracked by the optimizer."""
        return self.make_variable(
            tf.constant(value, dtype), self.replicated(0), name=name
        )

    def add_slot(
        self, optimizer, reference, shape, initializer, name, dtype=None
    ):
        """A slot laid out like its model variable (see `slot_layout`); a slot
        of another `shape` is replicated."""
        self.check_variable(reference)
        if shape is None:
            shape = tuple(reference.shape)
            layout = self.slot_layout(
                validation.tf_variable(reference).layout, shape
            )
        else:
            layout = self.replicated(len(shape))
        return self.add_variable(
            optimizer,
            shape,
            initializer,
            dtype or reference.dtype,
            "none",
            layout,
            placement.slot_name(reference, name),
        )

    def check_variable(self, variable):
        """Raises unless `variable` is (a `keras.Variable` holding) a
        `DVariable` on this mesh."""
        describe = validation.variable_name
        backing = validation.tf_variable(variable)
        if not isinstance(backing, dtensor.DVariable):
            raise ValueError(
                f"Variable {describe(variable)!r} is a "
                f"{type(backing).__name__}, not a DVariable: an optimizer on "
                "a DTensor mesh updates only DVariables on that mesh "
                "(DTensor and regular variables never meet in one update)."
            )
        mesh = backing.layout.mesh
        if mesh != self.mesh:
            raise ValueError(
                f"Variable {describe(variable)!r} lives on mesh {mesh}, not "
                f"on the optimizer's mesh {self.mesh}."
            )

    def place_gradient(self, gradient, variable, keep_rows=False):
        """The dense gradient in `variable`'s compute dtype, on the mesh with
        `variable`'s layout.

        `tf.IndexedSlices` are summed (in the compute dtype) into a dense
        gradient first: DTensor's sparse scatter ops do not propagate layouts
        of sharded variables. So `sparse_updates="lazy"` (`keep_rows`) falls
        back to the dense update here, with one warning per placement.
        """
        if keep_rows and isinstance(gradient, tf.IndexedSlices):
            self._warn_dense_fallback()
        variable = validation.tf_variable(variable)
        layout = variable.layout
        dtype = adam_math.compute_dtype(variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            values = self.to_mesh(
                gradient.values,
                self.replicated(gradient.values.shape.rank),
                dtype=dtype,
            )
            indices = self.to_mesh(gradient.indices, self.replicated(1))
            gradient = tf.math.unsorted_segment_sum(
                values, indices, variable.shape[0]
            )
        return self.to_mesh(gradient, layout, dtype=dtype)

    def _warn_dense_fallback(self):
        if not getattr(self, "_warned_dense_fallback", False):
            self._warned_dense_fallback = True
            warnings.warn(
                'sparse_updates="lazy" falls back to the dense update on a '
                "DTensor mesh: scatter on sharded DVariables does not keep "
                "layouts. Sparse gradients are densified (exact, not lazy).",
                stacklevel=4,
            )

    def place_scalars(self, scalars):
        """Hyperparameter tensors as replicated scalars on the mesh."""
        return {
            name: self.to_mesh(value, self.replicated(0))
            for name, value in scalars.items()
        }

    def numpy(self, variable):
        """The global value of a (possibly sharded) variable as an array."""
        value = tf.convert_to_tensor(validation.tf_variable(variable))
        replicated = dtensor.relayout(value, self.replicated(value.shape.rank))
        return dtensor.unpack(replicated)[0].numpy()

    def assign(self, variable, value):
        """Assigns an array (or tensor) to a variable, keeping its layout."""
        variable = validation.tf_variable(variable)
        variable.assign(
            self.to_mesh(value, variable.layout, dtype=variable.dtype)
        )

    def get_config(self):
        """The mesh in its string form (`dtensor.Mesh.from_string` reads
        it), so an optimizer's config is JSON and recreates the mesh."""
        return {"mesh": self.mesh.to_string()}

    def layout_of(self, variable):
        """The variable's sharding specs, e.g. `"[unsharded, model]"`."""
        layout = getattr(validation.tf_variable(variable), "layout", None)
        if layout is None:
            return None
        return "[" + ", ".join(layout.sharding_specs) + "]"


def state_bytes_per_device(optimizer):
    """Bytes of optimizer state held by each device, from the shapes of the
    per-device pieces (`dtensor.unpack`) of every optimizer variable.

    Returns:
        A list with one byte count per device of the mesh.

    Example:

    >>> optimizer = keras_adamw.dtensor.Adam(mesh)
    >>> optimizer.build([dtensor.DVariable(dtensor.call_with_layout(
    ...     tf.zeros, dtensor.Layout(["model"], mesh), shape=[8]))])
    >>> state_bytes_per_device(optimizer)  # 8 + 4: counter, rate; 2*16: slots
    [44, 44, 44, 44]
    """
    per_device = None
    for variable in optimizer.variables:
        pieces = dtensor.unpack(tf.convert_to_tensor(variable))
        sizes = [int(np.prod(p.shape)) * p.dtype.size for p in pieces]
        per_device = (
            sizes
            if per_device is None
            else [a + b for a, b in zip(per_device, sizes)]
        )
    return per_device or []
