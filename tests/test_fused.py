"""The fused CPU kernel (`keras_adamw.kernels`) and its dispatch (`fused=`).

Numbers: the kernel against the float64 NumPy reference (every dtype,
amsgrad, weight decay with exclusions, sparse gradients with repeated
indices, clipping) and against the XLA path of keras_adamw. Dispatch: what
`fused=None/True/False` run, the errors of `fused=True`, the fallback when
the kernel is not built, state moving between paths (MirroredStrategy:
tests/test_distribute.py).
The rest of the suite runs on the kernel too (`fused=None` is the default
and the kernel is built on CPU), which covers every other option.
"""

import logging

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import kernels
from keras_adamw import step
from tests.reference import NUMPY_DTYPES
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

STEPS = 12
SHAPES = [(6, 5), (5,), ()]
NAMES = ["kernel", "bias", "scale"]
# Largest difference from the reference, relative to the weight's size:
# a few roundings of the stored dtype (README.md, "What is promised").
REFERENCE_TOLERANCE = {
    "float64": 1e-10,
    "float32": 2e-5,
    "bfloat16": 2 * 2.0**-7,
    "float16": 2 * 2.0**-10,
}
SPARSE_IDS = [1, 2, 2, 5, 1, 1]  # Repeated ids, as an Embedding gives.
CONFIGS = {
    "adam": {},
    "adamw_excluded_bias": {"weight_decay": 0.05},
    "amsgrad": {"amsgrad": True, "weight_decay": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.3},
}


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    reason = kernels.unavailable_reason()
    assert reason is None, f"the kernel must build here: {reason}"


def make_problem(seed=1):
    rng = np.random.RandomState(seed)
    init = [rng.randn(*s) for s in SHAPES]
    grads = [
        [rng.randn(*s) * [0.1, 3.0, 1.0][t % 3] for s in SHAPES]
        for t in range(STEPS)
    ]
    # The first variable gets a sparse gradient: rows of SPARSE_IDS.
    rows = [rng.randn(len(SPARSE_IDS), SHAPES[0][1]) for _ in range(STEPS)]
    return init, grads, rows


def graph_op_types(optimizer):
    """Op types of the graphs the optimizer ran without XLA."""
    types = set()
    for program in optimizer._programs.value._graphs.values():
        for function in program._list_all_concrete_functions():
            types |= {op.type for op in function.graph.get_operations()}
    return types


def uses_kernel(optimizer):
    return "KerasAdamwApplyAdam" in graph_op_types(optimizer)


def run(dtype, kwargs, fused, sparse=True, steps=STEPS, problem=None):
    """Runs keras_adamw; returns (weights as float64, optimizer)."""
    init, grads, rows = problem or make_problem()
    variables = [
        keras.Variable(w, dtype=dtype, name=n) for w, n in zip(init, NAMES)
    ]
    optimizer = keras_adamw.Adam(learning_rate=0.05, fused=fused, **kwargs)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    for t in range(steps):
        gradients = [tf.constant(g, dtype=dtype) for g in grads[t]]
        if sparse:
            gradients[0] = tf.IndexedSlices(
                tf.constant(rows[t], dtype=dtype),
                tf.constant(SPARSE_IDS),
                tf.constant(SHAPES[0]),
            )
        optimizer.apply(gradients, variables)
    return [v.numpy().astype(np.float64) for v in variables], optimizer


def reference(dtype, kwargs, sparse=True):
    init, grads, rows = make_problem()
    numpy_dtype = NUMPY_DTYPES[dtype]
    ref = NumpyAdam(
        init,
        learning_rate=0.05,
        decay_mask=[True, False, True],
        dtype=None if dtype == "float64" else numpy_dtype,
        **kwargs,
    )
    for t in range(STEPS):
        # Gradients as the dtype holds them; a sparse one summed exactly.
        step_grads = [
            np.asarray(g, numpy_dtype).astype(np.float64) for g in grads[t]
        ]
        if sparse:
            values = np.asarray(rows[t], numpy_dtype).astype(np.float64)
            step_grads[0] = dense_from_sparse(SPARSE_IDS, values, SHAPES[0][0])
        ref.step(step_grads)
    return ref.weights


def assert_close(actual, expected, tolerance):
    for a, e, name in zip(actual, expected, NAMES):
        atol = tolerance * max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_kernel_equals_float64_reference(dtype, config):
    ours, optimizer = run(dtype, CONFIGS[config], fused=True)
    assert uses_kernel(optimizer)
    expected = reference(dtype, CONFIGS[config])
    assert_close(ours, expected, REFERENCE_TOLERANCE[dtype])


# The kernel computes in the XLA path's order and dtype: float32 agrees to
# rounding (1e-6 relative), float64 to 1e-12; a half-precision value at
# most one unit in the last place (XLA's pow may differ by one rounding).
XLA_TOLERANCE = {
    "float64": 1e-12,
    "float32": 1e-6,
    "bfloat16": 2.0**-7,
    "float16": 2.0**-10,
}


@pytest.mark.parametrize("dtype", sorted(NUMPY_DTYPES))
@pytest.mark.parametrize("config", ["amsgrad", "global_clipnorm"])
def test_kernel_equals_xla_path(dtype, config):
    ours, _ = run(dtype, CONFIGS[config], fused=True)
    theirs, optimizer = run(dtype, CONFIGS[config], fused=False)
    assert not uses_kernel(optimizer)
    assert optimizer._programs.value._compiled  # It ran the XLA program.
    assert_close(ours, theirs, XLA_TOLERANCE[dtype])


# The options the kernel computes beyond Keras' own: both decay modes,
# moments stored in another dtype than the variable (moment_dtype) and the
# compensated store of kahan_summation.
OPTIONS = {
    "independent_decay": (
        {"weight_decay": 0.05, "weight_decay_mode": "independent"},
        ["float64", "float32", "bfloat16", "float16"],
    ),
    "float32_moments": (
        {"moment_dtype": "float32", "amsgrad": True},
        ["bfloat16", "float16"],
    ),
    "bfloat16_moments": (
        {"moment_dtype": "bfloat16", "weight_decay": 0.05},
        ["float16", "float32", "float64"],
    ),
    "kahan": ({"kahan_summation": True}, ["bfloat16", "float16"]),
    "kahan_amsgrad_float32_moments": (
        {"kahan_summation": True, "amsgrad": True, "moment_dtype": "float32"},
        ["bfloat16"],
    ),
}


@pytest.mark.parametrize(
    "option, dtype",
    [(o, d) for o, (_, dtypes) in sorted(OPTIONS.items()) for d in dtypes],
)
def test_kernel_computes_decay_modes_and_moment_dtypes(option, dtype):
    kwargs = OPTIONS[option][0]
    ours, optimizer = run(dtype, kwargs, fused=True)
    assert uses_kernel(optimizer)
    numpy_kwargs = dict(kwargs)
    if "moment_dtype" in kwargs:
        numpy_kwargs["moment_dtype"] = NUMPY_DTYPES[kwargs["moment_dtype"]]
    expected = reference(dtype, numpy_kwargs)
    assert_close(ours, expected, REFERENCE_TOLERANCE[dtype])
    theirs, _ = run(dtype, kwargs, fused=False)
    assert_close(ours, theirs, XLA_TOLERANCE[dtype])


def test_kernel_in_a_tf_function_equals_eager():
    init, grads, _ = make_problem()
    results = []
    for in_function in (False, True):
        variables = [keras.Variable(w, dtype="float32") for w in init]
        optimizer = keras_adamw.AdamW(learning_rate=0.05, fused=True)

        def apply(gradients):
            optimizer.apply(gradients, variables)

        if in_function:
            apply = tf.function(apply)
        for t in range(4):
            apply([tf.constant(g, tf.float32) for g in grads[t]])
        results.append([v.numpy() for v in variables])
    for eager, traced in zip(*results):
        np.testing.assert_array_equal(eager, traced)


def test_auto_uses_the_kernel_on_cpu_and_false_does_not():
    _, auto = run("float32", {}, fused=None, steps=1)
    _, off = run("float32", {}, fused=False, steps=1)
    assert uses_kernel(auto)
    assert not uses_kernel(off)


def test_auto_falls_back_to_xla_when_the_kernel_is_not_built(monkeypatch):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no g++")
    ours, optimizer = run("float64", CONFIGS["amsgrad"], fused=None)
    assert not uses_kernel(optimizer)
    assert optimizer._programs.value._compiled
    assert_close(ours, reference("float64", CONFIGS["amsgrad"]), 1e-10)


def test_fused_true_without_the_kernel_raises_before_any_change(
    monkeypatch,
):
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "no g++")
    variable = keras.Variable([1.0, 2.0])
    optimizer = keras_adamw.Adam(fused=True)
    with pytest.raises(ValueError, match=r"fused=True.*not available.*g\+\+"):
        optimizer.apply([tf.constant([1.0, 1.0])], [variable])
    assert variable.numpy().tolist() == [1.0, 2.0]
    assert int(optimizer.iterations) == 0


def test_fused_true_with_lazy_sparse_rows_raises_before_any_change():
    # The one option the kernel does not compute: it takes dense gradients.
    named = "sparse_updates"
    variable = keras.Variable(np.ones([4, 2]), dtype="bfloat16")
    optimizer = keras_adamw.Adam(fused=True, sparse_updates="lazy")
    gradient = tf.IndexedSlices(
        tf.ones([1, 2], tf.bfloat16), tf.constant([1]), tf.constant([4, 2])
    )
    with pytest.raises(ValueError, match=f"fused=True.*{named}"):
        optimizer.apply([gradient], [variable])
    assert variable.numpy().tolist() == [[1.0, 1.0]] * 4
    assert int(optimizer.iterations) == 0


def test_fused_true_inside_an_xla_function_raises():
    variable = keras.Variable([1.0, 2.0])
    optimizer = keras_adamw.Adam(fused=True)
    optimizer.build([variable])

    @tf.function(jit_compile=True)
    def apply():
        optimizer.apply([tf.constant([1.0, 1.0])], [variable])

    with pytest.raises(ValueError, match="compiled by XLA"):
        apply()
    assert variable.numpy().tolist() == [1.0, 2.0]


def test_auto_inside_an_xla_function_runs_xla():
    variable = keras.Variable([1.0, 2.0])
    optimizer = keras_adamw.Adam(learning_rate=0.5)
    optimizer.build([variable])
    tf.function(
        lambda: optimizer.apply([tf.constant([1.0, -1.0])], [variable]),
        jit_compile=True,
    )()
    assert not uses_kernel(optimizer)
    # The first step moves each element by the learning rate (to epsilon).
    np.testing.assert_allclose(variable.numpy(), [0.5, 2.5], atol=1e-5)


def test_fused_argument_is_checked_and_in_the_config():
    with pytest.raises(TypeError, match="fused"):
        keras_adamw.Adam(fused="yes")
    optimizer = keras_adamw.AdamW(fused=False)
    assert optimizer.get_config()["fused"] is False
    assert keras_adamw.AdamW.from_config(optimizer.get_config()).fused is False


def test_state_moves_between_kernel_and_xla_paths():
    # Six steps on the kernel then six on XLA (same slots), against twelve
    # on XLA, and the other way round.
    expected, _ = run("float32", CONFIGS["amsgrad"], fused=False)
    init, grads, rows = make_problem()
    for first, second in ((True, False), (False, True)):
        variables = [
            keras.Variable(w, dtype="float32", name=n)
            for w, n in zip(init, NAMES)
        ]
        optimizer = keras_adamw.Adam(
            learning_rate=0.05, fused=first, **CONFIGS["amsgrad"]
        )
        optimizer.exclude_from_weight_decay(var_names=["bias"])
        for t in range(STEPS):
            if t == STEPS // 2:
                optimizer.fused = second
            gradients = [tf.constant(g, tf.float32) for g in grads[t]]
            gradients[0] = tf.convert_to_tensor(
                tf.IndexedSlices(
                    tf.constant(rows[t], tf.float32),
                    tf.constant(SPARSE_IDS),
                    tf.constant(SHAPES[0]),
                )
            )
            optimizer.apply(gradients, variables)
        assert uses_kernel(optimizer)
        assert optimizer._programs.value._compiled
        assert_close([v.numpy() for v in variables], expected, 1e-6)


def one_variable_vectors(beta_1, beta_2, epsilon, weight_decay=0.0):
    """The op's hyperparameter vectors (`kernels.HYPERPARAMETERS`) for one
    variable, learning-rate multiplier 1."""
    values = {
        "learning_rate_multiplier": 1.0,
        "beta_1": beta_1,
        "beta_2": beta_2,
        "epsilon": epsilon,
        "weight_decay": weight_decay,
    }
    assert tuple(values) == kernels.HYPERPARAMETERS
    return {k: tf.constant([v], tf.float64) for k, v in values.items()}


def test_a_read_in_flight_keeps_its_value():
    # Copy-on-write, as TensorFlow's ResourceApply* kernels: a tensor read
    # before the step still holds the old value after it.
    variable = tf.Variable([1.0, 2.0, 3.0])
    slots = [tf.Variable(tf.zeros([3])) for _ in range(2)]
    before = tf.convert_to_tensor(variable)
    kernels.apply_adam(
        [variable],
        [slots[0]],
        [slots[1]],
        [],
        [tf.constant([1.0, 1.0, 1.0])],
        tf.constant(0.5, tf.float64),
        one_variable_vectors(beta_1=0.9, beta_2=0.999, epsilon=0.0),
        tf.constant(1, tf.int64),
    )
    assert before.numpy().tolist() == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(variable.numpy(), [0.5, 1.5, 2.5], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, gradient_dtype",
    [({}, tf.bfloat16), ({"global_clipnorm": 1.0}, tf.float32)],
)
def test_half_precision_gradients_reach_the_kernel_uncast(
    kwargs, gradient_dtype
):
    # A bfloat16 gradient that nothing changes goes into the kernel as it
    # is (no float32 copy); a clipped one is float32.
    variable = keras.Variable(np.ones([3]), dtype="bfloat16")
    optimizer = keras_adamw.AdamW(fused=True, **kwargs)
    optimizer.build([variable])

    @tf.function
    def apply(gradient):
        optimizer.apply([gradient], [variable])

    gradient = tf.constant([1.0, -2.0, 3.0], tf.bfloat16)
    graph = apply.get_concrete_function(gradient).graph
    (kernel,) = [
        op for op in graph.get_operations() if op.type == "KerasAdamwApplyAdam"
    ]
    assert kernel.get_attr("T") == [gradient_dtype]
    if gradient_dtype == tf.bfloat16:
        # And nothing else waits for a float32 copy, so none is made.
        casts = [
            op
            for op in graph.get_operations()
            if op.type == "Cast" and op.inputs[0].dtype == tf.bfloat16
        ]
        waiting = {
            name for node in graph.as_graph_def().node for name in node.input
        }
        for cast in casts:
            assert not cast.outputs[0].consumers(), cast
            assert "^" + cast.name not in waiting, cast
    apply(gradient)
    expected = NumpyAdam(
        [np.ones([3])],
        learning_rate=0.001,
        weight_decay=0.004,
        dtype=ml_dtypes.bfloat16,
        **kwargs,
    )
    expected.step([np.array([1.0, -2.0, 3.0])])
    np.testing.assert_allclose(
        np.asarray(variable.numpy(), np.float64),
        expected.weights[0],
        rtol=2.0**-7,
    )


# Per half-precision dtype: its exponent bits (zero in subnormals), and the
# number of float32 mantissa bits it drops (a float32 with only the top one
# of those set is an exact tie between two of its values).
HALF_FORMATS = {
    "bfloat16": (0x7F80, 16),
    "float16": (0x7C00, 13),
}


@pytest.mark.parametrize("gradient_dtype", ["float32", "own"])
@pytest.mark.parametrize("dtype", sorted(HALF_FORMATS))
def test_half_precision_is_rounded_to_nearest_even_as_tf_cast_rounds(
    dtype, gradient_dtype
):
    # The kernel converts half precision with instructions of its own
    # (hardware conversions, integer operations in the tail of a block);
    # every stored value must be the one tf.cast (Eigen) would store: ties
    # to even, overflow to inf, NaN to NaN; a gradient in the variable's
    # own dtype is widened exactly. (Subnormals are left out: TensorFlow's
    # CPU threads flush them to zero in arithmetic, on every path.)
    exponent_bits, dropped = HALF_FORMATS[dtype]
    tf_dtype = tf.as_dtype(dtype)
    bits = np.arange(0, 2**16, 7, dtype=np.uint16)
    bits = bits[(bits & exponent_bits != 0) | (bits & 0x7FFF == 0)]
    values = bits.view(NUMPY_DTYPES[dtype])
    # Exact ties between two values near 1, each side of it.
    near_one = np.arange(0x3F000000 >> dropped, 0x3FC80000 >> dropped)
    ties = (near_one.astype(np.uint32) << dropped | 1 << (dropped - 1)).view(
        np.float32
    )
    gradient = np.concatenate(
        [
            values.astype(np.float32),
            ties,
            # The largest float32s, and float16's largest and its ties
            # around 65504 (which round to 65504 and to inf).
            np.array(
                [3.4e38, -3.4e38, 65504, 65519, 65520, -65520, np.nan, np.inf],
                np.float32,
            ),
        ]
    )
    gradient = tf.constant(gradient)
    if gradient_dtype == "own":
        gradient = tf.cast(gradient, tf_dtype)
    wide = tf.cast(gradient, tf.float32)
    size = int(gradient.shape[0])
    variable = tf.Variable(np.resize(values, size))
    momentum = tf.Variable(tf.zeros([size], tf_dtype))
    velocity = tf.Variable(tf.zeros([size], tf_dtype))
    kernels.apply_adam(
        [variable],
        [momentum],
        [velocity],
        [],
        [gradient],
        tf.constant(0.0, tf.float64),  # The variable keeps its value.
        # beta 0: momentum = gradient, velocity = gradient ** 2, rounded.
        one_variable_vectors(beta_1=0.0, beta_2=0.0, epsilon=1.0),
        tf.constant(1, tf.int64),
    )

    def bits_of(x):
        x = np.asarray(x)
        # Any NaN is a NaN: compare NaNs by their being NaN.
        return np.where(np.isnan(x.astype(np.float32)), -1, x.view(np.uint16))

    expected_momentum = tf.cast(wide, tf_dtype)
    expected_velocity = tf.cast(wide * wide, tf_dtype)
    # Where the step moves it by 0 (a finite momentum times alpha = 0),
    # the variable is read and stored back unchanged.
    unmoved = np.isfinite(np.asarray(expected_momentum.numpy(), np.float32))
    np.testing.assert_array_equal(
        bits_of(variable.numpy())[unmoved],
        bits_of(np.resize(values, size))[unmoved],
    )
    np.testing.assert_array_equal(
        bits_of(momentum.numpy()), bits_of(expected_momentum.numpy())
    )
    np.testing.assert_array_equal(
        bits_of(velocity.numpy()), bits_of(expected_velocity.numpy())
    )


def test_the_op_checks_shapes_before_any_write():
    variables = [tf.Variable([1.0, 2.0]), tf.Variable([3.0])]
    momentums = [tf.Variable([0.0, 0.0]), tf.Variable([0.0])]
    velocities = [tf.Variable([0.0, 0.0]), tf.Variable([0.0])]
    hyper = {
        name: tf.constant([0.1, 0.1], tf.float64)
        for name in kernels.HYPERPARAMETERS
    }
    with pytest.raises(tf.errors.InvalidArgumentError, match="gradient 1"):
        kernels.apply_adam(
            variables,
            momentums,
            velocities,
            [],
            [tf.constant([1.0, 1.0]), tf.constant([1.0, 1.0])],
            tf.constant(0.1, tf.float64),
            hyper,
            tf.constant(1, tf.int64),
        )
    assert variables[0].numpy().tolist() == [1.0, 2.0]
    assert momentums[0].numpy().tolist() == [0.0, 0.0]


# MirroredStrategy runs the kernel on each device's copies: checked in the
# mirrored job's process (tests/test_distribute.py,
# test_one_program_per_device and the fit cases against one device). In
# this process a MirroredStrategy would share collective group keys with
# the DTensor tests' mesh and break both.


def test_without_a_compiler_the_loader_says_why_once(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KERAS_ADAMW_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KERAS_ADAMW_KERNEL_LIBRARY", raising=False)
    monkeypatch.setattr(kernels, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="keras_adamw"):
        assert kernels.load() is None
        assert kernels.load() is None
        reason = kernels.unavailable_reason()
    assert "no C++ compiler" in reason
    assert len(caplog.records) == 1
    assert "XLA path" in caplog.records[0].getMessage()
    # And a step still runs, on XLA.
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: reason)
    _, optimizer = run("float32", {}, fused=None, steps=1)
    assert not uses_kernel(optimizer)


def test_step_function_is_unchanged_without_the_kernel():
    # `fused` defaults to off in a StepConfig made without it.
    required = len(step.StepConfig._fields) - len(
        step.StepConfig._field_defaults
    )
    assert step.StepConfig(*([None] * required)).fused is False
