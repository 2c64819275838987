"""The setup every test process starts with, before TensorFlow starts.

pytest's process gets it from the root conftest.py; the job processes
(tests/jobs/), which do not load conftest.py, call it themselves.
"""

import os


def set_defaults():
    """Quiet TensorFlow logs and the TensorFlow backend for Keras, unless
    the environment says otherwise. Call it before importing TensorFlow or
    Keras."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def use_logical_cpus(count):
    """Splits the CPU into `count` logical devices; call it before anything
    initializes TensorFlow's context."""
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * count,
    )
