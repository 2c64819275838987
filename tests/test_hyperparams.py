"""The hyperparameter table drives the constructor's checks and the checks
on later assignment alike (`keras_adamw/hyperparams.py`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import hyperparams

BAD_VALUES = [
    ("clipnorm", -1.0, ValueError),
    ("clipvalue", -1.0, ValueError),
    ("global_clipnorm", 0.0, ValueError),
    ("beta_1", 1.5, ValueError),
    ("beta_2", -0.1, ValueError),
    ("epsilon", -1.0, ValueError),
    ("weight_decay", -10.0, ValueError),
    ("ema_momentum", 5.0, ValueError),
    ("ema_overwrite_frequency", 0, ValueError),
    ("gradient_accumulation_steps", 0, ValueError),
    ("loss_scale_factor", 0.0, ValueError),
    ("epsilon", "small", TypeError),
    ("amsgrad", "yes", TypeError),
    ("jit_compile", 1, TypeError),
    ("gradient_accumulation_steps", 2.5, TypeError),
]


@pytest.mark.parametrize("name, value, error", BAD_VALUES)
def test_bad_value_is_refused_by_constructor_and_assignment_alike(
    name, value, error
):
    with pytest.raises(error, match=f"{name}={value!r}|{name}={value}") as e:
        keras_adamw.AdamW(**{name: value})
    constructor_message = str(e.value)
    optimizer = keras_adamw.AdamW()
    before = getattr(optimizer, name)
    with pytest.raises(error) as e:
        setattr(optimizer, name, value)
    assert str(e.value) == constructor_message
    assert getattr(optimizer, name) == before


def test_a_good_assignment_is_used_by_the_next_step():
    variable = keras.Variable([1.0, -1.0])
    optimizer = keras_adamw.Adam(learning_rate=0.1)
    optimizer.clipvalue = 0.5
    optimizer.beta_1 = 0.0
    optimizer.apply([tf.constant([4.0, -4.0])], [variable])
    # beta_1 = 0 and a clipped gradient: the first step moves by lr.
    np.testing.assert_allclose(variable.numpy(), [0.9, -0.9], rtol=1e-6)


def test_clip_options_are_exclusive_on_assignment_too():
    optimizer = keras_adamw.AdamW(clipnorm=1.0)
    with pytest.raises(ValueError, match="Only one of"):
        optimizer.global_clipnorm = 2.0
    optimizer.clipnorm = None
    optimizer.global_clipnorm = 2.0
    assert optimizer.get_config()["global_clipnorm"] == 2.0


def test_structural_hyperparameters_cannot_change_once_built():
    optimizer = keras_adamw.AdamW()
    optimizer.amsgrad = True  # Before build: fine.
    optimizer.build([keras.Variable([1.0])])
    for name, value in [
        ("amsgrad", False),
        ("use_ema", True),
        ("gradient_accumulation_steps", 2),
    ]:
        with pytest.raises(ValueError, match=f"`{name}` cannot change"):
            setattr(optimizer, name, value)
    optimizer.amsgrad = True  # The same value is no change.


def test_get_config_writes_every_row_of_the_table():
    config = keras_adamw.Adam().get_config()
    assert set(hyperparams.TABLE) <= set(config)
    for row in hyperparams.TABLE.values():
        # No rules are written as an empty list (JSON has no tuples).
        default = [] if row.kind == "rules" else row.default
        if isinstance(default, float):
            assert config[row.name] == pytest.approx(default, rel=1e-7)
        else:  # None, a bool, a string: equal as they are.
            assert config[row.name] == default, row.name


def test_the_table_defaults_are_the_constructor_defaults():
    import inspect

    parameters = inspect.signature(keras_adamw.Adam).parameters
    for row in hyperparams.TABLE.values():
        assert parameters[row.name].default == row.default, row.name
