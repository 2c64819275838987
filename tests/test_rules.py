"""Per-variable rules, weight-decay schedules and modes, explain():
numbers against the float64 reference, checks, and configs.

The mesh and MirroredStrategy cases are in tests/test_dtensor.py and
tests/test_distribute.py; training, saving and explain() on a model in
tests/test_rules_training.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import step as step_lib
from tests import graphs
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

NAMES = ["dense/kernel", "dense/bias", "embedding/embeddings", "norm/gamma"]
SHAPES = [(3, 2), (2,), (5, 2), (2,)]
RULES = [
    ("bias|norm", {"weight_decay": 0.0}),
    ("^embedding/", {"learning_rate_multiplier": 0.25, "beta_1": 0.5}),
    ("dense", {"learning_rate_multiplier": 2.0, "epsilon": 1e-3}),
    ("norm", {"beta_2": 0.9, "weight_decay": 0.5}),  # Decay comes from 0.
]
# The same rules, resolved by hand for the reference.
PER_VARIABLE = [
    {"learning_rate_multiplier": 2.0, "epsilon": 1e-3},
    {"weight_decay": 0.0, "learning_rate_multiplier": 2.0, "epsilon": 1e-3},
    {"learning_rate_multiplier": 0.25, "beta_1": 0.5},
    {"weight_decay": 0.0, "beta_2": 0.9},
]
STEPS = 10
IDS = [[0, 3, 3], [1, 1, 4], [2, 0, 0]]


def make_variables(dtype, init):
    variables = []
    for name, value in zip(NAMES, init):
        layer, short = name.split("/")
        with keras.name_scope(layer):
            variables.append(keras.Variable(value, dtype=dtype, name=short))
    assert [v.path for v in variables] == NAMES
    return variables


def make_problem(seed=0):
    rng = np.random.RandomState(seed)
    init = [rng.randn(*s) for s in SHAPES]
    grads = []
    for step in range(STEPS):
        dense = [rng.randn(*s) * [0.1, 2.0, 0.5][step % 3] for s in SHAPES]
        ids = IDS[step % 3]
        dense[2] = (ids, rng.randn(len(ids), 2))  # Sparse, repeated ids.
        grads.append(dense)
    return init, grads


def as_tensors(step_grads, dtype, sparse):
    tensors = []
    for i, g in enumerate(step_grads):
        if i == 2:
            ids, values = g
            if sparse:
                tensors.append(
                    tf.IndexedSlices(
                        tf.constant(values, dtype),
                        tf.constant(ids),
                        tf.constant([5, 2]),
                    )
                )
                continue
            g = dense_from_sparse(ids, values, 5)
        tensors.append(tf.constant(g, dtype))
    return tensors


def as_dense(step_grads):
    return [
        dense_from_sparse(*g, 5) if i == 2 else g
        for i, g in enumerate(step_grads)
    ]


SCHEDULE = keras.optimizers.schedules.ExponentialDecay(
    2.0**-5, decay_steps=3, decay_rate=0.5, staircase=True
)  # Powers of two: exact in float32, so float64 can be compared at 1e-10.


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("decay_mode", ["lr_scaled", "independent"])
@pytest.mark.parametrize(
    "jit_compile,fused,in_function,sparse",
    [
        (True, False, True, True),  # XLA
        (False, False, False, True),  # op by op
        # The fused kernel where it runs ("lr_scaled"), else XLA.
        (True, None, False, False),
    ],
)
def test_rules_schedule_and_mode_equal_reference(
    dtype, decay_mode, jit_compile, fused, in_function, sparse
):
    init, grads = make_problem()
    variables = make_variables(dtype, init)
    optimizer = keras_adamw.AdamW(
        learning_rate=0.01,
        weight_decay=SCHEDULE,
        weight_decay_mode=decay_mode,
        variable_rules=RULES,
        jit_compile=jit_compile,
        fused=fused,
    )

    def apply(gradients):
        optimizer.apply(gradients, variables)

    if in_function:
        apply = tf.function(apply)
    for step_grads in grads:
        apply(as_tensors(step_grads, dtype, sparse))
    ref = NumpyAdam(
        init,
        learning_rate=0.01,
        weight_decay=lambda calls: 2.0**-5 * 0.5 ** (calls // 3),
        weight_decay_mode=decay_mode,
        per_variable=PER_VARIABLE,
    )
    for step_grads in grads:
        ref.step(as_dense(step_grads))
    tolerance = 1e-10 if dtype == "float64" else 2e-5
    for variable, expected, name in zip(variables, ref.weights, NAMES):
        scale = max(1.0, np.abs(expected).max())
        difference = np.abs(variable.numpy() - expected).max() / scale
        assert difference < tolerance, (name, difference)
    # Without the rules the numbers differ clearly (the test can fail).
    plain = NumpyAdam(init, learning_rate=0.01, weight_decay=2.0**-5)
    for step_grads in grads:
        plain.step(as_dense(step_grads))
    assert np.abs(variables[2].numpy() - plain.weights[2]).max() > 1e-3


def test_first_matching_rule_sets_each_override():
    rules = keras_adamw.rules.check_rules(RULES)
    for name, expected in zip(NAMES, PER_VARIABLE):
        with keras.name_scope(name.split("/")[0]):
            variable = keras.Variable(1.0, name=name.split("/")[1])
        settings, _ = keras_adamw.rules.match(rules, variable)
        given = {k: v for k, v in settings._asdict().items() if v is not None}
        given.setdefault("learning_rate_multiplier", 1.0)
        expected = dict(expected)
        expected.setdefault("learning_rate_multiplier", 1.0)
        assert given == expected, name


@pytest.mark.parametrize(
    "rules,error,match",
    [
        ("bias", TypeError, "list of .pattern, overrides"),
        ([("bias",)], TypeError, r"variable_rules\[0\].*pair"),
        ([(3, {})], TypeError, r"variable_rules\[0\].*pattern must be"),
        ([("(", {})], ValueError, r"variable_rules\[0\].*regular expression"),
        ([("a", [1])], TypeError, r"variable_rules\[0\].*must be a dict"),
        ([("a", {}), ("b", {"lr": 1.0})], ValueError, r"\[1\].*'lr'"),
        (
            [("a", {"learning_rate_multiplier": -1.0})],
            ValueError,
            r"\[0\].*learning_rate_multiplier.*-1.0",
        ),
        ([("a", {"beta_1": 1.0})], ValueError, r"\[0\].*beta_1"),
        ([("a", {"weight_decay": "x"})], TypeError, r"\[0\].*weight_decay"),
    ],
)
def test_bad_rules_raise_naming_the_rule(rules, error, match):
    with pytest.raises(error, match=match):
        keras_adamw.AdamW(variable_rules=rules)
    optimizer = keras_adamw.AdamW()
    with pytest.raises(error, match=match):
        optimizer.variable_rules = rules
    assert optimizer.variable_rules == ()


def test_bad_weight_decay_and_mode_raise():
    with pytest.raises(ValueError, match="weight_decay_mode.*'scaled'"):
        keras_adamw.AdamW(weight_decay_mode="scaled")
    with pytest.raises(ValueError, match="weight_decay.*-1"):
        keras_adamw.AdamW(weight_decay=-1.0)
    optimizer = keras_adamw.AdamW(weight_decay=lambda: -0.5)
    w = keras.Variable([1.0])
    with pytest.raises(Exception, match="weight_decay"):
        optimizer.apply([tf.ones([1])], [w])
    assert w.numpy() == 1.0 and int(optimizer.iterations) == 0


def test_config_round_trips_rules_schedule_and_mode():
    optimizer = keras_adamw.AdamW(
        weight_decay=SCHEDULE,
        weight_decay_mode="independent",
        variable_rules=RULES,
    )
    optimizer.exclude_from_weight_decay(var_names=["gamma"])
    config = optimizer.get_config()
    assert config["variable_rules"][0] == ["gamma", {"weight_decay": 0.0}]
    for restored in (
        keras_adamw.AdamW.from_config(config),
        keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)),
    ):
        assert restored.variable_rules == optimizer.variable_rules
        assert restored.weight_decay_mode == "independent"
        assert restored.weight_decay.get_config() == SCHEDULE.get_config()


def test_callable_weight_decay_is_refused_by_get_config():
    optimizer = keras_adamw.AdamW(weight_decay=lambda: 0.01)
    with pytest.raises(ValueError, match="cannot save `weight_decay`"):
        optimizer.get_config()


@pytest.mark.parametrize("fused", [False, True])
def test_rules_and_schedule_trace_the_step_program_once(fused):
    init, grads = make_problem()
    variables = make_variables("float32", init)
    optimizer = keras_adamw.AdamW(
        weight_decay=SCHEDULE, variable_rules=RULES * 2, fused=fused
    )
    optimizer.build(variables)

    @tf.function
    def apply(gradients):
        optimizer.apply(gradients, variables)

    for step_grads in grads:
        apply(as_tensors(step_grads, "float32", True))
    assert apply.experimental_get_tracing_count() == 1
    if fused:  # Built into the caller's graph, once.
        assert graphs.kernel_calls(apply) == 1
    else:
        programs = optimizer._programs.value
        made = programs.compiled(step_lib.apply_step)
        assert made.experimental_get_tracing_count() == 1


def test_explain_before_build_and_after():
    init, _ = make_problem()
    variables = make_variables("float32", init)
    optimizer = keras_adamw.AdamW(
        learning_rate=0.01, weight_decay=0.1, variable_rules=RULES
    )
    with pytest.raises(ValueError, match="not built; pass the variables"):
        optimizer.explain()
    before = optimizer.explain(variables)
    optimizer.build(variables)
    after = optimizer.explain()
    assert before == after
    rows = {row.path: row for row in after}
    assert rows["dense/kernel"].learning_rate == pytest.approx(0.02)
    assert rows["dense/kernel"].decay_per_step == pytest.approx(0.002)
    assert rows["dense/bias"].weight_decay == 0.0
    assert rows["dense/bias"].rules == ("bias|norm", "dense")
    assert rows["embedding/embeddings"].beta_1 == 0.5
    assert rows["norm/gamma"].beta_2 == 0.9
    assert rows["norm/gamma"].slot_dtype == "float32"
    assert rows["norm/gamma"].layout is None
    text = str(after)
    assert text.splitlines()[0].split()[:3] == ["path", "shape", "dtype"]
    assert len(text.splitlines()) == 1 + len(NAMES)


def test_explain_shows_the_scheduled_decay_of_the_coming_step():
    optimizer = keras_adamw.AdamW(
        learning_rate=0.5, weight_decay=SCHEDULE, weight_decay_mode="lr_scaled"
    )
    w = keras.Variable([1.0], name="w")
    for _ in range(3):
        optimizer.apply([tf.zeros([1])], [w])
    (row,) = optimizer.explain()
    assert row.weight_decay == 2.0**-6  # The schedule at step 3.
    assert row.decay_per_step == 2.0**-7
    # A zero gradient moves the variable by weight decay only.
    before = w.numpy()[0]
    optimizer.apply([tf.zeros([1])], [w])
    assert w.numpy()[0] == pytest.approx(before * (1 - 2.0**-7), rel=1e-7)


def test_adam_variable_with_a_decay_rule_decays():
    optimizer = keras_adamw.Adam(
        learning_rate=0.5, variable_rules=[("w", {"weight_decay": 0.5})]
    )
    w = keras.Variable([2.0], name="w")
    v = keras.Variable([2.0], name="v")
    optimizer.apply([tf.zeros([1]), tf.zeros([1])], [w, v])
    assert w.numpy()[0] == pytest.approx(1.5)
    assert v.numpy()[0] == 2.0


def test_logger_logs_the_scheduled_effective_decay():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras_adamw.AdamW(learning_rate=0.5, weight_decay=SCHEDULE),
        loss="mse",
    )
    history = model.fit(
        np.ones((4, 2)),
        np.ones((4, 1)),
        batch_size=2,
        epochs=3,
        verbose=0,
        callbacks=[keras_adamw.OptimizerLogger()],
    )
    # Two steps per epoch: the decay of steps 2, 4 and 6.
    decays = [2.0**-5 * 0.5 ** (s // 3) for s in (2, 4, 6)]
    assert history.history["weight_decay"] == pytest.approx(decays)
    assert history.history["effective_weight_decay"] == pytest.approx(
        [0.5 * d for d in decays]
    )


def test_moment_dtype_rule_gives_one_variable_bfloat16_moments():
    import ml_dtypes

    rng = np.random.RandomState(5)
    init = [rng.randn(3, 2), rng.randn(3, 2)]
    grads = [[rng.randn(3, 2), rng.randn(3, 2)] for _ in range(10)]
    with keras.name_scope("embedding"):
        table = keras.Variable(init[0], dtype="float32", name="table")
    kernel = keras.Variable(init[1], dtype="float32", name="kernel")
    optimizer = keras_adamw.AdamW(
        learning_rate=0.01,
        variable_rules=[("embedding", {"moment_dtype": "bfloat16"})],
    )
    assert [r.slot_dtype for r in optimizer.explain([table, kernel])] == [
        "bfloat16",
        "float32",
    ]
    for step_grads in grads:
        optimizer.apply(
            [tf.constant(g, tf.float32) for g in step_grads], [table, kernel]
        )
    assert [m.dtype for m in optimizer._momentums] == ["bfloat16", "float32"]
    for i, moment_dtype in [(0, ml_dtypes.bfloat16), (1, None)]:
        ref = NumpyAdam(
            [init[i]],
            learning_rate=0.01,
            weight_decay=0.004,
            dtype=np.float32,
            moment_dtype=moment_dtype,
        )
        for step_grads in grads:
            ref.step([step_grads[i]])
        np.testing.assert_allclose(
            [table, kernel][i].numpy(), ref.weights[0], atol=1e-5, rtol=0
        )
    with pytest.raises(ValueError, match=r"\[0\].*moment_dtype.*float16"):
        keras_adamw.AdamW(variable_rules=[("a", {"moment_dtype": "float16"})])


def test_explain_shows_the_precision_options():
    w = keras.Variable(np.ones([2]), dtype="bfloat16", name="w")
    optimizer = keras_adamw.AdamW(
        moment_dtype="float32",
        kahan_summation=True,
        sparse_updates="lazy",
        skip_nonfinite=True,
    )
    (row,) = optimizer.explain([w])
    assert (row.dtype, row.slot_dtype) == ("bfloat16", "float32")
    assert row.kahan_summation and row.skip_nonfinite
    assert row.sparse_updates == "lazy"
    assert "kahan" in str(optimizer.explain([w])).splitlines()[0]
