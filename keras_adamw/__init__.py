"""keras_adamw: exact, fused Adam and AdamW for Keras 3 on TensorFlow.

Example:

>>> import keras_adamw
>>> optimizer = keras_adamw.AdamW(learning_rate=1e-3, weight_decay=0.004)
"""

from keras_adamw import _keras_compat

_keras_compat.check_keras_version()

from keras_adamw import adam_math  # noqa: E402
from keras_adamw import dtensor  # noqa: E402
from keras_adamw.callbacks import OptimizerLogger  # noqa: E402
from keras_adamw.optimizers import Adam  # noqa: E402
from keras_adamw.optimizers import AdamW  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "OptimizerLogger", "adam_math", "dtensor"]
