"""Keras' own tests of its Adam and AdamW pass with keras_adamw's classes.

The installed Keras wheel ships its test modules
(`keras/src/optimizers/adam_test.py` and `adamw_test.py`), so this runs
offline against exactly the Keras that is installed. Each module's source is
executed as a new module (Keras' own module is not touched) and the name its
tests construct optimizers with, `Adam` or `AdamW`, is rebound to
keras_adamw's class; the test classes are subclassed here so that pytest
collects them under this file. A Keras release without these modules fails
collection with the reason (this check is required, never skipped).

Keras' tests also check a few private helpers its optimizers have
(`_clip_gradients`, `_model_variables_moving_average`); keras_adamw keeps
them for that compatibility.
"""

import importlib.util
import types
import warnings

import keras
import pytest

import keras_adamw

KERAS_TESTS = "keras.src.optimizers"


def keras_test_module(name, **rebind):
    """Keras' test module `name` executed anew, with `rebind`'s names set
    in its globals after its imports ran."""
    try:
        spec = importlib.util.find_spec(f"{KERAS_TESTS}.{name}")
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        pytest.fail(
            f"Keras {keras.__version__} ships no {KERAS_TESTS}.{name}: "
            "keras_adamw cannot be checked against Keras' own tests",
            pytrace=False,
        )
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    module = types.ModuleType(f"keras_own_{name}")
    module.__file__ = spec.origin
    with warnings.catch_warnings():
        # Markers Keras' conftest.py registers (requires_trainable_backend).
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        exec(compile(source, spec.origin, "exec"), module.__dict__)
    for key, value in rebind.items():
        assert key in module.__dict__, (name, key)  # The name Keras uses.
        setattr(module, key, value)
    return module


_adam = keras_test_module("adam_test", Adam=keras_adamw.Adam)
_adamw = keras_test_module("adamw_test", AdamW=keras_adamw.AdamW)


class TestKerasAdamTestOnKerasAdamwAdam(_adam.AdamTest):
    """keras/src/optimizers/adam_test.py with `Adam = keras_adamw.Adam`."""


class TestKerasAdamWTestOnKerasAdamwAdamW(_adamw.AdamWTest):
    """keras/src/optimizers/adamw_test.py with `AdamW = keras_adamw.AdamW`."""


# Not collected again under their Keras names.
del _adam, _adamw


def test_keras_tests_construct_keras_adamw_classes():
    for test, name, cls in [
        (TestKerasAdamTestOnKerasAdamwAdam, "Adam", keras_adamw.Adam),
        (TestKerasAdamWTestOnKerasAdamwAdamW, "AdamW", keras_adamw.AdamW),
    ]:
        assert test.test_single_step.__globals__[name] is cls
