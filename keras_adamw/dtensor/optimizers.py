"""`keras_adamw.dtensor.Adam` and `AdamW`: the core optimizers on a mesh."""

import keras

from keras_adamw import optimizers
from keras_adamw.dtensor.placement import MeshPlacement


class _OnMesh:
    """Puts a core optimizer on a mesh right after it is constructed."""

    def __init__(self, mesh, state_sharding_axis=None, **kwargs):
        super().__init__(
            mesh=MeshPlacement(mesh, state_sharding_axis), **kwargs
        )

    def get_config(self):
        """The core optimizer's config plus `mesh` (its string form) and
        `state_sharding_axis`: JSON, and `from_config` needs nothing more.

        Example:

        >>> config = keras_adamw.dtensor.AdamW(mesh).get_config()
        >>> keras_adamw.dtensor.AdamW.from_config(config).mesh == mesh
        True
        """
        config = super().get_config()
        config["state_sharding_axis"] = self._placement.state_sharding_axis
        return config


@keras.saving.register_keras_serializable(package="keras_adamw.dtensor")
class Adam(_OnMesh, optimizers.Adam):
    """`keras_adamw.Adam` on a DTensor mesh.

    Every slot (momentum, velocity, velocity_hat, EMA average, gradient
    accumulator) is a `DVariable` with its model variable's layout; the step
    counter and learning rate are replicated scalar `DVariable`s. The model
    variables must be `DVariable`s on `mesh`.

    Args:
        mesh: A `tf.experimental.dtensor.Mesh`.
        state_sharding_axis: Optional mesh dimension along which to shard
            the slots of variables that are replicated along it (ZeRO stage
            1). Per-device optimizer state shrinks by that dimension's size;
            the numbers do not change.
        **kwargs: The arguments of `keras_adamw.Adam`.

    Example:

    >>> optimizer = keras_adamw.dtensor.Adam(mesh, learning_rate=1e-3,
    ...                                      state_sharding_axis="batch")
    """


@keras.saving.register_keras_serializable(package="keras_adamw.dtensor")
class AdamW(_OnMesh, optimizers.AdamW):
    """`keras_adamw.AdamW` on a DTensor mesh; see `keras_adamw.dtensor.Adam`.

    Args:
        mesh: A `tf.experimental.dtensor.Mesh`.
        state_sharding_axis: See `keras_adamw.dtensor.Adam`.
        **kwargs: The arguments of `keras_adamw.AdamW`.

    Example:

    >>> optimizer = keras_adamw.dtensor.AdamW(mesh, weight_decay=0.01)
    """
