"""The precision and robustness options against the float64 reference:
`moment_dtype`, `kahan_summation`, `skip_nonfinite`, `sparse_updates`.

Each option runs 12 steps on a matrix (dense or sparse gradient) and a
vector, with XLA on and off, eagerly and in a `tf.function`, and is compared
with `tests/reference.py` modelling the same option (stored dtypes of the
moments, the compensation, skipped calls, lazy rows).
"""

import json

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from tests.jobs.processes import Processes
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

STEPS = 12
SHAPES = [(6, 3), (4,)]
NUMPY = {
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}
# Steps whose gradient holds a NaN or an Inf (skip_nonfinite cases).
BAD_STEPS = {3: np.nan, 7: np.inf}

# name: (optimizer arguments, reference arguments, variable dtype)
OPTIONS = {
    "moment_float32_on_float16": (
        {"moment_dtype": "float32"},
        {"moment_dtype": np.float32},
        "float16",
    ),
    "moment_bfloat16_on_float32": (
        {"moment_dtype": "bfloat16"},
        {"moment_dtype": ml_dtypes.bfloat16},
        "float32",
    ),
    "kahan_bfloat16": (
        {"kahan_summation": True},
        {"kahan_summation": True},
        "bfloat16",
    ),
    "kahan_float16_amsgrad": (
        {"kahan_summation": True, "amsgrad": True},
        {"kahan_summation": True, "amsgrad": True},
        "float16",
    ),
    "skip_nonfinite": (
        {"skip_nonfinite": True, "use_ema": True, "ema_momentum": 0.5},
        {"skip_nonfinite": True, "use_ema": True, "ema_momentum": 0.5},
        "float32",
    ),
    "skip_nonfinite_accumulation": (
        {"skip_nonfinite": True, "gradient_accumulation_steps": 2},
        {"skip_nonfinite": True, "gradient_accumulation_steps": 2},
        "float32",
    ),
    "lazy": ({"sparse_updates": "lazy"}, {}, "float32"),
    "lazy_bfloat16_kahan_clip": (
        {
            "sparse_updates": "lazy",
            "kahan_summation": True,
            "global_clipnorm": 1.0,
        },
        {"kahan_summation": True, "global_clipnorm": 1.0},
        "bfloat16",
    ),
}
# Largest difference from the reference, in units of the weight dtype's
# epsilon times max(1, |weight|): float32 math against float64 math on the
# same stored values, rounded to the same dtype.
TOLERANCE = {"float32": 64 * 2.0**-23, "bfloat16": 4 * 2.0**-7}
TOLERANCE["float16"] = 4 * 2.0**-10


def problem(name, dtype, sparse):
    """Initial weights and, per step, (reference gradients, rows, ours)."""
    rng = np.random.RandomState(sum(map(ord, name)))
    numpy_dtype = NUMPY[dtype]
    init = [
        rng.randn(*s).astype(numpy_dtype).astype(np.float64) for s in SHAPES
    ]
    steps = []
    for step in range(STEPS):
        scale = [0.1, 2.0, 0.6, 3.0][step % 4]
        vector = (rng.randn(4) * scale).astype(numpy_dtype)
        if "skip" in name and step in BAD_STEPS:
            vector[1] = BAD_STEPS[step]
        if sparse:
            ids = rng.randint(0, 6, 4)  # Repeats and unsorted.
            values = (rng.randn(4, 3) * scale).astype(numpy_dtype)
            dense = dense_from_sparse(ids, values.astype(np.float64), 6)
            ours = tf.IndexedSlices(
                tf.constant(values, dtype),
                tf.constant(ids),
                tf.constant([6, 3]),
            )
        else:
            ids = None
            values = (rng.randn(6, 3) * scale).astype(numpy_dtype)
            dense, ours = values.astype(np.float64), tf.constant(values, dtype)
        steps.append(
            (
                [dense, vector.astype(np.float64)],
                [ids, None],
                [ours, tf.constant(vector, dtype)],
            )
        )
    return init, steps


def run_ours(kwargs, dtype, init, steps, jit_compile, in_function):
    variables = [
        keras.Variable(w, dtype=dtype, name=f"w{i}")
        for i, w in enumerate(init)
    ]
    optimizer = keras_adamw.AdamW(
        learning_rate=0.05, weight_decay=0.1, jit_compile=jit_compile, **kwargs
    )

    def apply(gradients):
        optimizer.apply(gradients, variables)

    if in_function:
        apply = tf.function(apply)
    for _, _, ours in steps:
        apply(ours)
    return optimizer, variables


def run_reference(kwargs, dtype, init, steps, lazy):
    reference = NumpyAdam(
        init,
        learning_rate=0.05,
        weight_decay=0.1,
        dtype=None if dtype == "float32" else NUMPY[dtype],
        **kwargs,
    )
    for dense, rows, _ in steps:
        reference.step(dense, rows=rows if lazy else None)
    return reference


def assert_close(ours, expected, dtype, what):
    ours = np.asarray(ours, np.float64)
    scale = np.maximum(1.0, np.abs(expected))
    error = np.max(np.abs(ours - expected) / scale, initial=0.0)
    assert error <= TOLERANCE[dtype], (what, error, ours, expected)


# Per option, four runs that cover dense and sparse gradients, XLA on and
# off, eager and tf.function (lazy options: sparse only).
COMBINATIONS = [
    (False, True, True),
    (False, False, False),
    (True, True, False),
    (True, False, True),
]
CASES = [
    (name, sparse or "lazy" in name, jit, function)
    for name in OPTIONS
    for sparse, jit, function in COMBINATIONS
]


@pytest.mark.parametrize("name,sparse,jit_compile,in_function", CASES)
def test_option_equals_its_float64_reference(
    name, sparse, jit_compile, in_function
):
    kwargs, reference_kwargs, dtype = OPTIONS[name]
    init, steps = problem(name, dtype, sparse)
    optimizer, variables = run_ours(
        kwargs, dtype, init, steps, jit_compile, in_function
    )
    reference = run_reference(
        reference_kwargs, dtype, init, steps, "lazy" in name
    )
    moment = kwargs.get("moment_dtype") or dtype
    for i, variable in enumerate(variables):
        weight = variable.numpy().astype(np.float64)
        expected = reference.weights[i]
        if reference.kahan_summation:
            weight += optimizer._compensations[i].numpy().astype(np.float64)
            expected = expected + reference.compensations[i]
        assert_close(weight, expected, dtype, f"weight {i}")
        assert_close(
            optimizer._momentums[i].numpy(),
            reference.momentums[i],
            moment,
            f"momentum {i}",
        )
    assert optimizer._velocities[0].dtype == moment
    if "skip" in name:
        skipped = len(BAD_STEPS)
        assert int(optimizer.skipped_steps.numpy()) == skipped
        assert reference.skipped_steps == skipped
        raw = optimizer.iterations.numpy() * (
            optimizer.gradient_accumulation_steps or 1
        )
        assert raw == STEPS - skipped


def test_lazy_leaves_untouched_rows_and_their_moments_alone():
    table = keras.Variable(np.ones((5, 2)), dtype="float32", name="table")
    optimizer = keras_adamw.AdamW(
        learning_rate=0.1, weight_decay=0.5, sparse_updates="lazy"
    )
    gradient = tf.IndexedSlices(
        tf.ones([3, 2]), tf.constant([3, 1, 3]), tf.constant([5, 2])
    )
    optimizer.apply([gradient], [table])
    moved = table.numpy()[:, 0] != 1.0
    assert moved.tolist() == [False, True, False, True, False]
    velocity = optimizer._velocities[0].numpy()[:, 0]
    # Row 3's duplicates were summed first: (1 + 1)**2 * (1 - beta_2).
    np.testing.assert_allclose(velocity, [0, 1e-3, 0, 4e-3, 0], rtol=1e-4)


def train_constant_gradient(optimizer, dtype, gradient, steps):
    """`steps` steps of a constant `gradient` on a weight starting at 0, in
    one compiled loop; returns the weight's trajectory at its end."""
    weight = keras.Variable(np.zeros((1,)), dtype=dtype, name="w")
    optimizer.build([weight])
    constant = tf.constant([gradient], dtype)

    @tf.function
    def loop():
        for _ in tf.range(steps):
            optimizer.apply([constant], [weight])

    loop()
    return float(weight.numpy()[0])


def test_float16_moments_in_float32_stay_finite_under_large_gradients():
    kept = train_constant_gradient(keras_adamw.Adam(), "float16", 300.0, 2000)
    assert not np.isfinite(kept)  # float16 velocity overflows (Keras too).
    fixed = train_constant_gradient(
        keras_adamw.Adam(moment_dtype="float32"), "float16", 300.0, 2000
    )
    # Finite, and where float16 weights (their rounding included) go.
    reference = NumpyAdam([[0.0]], dtype=np.float16, moment_dtype=np.float32)
    for _ in range(2000):
        reference.step([[300.0]])
    assert fixed == pytest.approx(reference.weights[0][0], abs=4 * 2.0**-10)


def test_float16_moments_in_float32_keep_tiny_gradients():
    kept = train_constant_gradient(keras_adamw.Adam(), "float16", 1e-3, 200)
    assert kept < -1.0  # The float16 velocity underflows to 0.
    fixed = train_constant_gradient(
        keras_adamw.Adam(moment_dtype="float32"), "float16", 1e-3, 200
    )
    # The moments are right; rounding each float16 weight update (8.2 ulp
    # near 0.2) loses 1.5%, as the reference with float16 weights says.
    reference = NumpyAdam([[0.0]], dtype=np.float16, moment_dtype=np.float32)
    for _ in range(200):
        reference.step([[1e-3]])
    assert fixed == pytest.approx(reference.weights[0][0], abs=2.0**-13)
    assert fixed == pytest.approx(-0.20, rel=0.02)
    # With the weight's rounding compensated too: -0.20 within 1%.
    both = train_constant_gradient(
        keras_adamw.Adam(moment_dtype="float32", kahan_summation=True),
        "float16",
        1e-3,
        200,
    )
    assert both == pytest.approx(-0.20, rel=0.01)


def test_kahan_summation_keeps_small_bfloat16_updates():
    kept = train_constant_gradient(keras_adamw.Adam(), "bfloat16", 1.0, 3000)
    assert kept == pytest.approx(-0.5, rel=0.05)  # Updates below ulp/2 lost.
    # Moments in float32 too: a bfloat16 velocity stalls near 0.25, where
    # (1 - v) * 0.001 is below half its ulp, and the steps grow 2x.
    fixed = train_constant_gradient(
        keras_adamw.Adam(kahan_summation=True, moment_dtype="float32"),
        "bfloat16",
        1.0,
        3000,
    )
    assert fixed == pytest.approx(-3.0, rel=0.01)


def test_kahan_summation_refuses_float32_variables_at_build():
    optimizer = keras_adamw.AdamW(kahan_summation=True)
    weights = [
        keras.Variable(np.ones(2), dtype="bfloat16", name="ok"),
        keras.Variable(np.ones(2), dtype="float32", name="kernel"),
    ]
    with pytest.raises(ValueError, match="'kernel' is float32"):
        optimizer.build(weights)
    assert not optimizer.built and len(optimizer.variables) == 2


@pytest.mark.parametrize(
    "name,value",
    [
        ("moment_dtype", "float16"),
        ("kahan_summation", 1),
        ("skip_nonfinite", "yes"),
        ("sparse_updates", "sparse"),
    ],
)
def test_bad_option_values_raise_naming_the_argument(name, value):
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        keras_adamw.Adam(**{name: value})


def test_options_round_trip_through_get_config():
    options = {
        "moment_dtype": "bfloat16",
        "kahan_summation": True,
        "skip_nonfinite": True,
        "sparse_updates": "lazy",
    }
    optimizer = keras_adamw.AdamW(**options)
    config = optimizer.get_config()
    assert {k: config[k] for k in options} == options
    again = keras_adamw.AdamW.from_config(config)
    assert {k: getattr(again, k) for k in options} == options
    restored = keras.optimizers.deserialize(
        keras.optimizers.serialize(optimizer)
    )
    assert {k: getattr(restored, k) for k in options} == options


def test_options_off_keep_keras_variable_layout():
    weights = [keras.Variable(np.ones((3, 2)), name="kernel")]
    ours = keras_adamw.AdamW()
    ours.build(weights)
    keras_own = keras.optimizers.AdamW()
    keras_own.build(weights)
    assert [v.name for v in ours.variables] == [
        v.name for v in keras_own.variables
    ]
    assert ours.skipped_steps is None


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision_mirrored") / "results.json"
    with Processes(tmp_path_factory.mktemp("logs")) as processes:
        processes.start(
            "precision_mirrored", "precision_mirrored_job", f"--out={out}"
        )
        processes.finish(["precision_mirrored"], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("moment_dtype", "float32"),
        ("kahan_summation", "bfloat16"),
        ("skip_nonfinite", "float32"),
        ("lazy", "float32"),
    ],
)
def test_option_under_mirrored_strategy_equals_reference(
    mirrored, name, dtype
):
    assert mirrored[name]["max_difference"] <= TOLERANCE[dtype]


def test_nan_on_one_replica_skips_the_step_on_every_replica(mirrored):
    result = mirrored["skip_nonfinite"]
    assert result["skipped_steps"] == [1, 1]
    assert result["reference_skipped_steps"] == 1
    assert result["iterations"] == [9, 9]
    assert result["copies_identical"]


def test_recommender_model_trains_lazily_with_fit():
    """Embedding + MLP under `fit`: Keras' Embedding gives IndexedSlices;
    with "lazy" the rows no batch touched keep their weights (no decay) and
    zero moments, while the loss goes down."""
    keras.utils.set_random_seed(0)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 500, (160, 4))  # Rows 500..999 never appear.
    targets = (ids.sum(axis=1, keepdims=True) % 7 / 7.0).astype("float32")

    def train(sparse_updates):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((4,), dtype="int32"),
                keras.layers.Embedding(1000, 8),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        initial = model.layers[0].embeddings.numpy().copy()
        optimizer = keras_adamw.AdamW(0.01, sparse_updates=sparse_updates)
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(ids, targets, batch_size=32, epochs=4, verbose=0)
        table = model.layers[0].embeddings.numpy()
        return history.history["loss"], initial, table, optimizer

    losses, initial, table, optimizer = train("lazy")
    assert losses[-1] < 0.7 * losses[0]
    np.testing.assert_array_equal(table[500:], initial[500:])
    assert not np.any(optimizer._velocities[0].numpy()[500:])
    assert np.all(np.any(table[:500] != initial[:500], axis=1)[np.unique(ids)])
    _, initial, dense_table, _ = train("dense")
    assert np.all(dense_table[500:] != initial[500:])  # Decayed, moved.
