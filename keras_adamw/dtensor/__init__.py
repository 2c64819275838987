"""keras_adamw.dtensor: Adam and AdamW for `tf.experimental.dtensor` meshes.

Only how variables are made and placed differs from the core optimizers
(`keras_adamw.dtensor.placement`); the update is the core's.

Example:

>>> from tensorflow.experimental import dtensor
>>> mesh = dtensor.create_mesh([("batch", 2), ("model", 2)],
...                            device_type="CPU")
>>> optimizer = keras_adamw.dtensor.AdamW(mesh, learning_rate=1e-3)
"""

import os

# DTensor's all-reduce combining pass re-sorts a step's operations by data
# dependencies only, so a read of a variable can move before an earlier
# write to it (seen in TF 2.21: the EMA read the pre-step weights). It is
# read once, when the DTensor device starts: import keras_adamw before making
# a mesh. MeshPlacement refuses to work if it is enabled.
os.environ.setdefault("DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION", "0")

from keras_adamw.dtensor.optimizers import Adam  # noqa: E402
from keras_adamw.dtensor.optimizers import AdamW  # noqa: E402
from keras_adamw.dtensor.placement import MeshPlacement  # noqa: E402
from keras_adamw.dtensor.placement import state_bytes_per_device  # noqa: E402
from keras_adamw import placement as _placement  # noqa: E402

# The core's `Adam(mesh=...)` makes its placement through this.
_placement.register_mesh_placement(MeshPlacement)

__all__ = ["Adam", "AdamW", "MeshPlacement", "state_bytes_per_device"]
