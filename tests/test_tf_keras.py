"""keras_adamw.tf_keras: tf_keras (Keras 2) models, against
`tf_keras.optimizers.AdamW` where it is right and the float64 reference
(tests/reference.py) where it is wrong; checkpoints both ways; errors that
name the right class."""

import json

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_adamw
import keras_adamw.tf_keras
from keras_adamw import step
from tests.jobs.processes import Processes
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

LR = float(np.float32(0.01))
RNG = np.random.RandomState(0)
X = RNG.randn(32, 3).astype("float32")
Y = RNG.randn(32, 1).astype("float32")


def make_model(seed=1):
    tf_keras.utils.set_random_seed(seed)
    return tf_keras.Sequential(
        [
            tf_keras.Input((3,)),
            tf_keras.layers.Dense(4, activation="tanh"),
            tf_keras.layers.Dense(1),
        ]
    )


def weights_and_slots(model, optimizer):
    return [w.numpy() for w in model.weights] + [
        v.numpy() for v in optimizer.variables
    ]


def assert_all_close(actual, expected, atol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=atol)


# name: keyword arguments for both implementations.
CONFIGS = {
    "amsgrad_clipnorm": {"weight_decay": 0.01, "amsgrad": True, "clipnorm": 1},
    "schedule_clip_ema": {
        "learning_rate": tf_keras.optimizers.schedules.ExponentialDecay(
            0.02, 4, 0.5
        ),
        "global_clipnorm": 0.5,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 3,
    },
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fit_equals_tf_keras_adamw(config):
    kwargs = {"learning_rate": LR, **CONFIGS[config]}
    results = []
    for optimizer in (
        tf_keras.optimizers.AdamW(jit_compile=False, **kwargs),
        keras_adamw.tf_keras.AdamW(**kwargs),
    ):
        model = make_model()
        # tf_keras' exclusion rules (by variable, by regex on the name).
        optimizer.exclude_from_weight_decay(
            var_list=[model.layers[0].kernel], var_names=["bias"]
        )
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        assert int(optimizer.iterations.numpy()) == 16
        results.append(weights_and_slots(model, optimizer))
    assert_all_close(*results)


def test_mixed_float16_loss_scaling_equals_tf_keras():
    # tf_keras wraps the optimizer in LossScaleOptimizerV3; the variables
    # are AutoCastVariables (float32 stored, float16 compute).
    results = []
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for optimizer in (
            tf_keras.optimizers.AdamW(LR, jit_compile=False),
            keras_adamw.tf_keras.AdamW(LR),
        ):
            model = make_model()
            model.compile(optimizer=optimizer, loss="mse")
            model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            assert type(model.optimizer).__name__ == "LossScaleOptimizerV3"
            results.append(weights_and_slots(model, optimizer))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert_all_close(*results)


def test_fit_runs_one_xla_program_traced_once():
    # tf_keras would run none on CPU (jit_compile needs a GPU there) and
    # one per variable elsewhere.
    optimizer = keras_adamw.tf_keras.AdamW(LR)
    model = make_model()
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    assert optimizer.jit_compile
    program = optimizer._programs.value.compiled(step.apply_step)
    assert program.experimental_get_tracing_count() == 1
    assert int(optimizer.iterations.numpy()) == 8


def test_gradient_tape_loop_and_minimize_equal_tf_keras():
    def tape_loop(optimizer):
        model = make_model()

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x) - y))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        for i in range(12):
            train_step(X[i : i + 4], Y[i : i + 4])
        return weights_and_slots(model, optimizer)

    def minimize(optimizer):
        model = make_model()
        for i in range(10):
            optimizer.minimize(
                lambda i=i: tf.reduce_mean(
                    tf.square(model(X[i : i + 4]) - Y[i : i + 4])
                ),
                model.trainable_variables,
            )
        return weights_and_slots(model, optimizer)

    # XLA in a tf.function, op by op eagerly.
    for train, jit_compile in ((tape_loop, True), (minimize, False)):
        theirs = train(tf_keras.optimizers.Adam(LR, jit_compile=False))
        ours = train(keras_adamw.tf_keras.Adam(LR, jit_compile=jit_compile))
        assert_all_close(ours, theirs)


def test_duplicate_sparse_ids_equal_the_reference():
    # tf_keras (unlike Keras 3) sums duplicates first too.
    ids = tf.constant([1, 2, 2, 5, 1, 1])
    init = RNG.randn(6, 3)
    targets = [RNG.randn(6, 3) for _ in range(3)]

    def run(optimizer):
        table = tf.Variable(init, dtype=tf.float32, name="table")
        gradients = []
        for target in targets:
            with tf.GradientTape() as tape:
                rows = tf.gather(table, ids)
                loss = tf.reduce_sum(rows * tf.constant(target, tf.float32))
            (gradient,) = tape.gradient(loss, [table])
            assert isinstance(gradient, tf.IndexedSlices)
            gradients.append(gradient)
            optimizer.apply_gradients([(gradient, table)])
        return table.numpy(), gradients

    ours, gradients = run(keras_adamw.tf_keras.AdamW(LR))
    theirs, _ = run(tf_keras.optimizers.AdamW(LR, jit_compile=False))
    reference = NumpyAdam([init], learning_rate=LR, weight_decay=0.004)
    for g in gradients:
        reference.step(
            [dense_from_sparse(g.indices.numpy(), g.values.numpy(), 6)]
        )
    np.testing.assert_allclose(ours, reference.weights[0], atol=1e-6)
    np.testing.assert_allclose(theirs, reference.weights[0], atol=1e-6)


def test_bfloat16_variables_are_updated_in_float32():
    init = RNG.randn(256)
    grads = [
        np.sign(RNG.randn(256)) * RNG.uniform(0.5, 3.0, 256) for _ in range(10)
    ]
    reference = NumpyAdam(
        [init], learning_rate=LR, weight_decay=0.004, dtype=ml_dtypes.bfloat16
    )
    for g in grads:
        reference.step([g])

    def error(optimizer):
        variable = tf.Variable(init, dtype=tf.bfloat16)
        for g in grads:
            optimizer.apply_gradients(
                [(tf.constant(g, tf.bfloat16), variable)]
            )
        assert variable.dtype == tf.bfloat16
        return np.abs(
            variable.numpy().astype(np.float64) - reference.weights[0]
        )

    ours = error(keras_adamw.tf_keras.AdamW(LR))
    theirs = error(tf_keras.optimizers.AdamW(LR, jit_compile=False))
    assert np.mean(ours > 0) < 0.1
    assert np.mean(theirs > 0) > 0.5


def _train(model, optimizer, steps, start=0):
    for i in range(start, start + steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.square(model(X[i : i + 4]) - Y[i : i + 4])
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))


def test_tf_keras_adamw_checkpoint_resumes_in_ours(tmp_path):
    kwargs = dict(learning_rate=LR, weight_decay=0.01, use_ema=True)
    # Uninterrupted: tf_keras for 10 steps.
    model = make_model()
    optimizer = tf_keras.optimizers.AdamW(jit_compile=False, **kwargs)
    _train(model, optimizer, 10)
    expected = weights_and_slots(model, optimizer)

    # tf_keras for 5 steps, saved; ours restored, 5 more steps.
    model = make_model()
    optimizer = tf_keras.optimizers.AdamW(jit_compile=False, **kwargs)
    _train(model, optimizer, 5)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    model = make_model(seed=7)
    ours = keras_adamw.tf_keras.AdamW(**kwargs)
    ours.build(model.trainable_variables)
    status = tf.train.Checkpoint(model=model, optimizer=ours).restore(path)
    status.assert_existing_objects_matched()
    assert int(ours.iterations.numpy()) == 5
    _train(model, ours, 5, start=5)
    assert_all_close(weights_and_slots(model, ours), expected)


def test_our_checkpoint_resumes_equal_to_uninterrupted(tmp_path):
    kwargs = dict(learning_rate=LR, amsgrad=True, use_ema=True)
    model = make_model()
    optimizer = keras_adamw.tf_keras.AdamW(**kwargs)
    _train(model, optimizer, 8)
    expected = weights_and_slots(model, optimizer)

    model = make_model()
    optimizer = keras_adamw.tf_keras.AdamW(**kwargs)
    _train(model, optimizer, 4)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    model = make_model(seed=7)
    optimizer = keras_adamw.tf_keras.AdamW(**kwargs)
    tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path)
    _train(model, optimizer, 4, start=4)  # Slots restored at build.
    assert_all_close(weights_and_slots(model, optimizer), expected)


@pytest.mark.parametrize("file_format", [".keras", "savedmodel", ".h5"])
def test_model_save_and_load_as_tf_keras_does(tmp_path, file_format):
    """Ours restores as `tf_keras.optimizers.AdamW` does: `.keras` and
    `.h5` resume where training stopped; tf_keras' SavedModel restores the
    weights and optimizer config but starts the optimizer afresh (its own
    AdamW too, measured with tf_keras 2.21)."""
    suffix = "" if file_format == "savedmodel" else file_format
    results = {}
    for name, optimizer in (
        ("theirs", tf_keras.optimizers.AdamW(LR, jit_compile=False)),
        ("ours", keras_adamw.tf_keras.AdamW(LR)),
    ):
        model = make_model()
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        model.save(str(tmp_path / name) + suffix)
        loaded = tf_keras.models.load_model(str(tmp_path / name) + suffix)
        assert type(loaded.optimizer) is type(optimizer)
        assert loaded.optimizer.get_config() == optimizer.get_config()
        for model_ in (model, loaded):
            model_.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        results[name] = weights_and_slots(loaded, loaded.optimizer)
        results[name + "_uninterrupted"] = weights_and_slots(model, optimizer)
    assert_all_close(results["ours"], results["theirs"])
    assert_all_close(
        results["ours_uninterrupted"], results["theirs_uninterrupted"]
    )
    if file_format != "savedmodel":
        assert_all_close(results["ours"], results["ours_uninterrupted"])


def test_model_saved_before_training_loads(tmp_path):
    model = make_model()
    model.compile(optimizer=keras_adamw.tf_keras.AdamW(LR), loss="mse")
    model.save(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="not loaded"):
        loaded = tf_keras.models.load_model(tmp_path / "model.keras")
    assert int(loaded.optimizer.iterations.numpy()) == 0
    loaded.fit(X, Y, batch_size=8, verbose=0)


def test_keras_3_and_tf_keras_optimizers_name_the_right_class():
    with pytest.raises(ValueError, match=r"keras_adamw\.tf_keras\.AdamW"):
        make_model().compile(optimizer=keras_adamw.AdamW(), loss="mse")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"use keras_adamw\.Adam>"):
        model.compile(optimizer=keras_adamw.tf_keras.Adam(), loss="mse")


def test_bad_arguments_raise_before_any_variable():
    with pytest.raises(ValueError, match="beta_1"):
        keras_adamw.tf_keras.Adam(beta_1=1.5)
    with pytest.raises(ValueError, match="Only one of"):
        keras_adamw.tf_keras.Adam(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        keras_adamw.tf_keras.AdamW(weight_decay=None)
    optimizer = keras_adamw.tf_keras.Adam()
    variable = tf.Variable([1.0])
    with pytest.raises(ValueError, match="shape"):
        optimizer.apply_gradients([(tf.ones([2]), variable)])
    assert not optimizer.variables[1:]


@pytest.fixture(scope="module", autouse=True)
def job_processes(tmp_path_factory):
    """Starts tests/jobs/tf_keras_job.py (import checks, MirroredStrategy)
    when the module starts, so it runs beside the tests above it."""
    out = tmp_path_factory.mktemp("tf_keras_job") / "results.json"
    with Processes(tmp_path_factory.mktemp("tf_keras_logs")) as processes:
        processes.start("tf_keras", "tf_keras_job", f"--out={out}")
        yield processes, out


@pytest.fixture(scope="module")
def job(job_processes):
    processes, out = job_processes
    processes.finish(["tf_keras"], timeout=600)
    return json.loads(out.read_text())


def test_importing_keras_adamw_leaves_tf_keras_out_and_explains(job):
    assert job["keras_adamw_imports_tf_keras"] is False
    assert "pip install keras_adamw[tf-keras]" in job["missing_tf_keras_error"]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_mirrored_strategy_equals_one_device(job, jit_compile):
    # Embedding ids repeat; global_clipnorm clips (right only after the
    # cross-replica sum); EMA on; every replica's copy compared.
    result = job[f"mirrored/jit={jit_compile}"]
    assert result["steps"] == 6 and result["copies"] == [2]
    assert result["max_difference"] < 1e-6
