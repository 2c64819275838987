"""End-to-end tests of keras_adamw in training: fit, configs, custom loops and
checkpoints.

Expected numbers come from the independent float64 NumPy AdamW
(tests/reference.py), from constants chosen in the test, or from a second run
of the same training (interrupted vs. uninterrupted); never from the code
under test alone.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from tests.reference import NumpyAdam

# ---------------------------------------------------------------------------
# Helpers.

# Exactly representable in float32 (the dtype of Keras' learning-rate
# variable), so a float64 run sees exactly the value the reference uses.
LR = 2.0**-7
WD = 2.0**-4
BETA_1 = 0.9
BETA_2 = 0.999
EPS = 1e-7


def _regression_data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    w = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    y = np.tanh(x @ w) + 0.5 * x[:, :1] - 0.25
    return x, y.astype("float32")


def _make_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def _assert_weights_close(actual, expected, atol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


def _max_abs_diff(a_list, b_list):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(a_list, b_list))


# A float64 linear least-squares problem with an analytic gradient, so the
# NumPy reference does not depend on TensorFlow at all.
_RNG = np.random.default_rng(1)
_X64 = _RNG.normal(size=(16, 3))
_Y64 = _RNG.normal(size=(16,))
_W0 = np.array([0.5, -1.0, 2.0])
_B0 = np.array([0.25])


def _np_grads(params):
    w, b = params
    r = _X64 @ w + b[0] - _Y64
    n = len(_Y64)
    return [2.0 / n * (_X64.T @ r), np.array([2.0 / n * np.sum(r)])]


def _tf_loss(w, b):
    x = tf.constant(_X64)
    y = tf.constant(_Y64)
    r = tf.linalg.matvec(x, w) + b[0] - y
    return tf.reduce_mean(tf.square(r))


def _fresh_vars():
    return (
        tf.Variable(_W0, dtype=tf.float64, name="w"),
        tf.Variable(_B0, dtype=tf.float64, name="b"),
    )


def _reference(steps):
    """The float64 reference's weights after `steps` steps on the problem."""
    ref = NumpyAdam(
        [_W0, _B0],
        learning_rate=LR,
        beta_1=BETA_1,
        beta_2=BETA_2,
        epsilon=EPS,
        weight_decay=WD,
    )
    for _ in range(steps):
        ref.step(_np_grads(ref.weights))
    return ref.weights


def _assert_matches_reference(variables, steps):
    expected = _reference(steps)
    for var, exp in zip(variables, expected):
        np.testing.assert_allclose(var.numpy(), exp, rtol=1e-9, atol=1e-12)
    # The reference really moved: a broken optimizer cannot pass by luck.
    assert np.max(np.abs(expected[0] - _W0)) > 0.5 * LR


def test_numpy_reference_is_not_trivial():
    # Sanity check of the reference itself: the first Adam step moves each
    # element by about lr (plus the decay), whatever the gradient's size.
    (w1, b1) = _reference(1)
    g = _np_grads([_W0, _B0])
    expected_w = _W0 * (1 - WD * LR) - LR * g[0] / (
        np.abs(g[0]) + EPS / np.sqrt(1 - BETA_2)
    )
    np.testing.assert_allclose(w1, expected_w, rtol=1e-9)


# ---------------------------------------------------------------------------
# fit.


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_reduces_loss(jit_compile):
    x, y = _regression_data(64)
    model = _make_model(0)
    optimizer = keras_adamw.AdamW(learning_rate=0.03, weight_decay=0.001)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    assert model.jit_compile is jit_compile
    history = model.fit(
        x, y, batch_size=16, epochs=10, shuffle=False, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.optimizer is optimizer
    assert int(optimizer.iterations) == 10 * 4


# ---------------------------------------------------------------------------
# Config round trips.


def _rich_adamw():
    return keras_adamw.AdamW(
        learning_rate=0.002,
        weight_decay=0.01,
        beta_1=0.8,
        beta_2=0.99,
        epsilon=1e-6,
        amsgrad=True,
        clipnorm=1.5,
        use_ema=True,
        ema_momentum=0.9,
        ema_overwrite_frequency=5,
        jit_compile=False,
        name="my_adamw",
    )


def test_serialize_deserialize_round_trip():
    optimizer = _rich_adamw()
    serialized = keras.optimizers.serialize(optimizer)
    # Must survive JSON, as in a .keras file.
    serialized = json.loads(json.dumps(serialized))
    restored = keras.optimizers.deserialize(serialized)
    assert type(restored) is keras_adamw.AdamW
    assert restored is not optimizer
    assert restored.get_config() == optimizer.get_config()
    config = restored.get_config()
    expected = {
        "name": "my_adamw",
        "weight_decay": 0.01,
        "beta_1": 0.8,
        "beta_2": 0.99,
        "epsilon": 1e-6,
        "amsgrad": True,
        "clipnorm": 1.5,
        "clipvalue": None,
        "global_clipnorm": None,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 5,
        "jit_compile": False,
    }
    for key, value in expected.items():
        assert config[key] == value, key
    assert config["learning_rate"] == pytest.approx(0.002, rel=1e-6)


def test_adam_serialize_deserialize_round_trip():
    optimizer = keras_adamw.Adam(learning_rate=0.004, beta_1=0.7)
    restored = keras.optimizers.deserialize(
        json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    )
    assert type(restored) is keras_adamw.Adam
    assert restored.get_config() == optimizer.get_config()
    assert restored.get_config()["weight_decay"] is None
    assert restored.get_config()["beta_1"] == 0.7


def test_compile_with_serialized_dict():
    optimizer = _rich_adamw()
    serialized = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    model = _make_model(0)
    model.compile(optimizer=serialized, loss="mse", jit_compile=False)
    assert isinstance(model.optimizer, keras_adamw.AdamW)
    assert model.optimizer is not optimizer
    assert model.optimizer.get_config() == optimizer.get_config()
    x, y = _regression_data(16)
    before = _weights(model)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == 2
    assert _max_abs_diff(_weights(model), before) > 1e-4


def test_from_config_with_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        initial_learning_rate=0.01, decay_steps=10, decay_rate=0.5
    )
    optimizer = keras_adamw.AdamW(learning_rate=schedule, weight_decay=0.02)
    config = optimizer.get_config()
    assert isinstance(config["learning_rate"], dict)
    restored = keras_adamw.AdamW.from_config(json.loads(json.dumps(config)))
    assert type(restored) is keras_adamw.AdamW
    assert restored.get_config() == config
    assert isinstance(
        restored._learning_rate,
        keras.optimizers.schedules.ExponentialDecay,
    )
    assert restored._learning_rate.get_config() == schedule.get_config()
    # The schedule is live: the rate follows the iteration count.
    assert float(restored.learning_rate) == pytest.approx(0.01, rel=1e-6)
    var = keras.Variable(np.ones(3, dtype="float32"))
    restored.build([var])
    restored.iterations.assign(10)
    assert float(restored.learning_rate) == pytest.approx(0.005, rel=1e-6)
    # And through keras.optimizers.serialize / deserialize as well.
    again = keras.optimizers.deserialize(
        json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    )
    assert type(again) is keras_adamw.AdamW
    assert again.get_config() == config


# ---------------------------------------------------------------------------
# Custom training loops.

STEPS = 5


def _eager_loop(optimizer, variables, steps):
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = _tf_loss(*variables)
        grads = tape.gradient(loss, list(variables))
        optimizer.apply_gradients(zip(grads, variables))


def _function_loop(optimizer, variables, steps):
    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = _tf_loss(*variables)
        grads = tape.gradient(loss, list(variables))
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    for _ in range(steps):
        train_step()
    return train_step


@pytest.mark.parametrize("optimizer_jit", [True, False])
def test_custom_loop_eager_and_tf_function_match_numpy(optimizer_jit):
    eager_vars = _fresh_vars()
    eager_opt = keras_adamw.AdamW(
        learning_rate=LR, weight_decay=WD, jit_compile=optimizer_jit
    )
    eager_opt.build(list(eager_vars))
    _eager_loop(eager_opt, eager_vars, STEPS)

    fn_vars = _fresh_vars()
    fn_opt = keras_adamw.AdamW(
        learning_rate=LR, weight_decay=WD, jit_compile=optimizer_jit
    )
    fn_opt.build(list(fn_vars))
    _function_loop(fn_opt, fn_vars, STEPS)

    assert int(eager_opt.iterations) == STEPS
    assert int(fn_opt.iterations) == STEPS
    for a, b in zip(eager_vars, fn_vars):
        assert a.dtype == tf.float64 and b.dtype == tf.float64
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-6)
    _assert_matches_reference(eager_vars, STEPS)
    _assert_matches_reference(fn_vars, STEPS)


def test_unbuilt_optimizer_builds_inside_tf_function():
    variables = _fresh_vars()
    optimizer = keras_adamw.AdamW(learning_rate=LR, weight_decay=WD)
    assert not optimizer.built
    _function_loop(optimizer, variables, STEPS)
    assert optimizer.built
    # iterations, learning rate, and momentum + velocity per variable.
    assert len(optimizer.variables) == 2 + 2 * len(variables)
    assert int(optimizer.iterations) == STEPS
    _assert_matches_reference(variables, STEPS)


def _minimize_tensor_with_tape(optimizer, variables):
    with tf.GradientTape() as tape:
        loss = _tf_loss(*variables)
    return optimizer.minimize(loss, list(variables), tape=tape)


def _minimize_callable_loss(optimizer, variables):
    return optimizer.minimize(lambda: _tf_loss(*variables), list(variables))


def _minimize_callable_loss_and_var_list(optimizer, variables):
    return optimizer.minimize(
        lambda: _tf_loss(*variables), lambda: list(variables)
    )


@pytest.mark.parametrize(
    "minimize_once",
    [
        _minimize_tensor_with_tape,
        _minimize_callable_loss,
        _minimize_callable_loss_and_var_list,
    ],
    ids=["tensor_and_tape", "callable_loss", "callable_loss_and_var_list"],
)
def test_minimize(minimize_once):
    variables = _fresh_vars()
    optimizer = keras_adamw.AdamW(learning_rate=LR, weight_decay=WD)
    for step in range(3):
        result = minimize_once(optimizer, variables)
        assert int(result) == step + 1
    assert int(optimizer.iterations) == 3
    _assert_matches_reference(variables, 3)


# ---------------------------------------------------------------------------
# Checkpoints.

BATCH = 8
N_STEPS = 3
M_STEPS = 3

# "plain" runs the realistic default path (graph-mode fit, the optimizer's
# XLA program); the others use an eager fit and the op-by-op optimizer path,
# which trace nothing and keep the suite fast.
OPTIMIZER_CASES = [
    pytest.param({}, id="plain"),
    pytest.param(
        {"use_ema": True, "ema_momentum": 0.5, "jit_compile": False},
        id="ema",
    ),
    pytest.param({"amsgrad": True, "jit_compile": False}, id="amsgrad"),
]


def _compiled_model(init_weights, opt_kwargs, seed=0):
    model = _make_model(seed)
    if init_weights is not None:
        model.set_weights(init_weights)
    optimizer = keras_adamw.AdamW(
        learning_rate=0.02, weight_decay=0.01, **opt_kwargs
    )
    model.compile(
        optimizer=optimizer,
        loss="mse",
        jit_compile=False,
        run_eagerly=not optimizer.jit_compile,
    )
    return model


def _fit(model, x, y):
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def _split_data():
    x, y = _regression_data(BATCH * (N_STEPS + M_STEPS), seed=3)
    cut = BATCH * N_STEPS
    return (x[:cut], y[:cut]), (x[cut:], y[cut:]), (x, y)


def _optimizer_values(optimizer):
    return [np.array(v.numpy()) for v in optimizer.variables]


def _slot_kinds(optimizer):
    """(kind, shape) of each optimizer variable, in order. Layer names differ
    between a model and its reloaded copy, so only the suffix is compared."""
    kinds = (
        "velocity_hat",
        "momentum",
        "velocity",
        "average",
        "iteration",
        "learning_rate",
    )
    result = []
    for v in optimizer.variables:
        kind = next((k for k in kinds if v.name.endswith(k)), v.name)
        result.append((kind, tuple(v.shape)))
    return result


@pytest.mark.parametrize("opt_kwargs", OPTIMIZER_CASES)
def test_keras_file_resume_matches_uninterrupted(tmp_path, opt_kwargs):
    (xa, ya), (xb, yb), (x_all, y_all) = _split_data()
    init = _weights(_make_model(0))

    # Interrupted: N steps, save, load (no custom_objects), M more steps.
    model = _compiled_model(init, opt_kwargs)
    _fit(model, xa, ya)
    saved_weights = _weights(model)
    saved_slots = _optimizer_values(model.optimizer)
    saved_kinds = _slot_kinds(model.optimizer)
    path = str(tmp_path / "m.keras")
    model.save(path)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras_adamw.AdamW)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == N_STEPS
    _assert_weights_close(_weights(loaded), saved_weights, atol=0)
    assert _slot_kinds(loaded.optimizer) == saved_kinds
    loaded_slots = _optimizer_values(loaded.optimizer)
    assert len(loaded_slots) == len(saved_slots)
    for a, b in zip(loaded_slots, saved_slots):
        np.testing.assert_array_equal(a, b)
    _fit(loaded, xb, yb)

    # Uninterrupted: the same N + M steps in memory. `fit` ends with
    # `finalize_variable_values` (which copies the EMA into the weights when
    # use_ema is on), so with EMA the reference also calls fit twice.
    reference = _compiled_model(init, opt_kwargs)
    if opt_kwargs.get("use_ema"):
        _fit(reference, xa, ya)
        _fit(reference, xb, yb)
    else:
        _fit(reference, x_all, y_all)

    assert int(loaded.optimizer.iterations) == N_STEPS + M_STEPS
    assert int(reference.optimizer.iterations) == N_STEPS + M_STEPS
    _assert_weights_close(_weights(loaded), _weights(reference), atol=1e-6)

    # Restarting from the saved weights with a fresh optimizer gives another
    # result, so the comparison above did depend on the restored slots.
    restarted = _compiled_model(saved_weights, opt_kwargs)
    _fit(restarted, xb, yb)
    assert _max_abs_diff(_weights(restarted), _weights(reference)) > 1e-4


@pytest.mark.parametrize(
    "opt_kwargs",
    [
        pytest.param({}, id="plain"),
        pytest.param(
            {"amsgrad": True, "use_ema": True, "jit_compile": False},
            id="amsgrad_ema",
        ),
    ],
)
def test_tf_train_checkpoint_resume(tmp_path, opt_kwargs):
    (xa, ya), (xb, yb), _ = _split_data()
    init = _weights(_make_model(0))

    model = _compiled_model(init, opt_kwargs)
    _fit(model, xa, ya)
    saved_weights = _weights(model)
    saved_slots = _optimizer_values(model.optimizer)
    save_path = tf.train.Checkpoint(
        model=model, optimizer=model.optimizer
    ).save(str(tmp_path / "ckpt"))

    # A fresh model with other initial weights and a fresh optimizer.
    fresh = _compiled_model(None, opt_kwargs, seed=7)
    assert _max_abs_diff(_weights(fresh), saved_weights) > 1e-3
    fresh.optimizer.build(fresh.trainable_variables)
    status = tf.train.Checkpoint(
        model=fresh, optimizer=fresh.optimizer
    ).restore(save_path)
    status.assert_existing_objects_matched()
    _assert_weights_close(_weights(fresh), saved_weights, atol=0)
    assert int(fresh.optimizer.iterations) == N_STEPS
    for a, b in zip(_optimizer_values(fresh.optimizer), saved_slots):
        np.testing.assert_array_equal(a, b)

    _fit(model, xb, yb)
    _fit(fresh, xb, yb)
    assert int(fresh.optimizer.iterations) == N_STEPS + M_STEPS
    _assert_weights_close(_weights(fresh), _weights(model), atol=1e-6)


def test_saved_model_optimizer_state(tmp_path):
    (xa, ya), _, _ = _split_data()
    opt_kwargs = {"amsgrad": True}
    model = _compiled_model(_weights(_make_model(0)), opt_kwargs)
    _fit(model, xa, ya)
    optimizer = model.optimizer
    path = str(tmp_path / "saved_model")

    root = tf.Module()
    root.model = model
    root.optimizer = optimizer
    tf.saved_model.save(root, path)

    # Restore the optimizer state into a fresh model and optimizer.
    fresh = _make_model(7)
    fresh_opt = keras_adamw.AdamW(
        learning_rate=0.02, weight_decay=0.01, **opt_kwargs
    )
    fresh_opt.build(fresh.trainable_variables)
    assert _max_abs_diff(_weights(fresh), _weights(model)) > 1e-3
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(
        os.path.join(path, "variables", "variables")
    )
    _assert_weights_close(_weights(fresh), _weights(model), atol=0)
    assert int(fresh_opt.iterations) == N_STEPS
    slot_lists = ["_momentums", "_velocities", "_velocity_hats"]
    for attr in slot_lists:
        original = getattr(optimizer, attr)
        restored = getattr(fresh_opt, attr)
        assert len(original) == len(restored) == 4
        for a, b in zip(original, restored):
            assert np.any(a.numpy() != 0), attr
            np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert len(fresh_opt.variables) == len(optimizer.variables)
    for a, b in zip(optimizer.variables, fresh_opt.variables):
        np.testing.assert_array_equal(b.numpy(), a.numpy())

    # The SavedModel itself carries the slots.
    loaded = tf.saved_model.load(path)
    loaded_momentums = list(loaded.optimizer._momentums)
    assert len(loaded_momentums) == len(optimizer._momentums)
    for a, b in zip(optimizer._momentums, loaded_momentums):
        np.testing.assert_array_equal(np.array(b.numpy()), a.numpy())
    assert int(loaded.optimizer._iterations.numpy()) == N_STEPS
