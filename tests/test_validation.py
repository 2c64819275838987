"""Bad input gets a clear ValueError/TypeError naming the argument (or
variable) and the value received, and leaves every state untouched."""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw

BOTH = pytest.mark.parametrize(
    "cls", [keras_adamw.Adam, keras_adamw.AdamW], ids=["Adam", "AdamW"]
)


def _m(*parts):
    """A regex matching the literal `parts` in this order."""
    return ".*".join(re.escape(p) for p in parts)


# ---------------------------------------------------------------------------
# Constructor arguments.


@BOTH
@pytest.mark.parametrize(
    "value, error, pattern",
    [
        (-0.1, ValueError, _m("learning_rate=-0.1")),
        (-1, ValueError, _m("learning_rate=-1")),
        (float("nan"), ValueError, _m("learning_rate=nan")),
        (float("inf"), ValueError, _m("learning_rate=inf")),
        ("fast", TypeError, _m("learning_rate='fast'")),
        ("0.01", TypeError, _m("learning_rate='0.01'")),
        (True, TypeError, _m("learning_rate=True")),
        (False, TypeError, _m("learning_rate=False")),
        (None, TypeError, _m("learning_rate=None")),
    ],
    ids=[
        "negative",
        "negative_int",
        "nan",
        "inf",
        "string",
        "numeric_string",
        "bool_true",
        "bool_false",
        "none",
    ],
)
def test_bad_learning_rate(cls, value, error, pattern):
    with pytest.raises(error, match=pattern):
        cls(learning_rate=value)


def test_negative_tensor_learning_rate():
    with pytest.raises(ValueError, match=_m("learning_rate=", "-0.5")):
        keras_adamw.AdamW(learning_rate=tf.constant(-0.5))


@BOTH
@pytest.mark.parametrize("name", ["beta_1", "beta_2"])
@pytest.mark.parametrize(
    "value", [1.0, -0.1, 1.5, float("nan")], ids=["1.0", "-0.1", "1.5", "nan"]
)
def test_beta_outside_half_open_unit_interval(cls, name, value):
    with pytest.raises(ValueError, match=_m(f"{name}={value}")):
        cls(**{name: value})


@BOTH
@pytest.mark.parametrize("name", ["beta_1", "beta_2"])
def test_beta_string_is_type_error(cls, name):
    with pytest.raises(TypeError, match=_m(f"{name}='0.9'")):
        cls(**{name: "0.9"})


@BOTH
def test_beta_zero_is_accepted(cls):
    # The lower end of [0, 1) is allowed: the checks are not over-eager.
    cls(beta_1=0.0, beta_2=0.0)


@BOTH
@pytest.mark.parametrize("value", [-1e-8, -1.0])
def test_negative_epsilon(cls, value):
    with pytest.raises(ValueError, match=_m(f"epsilon={value}")):
        cls(epsilon=value)


@BOTH
@pytest.mark.parametrize("value", [-0.01, -4])
def test_negative_weight_decay(cls, value):
    with pytest.raises(ValueError, match=_m(f"weight_decay={value}")):
        cls(weight_decay=value)


def test_weight_decay_string_is_type_error():
    with pytest.raises(TypeError, match=_m("weight_decay='0.1'")):
        keras_adamw.AdamW(weight_decay="0.1")


def test_adamw_weight_decay_none():
    with pytest.raises(ValueError, match=_m("weight_decay=None")):
        keras_adamw.AdamW(weight_decay=None)
    # Adam takes None (no weight decay) as Keras does.
    assert keras_adamw.Adam(weight_decay=None).weight_decay is None


@BOTH
@pytest.mark.parametrize("use_ema", [False, True])
@pytest.mark.parametrize("value", [1.5, -0.1])
def test_ema_momentum_outside_unit_interval(cls, use_ema, value):
    with pytest.raises(ValueError, match=_m(f"ema_momentum={value}")):
        cls(use_ema=use_ema, ema_momentum=value)


@BOTH
def test_ema_momentum_bounds_are_accepted(cls):
    cls(ema_momentum=0.0)
    cls(ema_momentum=1.0)


@BOTH
@pytest.mark.parametrize(
    "value, error",
    [
        (1, ValueError),
        (0, ValueError),
        (-2, ValueError),
        (2.5, TypeError),
        (2.0, TypeError),
        (True, TypeError),
        ("2", TypeError),
    ],
    ids=["1", "0", "-2", "2.5", "2.0", "True", "string"],
)
def test_bad_gradient_accumulation_steps(cls, value, error):
    with pytest.raises(
        error, match=_m(f"gradient_accumulation_steps={value!r}")
    ):
        cls(gradient_accumulation_steps=value)


@BOTH
def test_gradient_accumulation_steps_two_is_accepted(cls):
    assert cls(gradient_accumulation_steps=2).gradient_accumulation_steps == 2


@BOTH
@pytest.mark.parametrize(
    "kwargs",
    [
        {"clipnorm": 1.0, "clipvalue": 0.5},
        {"clipnorm": 1.0, "global_clipnorm": 2.0},
        {"clipvalue": 0.5, "global_clipnorm": 2.0},
        {"clipnorm": 1.0, "clipvalue": 0.5, "global_clipnorm": 2.0},
    ],
    ids=["norm_value", "norm_global", "value_global", "all_three"],
)
def test_more_than_one_clip_option(cls, kwargs):
    pattern = _m(*(f"{k}={v}" for k, v in kwargs.items()))
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@BOTH
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"lr": 0.1}, _m("Argument(s) not recognized", "lr", "0.1")),
        ({"beta1": 0.9}, _m("Argument(s) not recognized", "beta1", "0.9")),
    ],
    ids=["lr", "beta1"],
)
def test_unknown_keyword(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@BOTH
def test_keras2_decay_is_ignored_with_keras_warning(cls):
    """As Keras 3's base optimizer: `decay` warns and is ignored."""
    keras_cls = getattr(keras.optimizers, cls.__name__)
    for make in (cls, keras_cls):
        with pytest.warns(
            UserWarning,
            match=_m(
                "Argument `decay` is no longer supported and will be ignored."
            ),
        ):
            optimizer = make(decay=0.5, name="o")
        assert optimizer.get_config() == make(name="o").get_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(decay=None)  # Keras ignores None silently.


# ---------------------------------------------------------------------------
# apply / apply_gradients.


def _vars():
    w = keras.Variable(
        np.arange(6, dtype="float32").reshape(2, 3) + 1.0, name="kernel_a"
    )
    b = keras.Variable(np.array([0.5, -0.5], dtype="float32"), name="bias_a")
    return w, b


def _snapshot(variables):
    return [np.array(v.numpy()) for v in variables]


def _assert_untouched(optimizer, variables, before):
    assert int(optimizer.iterations) == 0
    assert optimizer.built is False
    # Only the iteration counter and the learning rate exist.
    assert len(optimizer.variables) == 2
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


@pytest.mark.parametrize("mode", ["eager", "tf_function"])
def test_mismatched_gradient_shape(mode):
    w, b = _vars()
    before = _snapshot([w, b])
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    # The valid pair comes first: it must not be applied either.
    pairs = [(tf.ones([2]), b), (tf.ones([3, 2]), w)]

    def step():
        optimizer.apply_gradients(pairs)

    if mode == "tf_function":
        step = tf.function(step)
    with pytest.raises(ValueError, match=_m("kernel_a", "(3, 2)", "(2, 3)")):
        step()
    _assert_untouched(optimizer, [w, b], before)


def test_mismatched_gradient_shape_after_build():
    w, b = _vars()
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    optimizer.build([w, b])
    before = _snapshot([w, b])
    slots = _snapshot(optimizer.variables)
    with pytest.raises(ValueError, match=_m("bias_a", "(3,)", "(2,)")):
        optimizer.apply([tf.ones([2, 3]), tf.ones([3])], [w, b])
    assert int(optimizer.iterations) == 0
    for v, s in zip([w, b], before):
        np.testing.assert_array_equal(v.numpy(), s)
    for v, s in zip(optimizer.variables, slots):
        np.testing.assert_array_equal(v.numpy(), s)


def test_integer_variable():
    w, _ = _vars()
    counter = tf.Variable([1, 2], dtype=tf.int32, name="counter")
    before = _snapshot([w, counter])
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    with pytest.raises(TypeError, match=_m("counter", "int32")):
        optimizer.apply_gradients(
            [(tf.ones([2, 3]), w), (tf.ones([2]), counter)]
        )
    _assert_untouched(optimizer, [w, counter], before)


def test_integer_variable_in_build():
    counter = keras.Variable(
        np.array([1, 2], dtype="int32"), name="steps_seen", trainable=False
    )
    optimizer = keras_adamw.Adam()
    with pytest.raises(TypeError, match=_m("steps_seen", "int32")):
        optimizer.build([counter])
    assert optimizer.built is False
    assert len(optimizer.variables) == 2


def test_integer_gradient():
    w, b = _vars()
    before = _snapshot([w, b])
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    with pytest.raises(TypeError, match=_m("bias_a", "int32")):
        optimizer.apply([tf.ones([2, 3]), tf.constant([1, 2])], [w, b])
    _assert_untouched(optimizer, [w, b], before)


def test_every_gradient_none():
    w, b = _vars()
    before = _snapshot([w, b])
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    with pytest.raises(ValueError, match=_m("kernel_a", "bias_a")):
        optimizer.apply_gradients([(None, w), (None, b)])
    _assert_untouched(optimizer, [w, b], before)


@pytest.mark.parametrize(
    "n_grads, n_vars",
    [(2, 1), (3, 2), (1, 2)],
    ids=["2_for_1", "3_for_2", "1_for_2"],
)
def test_gradient_and_variable_counts_differ(n_grads, n_vars):
    # Keras 3 zips the two lists and silently drops the extra ones.
    w, b = _vars()
    variables = [w, b][:n_vars]
    grads = [tf.ones(v.shape) for v in [w, b, w]][:n_grads]
    before = _snapshot([w, b])
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    with pytest.raises(
        ValueError, match=_m(f"{n_grads} gradients", f"{n_vars} variables")
    ):
        optimizer.apply(grads, variables)
    _assert_untouched(optimizer, [w, b], before)


def test_some_gradients_none_warns_once_and_skips_them():
    w, b = _vars()
    before = _snapshot([w, b])
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.apply_gradients([(tf.ones([2, 3]), w), (None, b)])
    assert len(caught) == 1, [str(c.message) for c in caught]
    message = str(caught[0].message)
    assert "bias_a" in message
    assert "kernel_a" not in message
    assert int(optimizer.iterations) == 1
    np.testing.assert_array_equal(b.numpy(), before[1])
    # The other variable moved by about lr = 0.1 (first Adam step).
    moved = np.abs(w.numpy() - before[0])
    assert np.all(moved > 0.09), moved
    # And the skipped variable's slots are still zero.
    slot_index = 1  # the order of apply_gradients' pairs
    assert not np.any(optimizer._momentums[slot_index].numpy())
    assert not np.any(optimizer._velocities[slot_index].numpy())


def test_some_gradients_none_pytest_warns():
    w, b = _vars()
    before = _snapshot([w, b])
    optimizer = keras_adamw.Adam(learning_rate=0.1)
    with pytest.warns(UserWarning, match=_m("kernel_a")) as record:
        optimizer.apply([None, tf.ones([2])], [w, b])
    assert len(record) == 1
    np.testing.assert_array_equal(w.numpy(), before[0])
    assert np.all(np.abs(b.numpy() - before[1]) > 0.09)


# ---------------------------------------------------------------------------
# exclude_from_weight_decay and set_weights.


def _decay_only_step(optimizer, w):
    """A zero gradient moves a variable only through weight decay."""
    optimizer.apply([tf.zeros(w.shape)], [w])


def test_exclude_from_weight_decay_before_build_works():
    # Positive control for the next test.
    w = keras.Variable(np.full([3], 2.0, dtype="float32"), name="gamma")
    optimizer = keras_adamw.AdamW(learning_rate=0.5, weight_decay=0.25)
    optimizer.exclude_from_weight_decay(var_names=["gamma"])
    _decay_only_step(optimizer, w)
    np.testing.assert_array_equal(w.numpy(), [2.0, 2.0, 2.0])


def test_exclude_from_weight_decay_after_build_and_after_a_step():
    w = keras.Variable(np.full([3], 2.0, dtype="float32"), name="gamma")
    optimizer = keras_adamw.AdamW(learning_rate=0.5, weight_decay=0.25)
    optimizer.build([w])
    _decay_only_step(optimizer, w)  # Decays: 2 * (1 - 0.25 * 0.5).
    np.testing.assert_allclose(w.numpy(), [1.75, 1.75, 1.75], rtol=1e-6)
    # Excluded after build and after a step: from the next step on, no
    # decay (Keras 3 caches its mask at the first step and ignores it).
    optimizer.exclude_from_weight_decay(var_list=[w])
    _decay_only_step(optimizer, w)
    np.testing.assert_allclose(w.numpy(), [1.75, 1.75, 1.75], rtol=1e-6)


def test_exclude_from_weight_decay_string_var_names():
    w = keras.Variable(np.full([3], 2.0, dtype="float32"), name="gamma")
    optimizer = keras_adamw.AdamW(learning_rate=0.5, weight_decay=0.25)
    with pytest.raises(TypeError, match=_m("var_names='gamma'")):
        optimizer.exclude_from_weight_decay(var_names="gamma")
    with pytest.raises(TypeError, match=_m("var_names", "3")):
        optimizer.exclude_from_weight_decay(var_names=["gamma", 3])
    # No exclusion was recorded: the variable decays.
    _decay_only_step(optimizer, w)
    np.testing.assert_allclose(w.numpy(), [1.75, 1.75, 1.75], rtol=1e-6)


def _stepped_optimizer():
    w, b = _vars()
    optimizer = keras_adamw.AdamW(learning_rate=0.1)
    optimizer.apply([tf.ones([2, 3]), tf.ones([2])], [w, b])
    return optimizer


def test_set_weights_wrong_count():
    optimizer = _stepped_optimizer()
    before = _snapshot(optimizer.variables)
    assert len(before) == 6
    new = [np.full(np.shape(v), 7.0, dtype=v.dtype) for v in before]
    with pytest.raises(ValueError, match=_m("6 variables", "5 arrays")):
        optimizer.set_weights(new[:-1])
    with pytest.raises(ValueError, match=_m("6 variables", "7 arrays")):
        optimizer.set_weights(new + [new[0]])
    for v, b in zip(optimizer.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def test_set_weights_wrong_shape_assigns_nothing():
    optimizer = _stepped_optimizer()
    before = _snapshot(optimizer.variables)
    new = [np.full(np.shape(v), 7.0, dtype=v.dtype) for v in before]
    new[-1] = np.zeros([5], dtype="float32")  # bias velocity is (2,)
    with pytest.raises(ValueError, match=_m("bias_a", "(2,)", "(5,)")):
        optimizer.set_weights(new)
    for v, b in zip(optimizer.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    # Positive control: the right arrays are assigned.
    new[-1] = np.full([2], 7.0, dtype="float32")
    optimizer.set_weights(new)
    for v in optimizer.variables:
        np.testing.assert_array_equal(v.numpy(), np.full(v.shape, 7.0))


def test_set_weights_unbuilt():
    optimizer = keras_adamw.AdamW()
    with pytest.raises(ValueError, match=_m(optimizer.name, "not built")):
        optimizer.set_weights([np.array(0), np.array(0.1)])
    assert int(optimizer.iterations) == 0


# ---------------------------------------------------------------------------
# Callable hyperparameters.


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"beta_1": lambda: 1.5}, _m("beta_1", "1.5")),
        ({"beta_2": lambda: -0.1}, _m("beta_2", "-0.1")),
        ({"learning_rate": lambda: -1.0}, _m("learning_rate", "-1")),
    ],
    ids=["beta_1", "beta_2", "learning_rate"],
)
def test_callable_hyperparameter_out_of_range_raises_when_used(
    kwargs, pattern
):
    # validation.check_number accepts a callable "checked when used"; an
    # out-of-range value it returns must not be applied silently.
    w, b = _vars()
    before = _snapshot([w, b])
    optimizer = keras_adamw.Adam(jit_compile=False, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        optimizer.apply([tf.ones([2, 3]), tf.ones([2])], [w, b])
    assert int(optimizer.iterations) == 0
    for v, s in zip([w, b], before):
        np.testing.assert_array_equal(v.numpy(), s)


def test_setting_a_negative_learning_rate_raises():
    optimizer = keras_adamw.AdamW(learning_rate=0.5)
    with pytest.raises(ValueError, match=r"learning_rate=-1"):
        optimizer.learning_rate = -1.0
    assert float(optimizer.learning_rate) == 0.5
    optimizer.learning_rate = 0.25
    assert float(optimizer.learning_rate) == 0.25
