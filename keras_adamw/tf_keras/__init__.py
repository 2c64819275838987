"""keras_adamw.tf_keras: Adam and AdamW for tf_keras (Keras 2) models.

The same math, step program, execution and placement as `keras_adamw.Adam`;
only the Keras-facing shell is tf_keras'. Needs tf_keras
(`pip install keras_adamw[tf-keras]`); `import keras_adamw` alone never
imports it. `keras_adamw.tf_keras.dtensor` has Keras 2.9's DTensor
signature (`gradients_clip_option`, `ema_option`).

Example:

>>> import tf_keras
>>> import keras_adamw.tf_keras
>>> model = tf_keras.Sequential([tf_keras.layers.Dense(1)])
>>> model.compile(optimizer=keras_adamw.tf_keras.AdamW(1e-3), loss="mse")
"""

from keras_adamw.tf_keras import _compat  # noqa: F401 (checks tf_keras)
from keras_adamw.tf_keras import dtensor
from keras_adamw.tf_keras.optimizers import Adam
from keras_adamw.tf_keras.optimizers import AdamW

__all__ = ["Adam", "AdamW", "dtensor"]
