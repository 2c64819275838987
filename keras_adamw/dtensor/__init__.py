"""keras_adamw.dtensor: Adam and AdamW for `tf.experimental.dtensor` meshes.

Only how variables are made and placed differs from the core optimizers
(`keras_adamw.dtensor.placement`); the update is the core's.

Example:

>>> from tensorflow.experimental import dtensor
>>> mesh = dtensor.create_mesh([("batch", 2), ("model", 2)],
...                            device_type="CPU")
>>> optimizer = keras_adamw.dtensor.AdamW(mesh, learning_rate=1e-3)
"""

from keras_adamw import placement as _placement
from keras_adamw.dtensor.optimizers import Adam
from keras_adamw.dtensor.optimizers import AdamW
from keras_adamw.dtensor.placement import MeshPlacement
from keras_adamw.dtensor.placement import state_bytes_per_device

# The core's `Adam(mesh=...)` makes its placement through this.
_placement.register_mesh_placement(MeshPlacement)

__all__ = ["Adam", "AdamW", "MeshPlacement", "state_bytes_per_device"]
