import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Before any DTensor device starts (keras_adamw.dtensor requires it).
os.environ.setdefault("DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION", "0")

import tensorflow as tf  # noqa: E402

# Four logical CPU devices, set before TensorFlow starts, for the DTensor
# tests' 2x2 mesh. Tests that use tf.distribute run in subprocesses.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 4)
