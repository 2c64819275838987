"""Nothing silently wrong, no partial state (the reliability issue).

Each test would fail on keras_adamw before the fix it names; expected
values come from the float64 NumPy reference (tests/reference.py).
"""

import gc

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import execution
from tests.reference import NumpyAdam


def snapshot(optimizer, variables):
    return [np.array(v.numpy()) for v in list(variables) + optimizer.variables]


def assert_unchanged(before, optimizer, variables):
    after = snapshot(optimizer, variables)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# 1. Repeated sparse indices are summed in the compute dtype.
@pytest.mark.parametrize(
    "dtype, repeats",
    [("bfloat16", 1000), ("float16", 3000), ("float32", 1000)],
)
@pytest.mark.parametrize("jit_compile", [True, False])
def test_repeated_sparse_rows_sum_in_float32_and_equal_dense(
    dtype, repeats, jit_compile
):
    def train(sparse):
        table = keras.Variable(np.zeros((4, 2)), dtype=dtype, name="table")
        optimizer = keras_adamw.Adam(
            learning_rate=0.01, jit_compile=jit_compile
        )
        if sparse:
            gradient = tf.IndexedSlices(
                tf.ones([repeats, 2], dtype),
                tf.fill([repeats], 1),
                tf.constant([4, 2]),
            )
        else:
            gradient = tf.constant(
                [[0, 0], [repeats, repeats], [0, 0], [0, 0]], dtype
            )
        optimizer.apply([gradient], [table])
        return table.numpy(), optimizer._momentums[0].numpy()

    sparse_table, sparse_momentum = train(sparse=True)
    dense_table, dense_momentum = train(sparse=False)
    np.testing.assert_array_equal(sparse_table, dense_table)
    np.testing.assert_array_equal(sparse_momentum, dense_momentum)
    # momentum = (1 - beta_1) * sum of the repeats, rounded once to dtype.
    np.testing.assert_allclose(
        sparse_momentum[1].astype(np.float64), [0.1 * repeats] * 2, rtol=1e-2
    )


# 2. float64 variables keep float64 numbers.
@pytest.mark.parametrize("jit_compile", [True, False])
def test_float64_with_a_float_learning_rate_equals_the_reference(jit_compile):
    rng = np.random.RandomState(0)
    init = [rng.randn(3, 2), rng.randn(2)]
    grads = [[rng.randn(3, 2), rng.randn(2)] for _ in range(12)]
    variables = [keras.Variable(w, dtype="float64") for w in init]
    optimizer = keras_adamw.AdamW(
        learning_rate=0.1, weight_decay=0.01, jit_compile=jit_compile
    )
    reference = NumpyAdam(init, learning_rate=0.1, weight_decay=0.01)
    for step, step_grads in enumerate(grads):
        if step == 6:  # Changing it keeps it exact too.
            optimizer.learning_rate = 0.03
            reference.learning_rate = 0.03
        optimizer.apply([tf.constant(g) for g in step_grads], variables)
        reference.step(step_grads)
    for ours, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(
            ours.numpy(), expected, rtol=1e-12, atol=1e-12
        )


def test_global_clipnorm_over_mixed_dtypes_is_float64_exact():
    rng = np.random.RandomState(1)
    init = [rng.randn(4), rng.randn(3)]
    grads = [[rng.randn(4) * 3, rng.randn(3) * 3] for _ in range(10)]
    variables = [
        keras.Variable(init[0], dtype="float64"),
        keras.Variable(init[1], dtype="float32"),
    ]
    optimizer = keras_adamw.Adam(learning_rate=2.0**-6, global_clipnorm=1.0)
    # The float32 gradient is exactly what the reference sees.
    grads = [[g[0], g[1].astype(np.float32).astype(np.float64)] for g in grads]
    reference = NumpyAdam(init, learning_rate=2.0**-6, global_clipnorm=1.0)
    reference.weights[1] = init[1].astype(np.float32).astype(np.float64)
    for step_grads in grads:
        optimizer.apply(
            [
                tf.constant(step_grads[0]),
                tf.constant(step_grads[1], tf.float32),
            ],
            variables,
        )
        reference.step(step_grads)
    np.testing.assert_allclose(
        variables[0].numpy(), reference.weights[0], rtol=1e-12, atol=1e-12
    )


# 4. No partial state.
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("bad", ["schedule", "beta"])
def test_a_bad_value_computed_inside_tf_function_changes_nothing(
    jit_compile, bad
):
    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            # NaN from the third call on.
            return tf.where(step < 2, 0.01, np.nan)

    kwargs = {"learning_rate": Schedule()} if bad == "schedule" else {}
    flag = tf.Variable(0.9)
    if bad == "beta":
        kwargs["beta_1"] = lambda: tf.convert_to_tensor(flag)
    optimizer = keras_adamw.AdamW(jit_compile=jit_compile, **kwargs)
    variables = [keras.Variable([1.0, 2.0]), keras.Variable([3.0])]

    @tf.function
    def train_step():
        optimizer.apply([tf.ones([2]), tf.ones([1])], variables)

    train_step()
    train_step()
    if bad == "beta":
        flag.assign(1.5)
    before = snapshot(optimizer, variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        train_step()
    assert_unchanged(before, optimizer, variables)


# 5. Bad gradients and targets: a clear error before any write.
@pytest.mark.parametrize("index", [-1, 4])
@pytest.mark.parametrize("in_function", [False, True])
def test_sparse_index_out_of_range_is_refused(index, in_function):
    table = keras.Variable(np.ones((4, 2)), dtype="float32", name="table")
    other = keras.Variable([1.0], name="other")
    optimizer = keras_adamw.AdamW(jit_compile=False)
    optimizer.build([table, other])
    before = snapshot(optimizer, [table, other])

    def apply(indices):
        optimizer.apply(
            [
                tf.IndexedSlices(
                    tf.ones([2, 2]), indices, tf.constant([4, 2])
                ),
                tf.ones([1]),
            ],
            [table, other],
        )

    if in_function:  # Indices known only when the step runs.
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="outside its rows"
        ):
            tf.function(apply)(tf.constant([0, index]))
    else:
        with pytest.raises(ValueError, match=rf"\[{index}\] outside its rows"):
            apply(tf.constant([0, index]))
    assert_unchanged(before, optimizer, [table, other])


def test_the_same_variable_twice_is_refused():
    w = keras.Variable([1.0], name="w")
    optimizer = keras_adamw.Adam()
    with pytest.raises(ValueError, match="'w' appears twice"):
        optimizer.apply([tf.ones([1]), tf.ones([1])], [w, w])
    assert not optimizer.built and int(optimizer.iterations) == 0


@pytest.mark.parametrize("target", [tf.constant([1.0]), np.ones(1)])
def test_a_tensor_or_array_target_is_refused(target):
    with pytest.raises(TypeError, match="updates variables"):
        keras_adamw.Adam().apply([tf.ones([1])], [target])


def test_swapped_pairs_are_named():
    w = tf.Variable([1.0], name="w")
    with pytest.raises(TypeError, match="'w:0' where a gradient belongs"):
        keras_adamw.Adam().apply_gradients([(w, tf.ones([1]))])


def test_update_step_on_an_unknown_variable_is_refused():
    optimizer = keras_adamw.Adam()
    optimizer.build([keras.Variable([1.0])])
    with pytest.raises(ValueError, match="Unknown variable 'stranger'"):
        optimizer.update_step(
            tf.ones([1]), keras.Variable([1.0], name="stranger"), 0.1
        )


def test_a_string_hyperparameter_after_build_is_refused():
    w = keras.Variable([1.0])
    optimizer = keras_adamw.Adam()
    optimizer.apply([tf.ones([1])], [w])
    with pytest.raises(TypeError, match="epsilon='small'"):
        optimizer.epsilon = "small"
    optimizer.apply([tf.ones([1])], [w])  # Still works.


# 6. One optimizer, several models, gradient accumulation.
def test_accumulation_over_two_models_is_refused():
    a, b = keras.Variable([1.0], name="a"), keras.Variable([1.0], name="b")
    optimizer = keras_adamw.Adam(gradient_accumulation_steps=2)
    optimizer.build([a, b])
    before = snapshot(optimizer, [a, b])
    with pytest.raises(ValueError, match=r"leaves out \['b'\]"):
        optimizer.apply([tf.ones([1])], [a])
    assert_unchanged(before, optimizer, [a, b])
    optimizer.apply([tf.ones([1]), None], [a, b])  # All of them: fine.


# 7. A tf.Variable learning rate is tracked, not copied.
@pytest.mark.parametrize("jit_compile", [True, False])
def test_a_tf_variable_learning_rate_is_followed(jit_compile):
    rate = tf.Variable(0.1)
    optimizer = keras_adamw.Adam(learning_rate=rate, jit_compile=jit_compile)
    w = keras.Variable([1.0])
    optimizer.apply([tf.ones([1])], [w])
    rate.assign(0.0)
    moved = w.numpy().copy()
    optimizer.apply([tf.ones([1])], [w])
    np.testing.assert_array_equal(w.numpy(), moved)
    assert float(optimizer.learning_rate) == 0.0
    assert optimizer.get_config()["learning_rate"] == 0.0


# 9. The step counter cannot wrap.
def test_the_step_counter_cannot_wrap():
    w = keras.Variable([1.0])
    optimizer = keras_adamw.Adam()
    optimizer.build([w])
    optimizer.iterations.assign(np.iinfo(np.int64).max)
    before = snapshot(optimizer, [w])
    with pytest.raises(ValueError, match="largest value"):
        optimizer.apply([tf.ones([1])], [w])
    assert_unchanged(before, optimizer, [w])
    with pytest.raises(tf.errors.InvalidArgumentError, match="largest value"):
        tf.function(lambda: optimizer.apply([tf.ones([1])], [w]))()
    assert_unchanged(before, optimizer, [w])


del ml_dtypes


# 4. Restoring state: every entry is checked before any is written.
@pytest.mark.parametrize("how", ["set_weights", "load_own_variables"])
@pytest.mark.parametrize("bad", ["shape", "dtype", "nan_rate", "string"])
def test_restoring_checks_every_entry_before_writing_any(how, bad):
    w = keras.Variable([1.0, 2.0])
    optimizer = keras_adamw.AdamW(amsgrad=True)
    optimizer.apply([tf.ones([2])], [w])
    before = snapshot(optimizer, [w])
    values = [np.array(v.numpy()) + 1 for v in optimizer.variables]
    # The bad entry is the last one (or the rate, which comes second).
    if bad == "shape":
        values[-1] = np.zeros(3, np.float32)
    elif bad == "dtype":
        values[0] = np.float32(3.5)  # A fraction for the step counter.
    elif bad == "nan_rate":
        values[1] = np.float32("nan")
    else:
        values[-1] = np.array(["x", "y"])
    with pytest.raises(ValueError, match="Optimizer variable"):
        if how == "set_weights":
            optimizer.set_weights(values)
        else:
            optimizer.load_own_variables(
                {str(i): v for i, v in enumerate(values)}
            )
    assert_unchanged(before, optimizer, [w])


# The garbage collector is held off while a step is built and run
# (execution.collector_paused), and always given back.
@pytest.mark.parametrize("shell", ["keras", "tf_keras"])
def test_the_collector_is_paused_during_a_step_and_restored(
    shell, monkeypatch
):
    seen = []
    run = execution.Programs.run

    def recording_run(self, *arguments, **options):
        seen.append(gc.isenabled())
        return run(self, *arguments, **options)

    monkeypatch.setattr(execution.Programs, "run", recording_run)
    if shell == "keras":
        variable = keras.Variable([1.0, 2.0])
        optimizer = keras_adamw.AdamW(learning_rate=0.1)

        def apply(gradient):
            optimizer.apply([gradient], [variable])

    else:
        import tf_keras

        from keras_adamw import tf_keras as adamw_tf_keras

        variable = tf_keras.backend.variable([1.0, 2.0])
        optimizer = adamw_tf_keras.AdamW(learning_rate=0.1)

        def apply(gradient):
            optimizer.apply_gradients([(gradient, variable)])

    assert gc.isenabled()
    apply(tf.constant([1.0, 1.0]))
    assert seen and not any(seen), seen
    assert gc.isenabled()
    # A step that raises gives the collector back too.
    with pytest.raises(ValueError):
        apply(tf.constant([1.0, 1.0, 1.0]))
    assert gc.isenabled()
    # A caller that disabled it keeps it disabled.
    gc.disable()
    try:
        apply(tf.constant([1.0, 1.0]))
        assert not gc.isenabled()
    finally:
        gc.enable()
