"""`skip_nonfinite=True`: a step with a NaN or Inf gradient changes
nothing but `skipped_steps`, which is saved, restored and logged; under
`keras.optimizers.LossScaleOptimizer` Keras skips such steps first.
(Against the float64 reference, with XLA on and off, eagerly and in a
`tf.function`: tests/test_precision.py; under MirroredStrategy and on a
mesh: tests/test_precision.py and tests/test_precision_mesh.py.)"""

import keras
import numpy as np
import tensorflow as tf

import keras_adamw


def optimizer_state(optimizer, variables):
    return [v.numpy().copy() for v in optimizer.variables + variables]


def test_a_nonfinite_step_changes_nothing_but_the_counter():
    variables = [keras.Variable(np.ones((3, 2)), name="w")]
    optimizer = keras_adamw.AdamW(
        skip_nonfinite=True,
        use_ema=True,
        gradient_accumulation_steps=2,
        global_clipnorm=1.0,
    )
    good = tf.ones((3, 2))
    optimizer.apply([good], variables)  # Accumulated, not yet applied.
    before = optimizer_state(optimizer, variables)
    for bad in (np.nan, np.inf, -np.inf):
        gradient = tf.tensor_scatter_nd_update(good, [[1, 1]], [bad])
        optimizer.apply([gradient], variables)
    after = optimizer_state(optimizer, variables)
    counter = [v.name for v in optimizer.variables].index("skipped_steps")
    for i, (old, new) in enumerate(zip(before, after)):
        if i != counter:
            np.testing.assert_array_equal(old, new)  # Bit-identical.
    assert int(optimizer.skipped_steps.numpy()) == 3
    optimizer.apply([good], variables)  # Training goes on.
    assert int(optimizer.iterations.numpy()) == 1
    assert not np.array_equal(variables[0].numpy(), before[-1])


def model_with_skipped_steps():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    optimizer = keras_adamw.AdamW(skip_nonfinite=True)
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)
    nan = [tf.fill(v.shape, np.nan) for v in model.trainable_variables]
    optimizer.apply(nan, model.trainable_variables)
    optimizer.apply(nan, model.trainable_variables)
    return model, optimizer


def test_skipped_steps_survive_keras_file_and_checkpoint(tmp_path):
    model, optimizer = model_with_skipped_steps()
    assert int(optimizer.skipped_steps.numpy()) == 2
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert int(loaded.optimizer.skipped_steps.numpy()) == 2
    checkpoint = tf.train.Checkpoint(optimizer=optimizer)
    path = checkpoint.save(tmp_path / "ckpt")
    other, other_optimizer = model_with_skipped_steps()
    other_optimizer.skipped_steps.assign(7)
    tf.train.Checkpoint(optimizer=other_optimizer).restore(path)
    assert int(other_optimizer.skipped_steps.numpy()) == 2


def test_optimizer_logger_logs_skipped_steps():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adamw.AdamW(skip_nonfinite=True), loss="mse")
    x = np.ones((8, 2), "float32")
    y = np.ones((8, 1), "float32")
    y[:4] = np.nan  # The first batch's loss and gradients are NaN.
    history = model.fit(
        x,
        y,
        batch_size=4,
        shuffle=False,
        verbose=0,
        callbacks=[keras_adamw.OptimizerLogger()],
    )
    assert history.history["skipped_steps"] == [1]
    assert int(model.optimizer.iterations.numpy()) == 1
    assert np.all(np.isfinite(model.get_weights()[0]))


def test_under_loss_scale_optimizer_keras_skips_first():
    """LossScaleOptimizer skips a non-finite step itself (and lowers its
    scale) before the inner optimizer sees it: skipped_steps stays 0, no
    double counting; the inner optimizer counts what reaches it."""
    weights = [keras.Variable(np.ones(2), name="w")]
    inner = keras_adamw.AdamW(skip_nonfinite=True)
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    optimizer.build(weights)
    scale = float(optimizer.dynamic_scale.numpy())
    optimizer.apply([tf.constant([np.nan, 1.0])], weights)
    assert float(optimizer.dynamic_scale.numpy()) == scale / 2
    assert int(inner.skipped_steps.numpy()) == 0
    assert int(inner.iterations.numpy()) == 0
    np.testing.assert_array_equal(weights[0].numpy(), [1.0, 1.0])
    optimizer.apply([tf.constant([scale, scale]) / 2], weights)
    assert int(inner.iterations.numpy()) == 1
    assert int(inner.skipped_steps.numpy()) == 0


def test_mixed_float16_fit_skips_in_loss_scale_optimizer_only():
    """Under the mixed_float16 policy `compile` wraps the optimizer in a
    LossScaleOptimizer, which skips the NaN batch itself."""
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        inner = keras_adamw.AdamW(skip_nonfinite=True)
        model.compile(optimizer=inner, loss="mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # Small inputs and targets: the finite batch's gradients, scaled by
    # the initial loss scale (2**15), stay within float16.
    x = np.full((8, 2), 0.01, "float32")
    y = np.zeros((8, 1), "float32")
    y[:4] = np.nan
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert int(inner.skipped_steps.numpy()) == 0
    assert int(inner.iterations.numpy()) == 1
    assert np.all(np.isfinite(model.get_weights()[0]))
