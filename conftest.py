"""Setup shared by the test suite and the docstring examples (doctests):
the environment, four logical CPU devices (set before TensorFlow starts, for
the DTensor examples' and tests' 2x2 mesh) and the names the examples use."""

import os

from tests import environment

environment.set_defaults()
# Before any DTensor device starts (keras_adamw.dtensor requires it).
os.environ.setdefault("DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION", "0")
# Tests that use tf.distribute run in subprocesses (tests/jobs/).
environment.use_logical_cpus(4)

import pytest  # noqa: E402

# Scripts that run as processes of their own: not modules to collect.
collect_ignore = ["tests/jobs", "benchmarks", "colab", "third_party"]


_NAMES = {}


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    """`np`, `tf`, `keras`, `keras_adamw`, `dtensor` and a 2x2 `mesh` for
    the examples in docstrings."""
    if not _NAMES:
        import keras
        import numpy as np
        import tensorflow as tf
        from tensorflow.experimental import dtensor

        import keras_adamw

        _NAMES.update(
            np=np, tf=tf, keras=keras, keras_adamw=keras_adamw, dtensor=dtensor
        )
        _NAMES["mesh"] = dtensor.create_mesh(
            [("batch", 2), ("model", 2)], device_type="CPU"
        )
    doctest_namespace.update(_NAMES)
