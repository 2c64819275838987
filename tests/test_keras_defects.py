"""Where Keras 3 is wrong, keras_adamw is right: each test shows both.

The float64 NumPy reference (tests/reference.py) decides what is right.
"""

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

LR = float(np.float32(1e-3))


@pytest.mark.parametrize("jit_compile", [True, False])
def test_duplicate_sparse_indices_equal_the_dense_result(
    jit_compile, train_table
):
    # What an Embedding gives when an id repeats in a batch.
    rng = np.random.RandomState(0)
    init = rng.randn(6, 3)
    ids = [1, 2, 2, 5, 1, 1]
    steps = [(ids, rng.randn(len(ids), 3)) for _ in range(3)]

    ours = train_table(
        keras_adamw.AdamW(jit_compile=jit_compile),
        steps,
        sparse=True,
        init=init,
    )
    ours_dense = train_table(
        keras_adamw.AdamW(jit_compile=jit_compile),
        steps,
        sparse=False,
        init=init,
    )
    np.testing.assert_array_equal(ours, ours_dense)

    ref = NumpyAdam([init], learning_rate=LR, weight_decay=0.004)
    for indices, values in steps:
        ref.step([dense_from_sparse(indices, values, 6)])
    np.testing.assert_allclose(ours, ref.weights[0], rtol=1e-6, atol=1e-7)

    # Keras 3 squares each duplicate separately: far off the dense result.
    keras_sparse = train_table(
        keras.optimizers.AdamW(), steps, sparse=True, init=init
    )
    update = np.abs(ref.weights[0] - init).max()
    assert np.abs(keras_sparse - ref.weights[0]).max() > 0.1 * update


def test_embedding_layer_with_repeated_ids_matches_dense_reference():
    ids = np.array([[1, 2, 2, 5, 1, 1]])
    keras.utils.set_random_seed(0)
    embedding = keras.layers.Embedding(8, 4)
    embedding.build((None, 6))
    init = embedding.embeddings.numpy().astype(np.float64)
    optimizer = keras_adamw.AdamW()
    target = np.arange(24, dtype=np.float32).reshape(1, 6, 4) / 24.0
    ref = NumpyAdam([init], learning_rate=LR, weight_decay=0.004)
    for _ in range(3):
        with tf.GradientTape() as tape:
            out = embedding(ids)
            loss = tf.reduce_sum(tf.square(out - target))
        (gradient,) = tape.gradient(loss, embedding.trainable_variables)
        assert isinstance(gradient, tf.IndexedSlices)
        ref.step([tf.convert_to_tensor(gradient).numpy().astype(np.float64)])
        optimizer.apply([gradient], embedding.trainable_variables)
    np.testing.assert_allclose(
        embedding.embeddings.numpy(), ref.weights[0], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    "dtype,np_dtype",
    [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)],
)
def test_half_precision_is_computed_in_float32_and_stored_once(
    dtype, np_dtype
):
    rng = np.random.RandomState(0)
    init = rng.randn(256)
    # Gradients of at least 0.5 keep velocity clear of float16's underflow.
    grads = [
        np.sign(rng.randn(256)) * rng.uniform(0.5, 3.0, 256) for _ in range(10)
    ]
    lr = float(np.float32(0.01))

    # The reference rounds what is stored (weights, moments) to the dtype.
    ref = NumpyAdam(
        [init], learning_rate=lr, weight_decay=0.004, dtype=np_dtype
    )
    for g in grads:
        ref.step([g])
    w = ref.weights[0]

    def run(optimizer):
        variable = keras.Variable(init, dtype=dtype)
        for g in grads:
            optimizer.apply([tf.constant(g, dtype)], [variable])
        assert variable.dtype == dtype
        return variable.numpy().astype(np.float64)

    # Computing in float32 rather than float64 flips a rounding now and
    # then; computing in half precision (Keras 3) changes most results.
    ours_error = np.abs(run(keras_adamw.AdamW(learning_rate=0.01)) - w)
    keras_error = np.abs(run(keras.optimizers.AdamW(learning_rate=0.01)) - w)
    assert np.mean(ours_error > 0) < 0.1
    assert np.mean(keras_error > 0) > 0.5
    assert 4 * ours_error.max() < keras_error.max()


def test_exclude_from_weight_decay_matches_paths():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, name="decayed"),
            keras.layers.Dense(2, name="excluded"),
        ]
    )
    initial = [v.numpy() for v in model.trainable_variables]

    def zero_gradient_step(optimizer):
        for v, w in zip(model.trainable_variables, initial):
            v.assign(w)
        optimizer.exclude_from_weight_decay(var_names=["excluded"])
        zeros = [tf.zeros_like(v) for v in model.trainable_variables]
        optimizer.apply(zeros, model.trainable_variables)
        # With a zero gradient only weight decay moves a variable.
        return {
            "/".join(v.path.split("/")[-2:]): not np.array_equal(v.numpy(), w)
            for v, w in zip(model.trainable_variables, initial)
        }

    moved = zero_gradient_step(keras_adamw.AdamW(weight_decay=0.5))
    assert moved == {
        "decayed/kernel": True,
        "decayed/bias": False,
        "excluded/kernel": False,
        "excluded/bias": False,
    }
    # Keras 3 on TensorFlow matches the `tf.Variable` name, which holds the
    # path, so it agrees here; on a plain `keras.Variable.name` it would not.
    assert (
        zero_gradient_step(keras.optimizers.AdamW(weight_decay=0.5)) == moved
    )


def test_exclude_from_weight_decay_survives_the_config():
    variable = keras.Variable([1.0], name="bias")
    ours = keras_adamw.AdamW(weight_decay=0.5, learning_rate=0.5)
    theirs = keras.optimizers.AdamW(weight_decay=0.5, learning_rate=0.5)
    for optimizer in (ours, theirs):
        optimizer.exclude_from_weight_decay(var_names=["bias"])

    def decays(optimizer):
        # A reloaded optimizer (as from a `.keras` file), one zero-gradient
        # step: only weight decay could move the variable.
        clone = type(optimizer).from_config(optimizer.get_config())
        variable.assign([1.0])
        clone.apply([tf.zeros([1])], [variable])
        return not np.array_equal(variable.numpy(), [1.0])

    assert not decays(ours)
    # Keras 3 saves no exclusions: the reloaded optimizer decays the bias.
    assert decays(theirs)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_ema_moves_once_per_real_step_under_accumulation(jit_compile):
    rng = np.random.RandomState(3)
    init = rng.randn(4)
    grads = [rng.randn(4) for _ in range(9)]
    kwargs = dict(
        use_ema=True,
        ema_momentum=0.5,
        gradient_accumulation_steps=3,
        learning_rate=0.125,
    )

    def run(optimizer):
        variable = keras.Variable(init, dtype="float64")
        for g in grads:
            optimizer.apply([tf.constant(g)], [variable])
        return optimizer._model_variables_moving_average[0].numpy()

    ref = NumpyAdam([init], weight_decay=0.004, **kwargs)
    for g in grads:
        ref.step([g])
    ours = run(keras_adamw.AdamW(jit_compile=jit_compile, **kwargs))
    np.testing.assert_allclose(ours, ref.averages[0], rtol=1e-10)
    theirs = run(keras.optimizers.AdamW(**kwargs))
    assert np.abs(theirs - ref.averages[0]).max() > 1e-3


def test_more_gradients_than_variables_is_an_error():
    variable = keras.Variable([1.0, 2.0], name="w")
    optimizer = keras_adamw.Adam()
    with pytest.raises(ValueError, match="2 gradients for 1 variables"):
        optimizer.apply([tf.ones([2]), tf.ones([2])], [variable])
    assert not optimizer.built
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0])
    # Keras 3 zips the lists and drops the extra gradient.
    keras.optimizers.Adam().apply([tf.ones([2]), tf.ones([2])], [variable])
