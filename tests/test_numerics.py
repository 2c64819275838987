"""Numbers: keras_adamw against Keras 3 and an independent float64 reference.

Each configuration runs 12 steps on three variables (a matrix, a vector and a
scalar) with gradients whose size varies from step to step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

STEPS = 12
SHAPES = [(5, 4), (4,), ()]
NAMES = ["kernel", "bias", "scale"]


class HalvingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr = 2**-6 * 0.5**(step / 3), computed in float64."""

    def __call__(self, step):
        step = tf.cast(step, tf.float64)
        return tf.constant(2.0**-6, tf.float64) * tf.pow(
            tf.constant(0.5, tf.float64), step / 3.0
        )


def halving_schedule_numpy(calls):
    return 2.0**-6 * 0.5 ** (calls / 3.0)


def make_problem(seed=0):
    rng = np.random.RandomState(seed)
    init = [rng.randn(*s) for s in SHAPES]
    grads = []
    for step in range(STEPS):
        scale = [0.05, 2.0, 0.5, 4.0][step % 4]
        grads.append([rng.randn(*s) * scale for s in SHAPES])
    return init, grads


# name: (keyword arguments, reference-only arguments)
CONFIGS = {
    "dense": ({}, {}),
    "amsgrad": ({"amsgrad": True}, {}),
    "clipnorm": ({"clipnorm": 1.0}, {}),
    "clipvalue": ({"clipvalue": 0.5}, {}),
    "global_clipnorm": ({"global_clipnorm": 2.0}, {}),
    "ema": ({"use_ema": True, "ema_momentum": 0.9}, {}),
    "ema_overwrite": (
        {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 4},
        {},
    ),
    "accumulation": ({"gradient_accumulation_steps": 3}, {}),
    "loss_scale": ({"loss_scale_factor": 64.0}, {}),
    "schedule": (
        {"learning_rate": HalvingSchedule()},
        {"learning_rate": halving_schedule_numpy},
    ),
    "callable_betas": ({"beta_1": lambda: 0.8, "beta_2": lambda: 0.99}, {}),
    "everything": (
        {
            "amsgrad": True,
            "global_clipnorm": 2.0,
            "use_ema": True,
            "ema_momentum": 0.9,
            "loss_scale_factor": 8.0,
            "learning_rate": HalvingSchedule(),
        },
        {"learning_rate": halving_schedule_numpy},
    ),
}
CLASSES = {
    "AdamW": (keras_adamw.AdamW, keras.optimizers.AdamW, 0.004),
    "Adam": (keras_adamw.Adam, keras.optimizers.Adam, None),
}


def run(optimizer, init, grads, dtype, scale=1.0, finalize=False):
    variables = [
        keras.Variable(w, dtype=dtype, name=n) for w, n in zip(init, NAMES)
    ]
    for step_grads in grads:
        optimizer.apply(
            [tf.constant(g * scale, dtype=dtype) for g in step_grads],
            variables,
        )
    if finalize:
        optimizer.finalize_variable_values(variables)
    return [v.numpy().astype(np.float64) for v in variables]


def reference(init, grads, kwargs, ref_kwargs, weight_decay, finalize=False):
    args = dict(kwargs)
    args.update(ref_kwargs)
    args.setdefault("weight_decay", weight_decay)
    ref = NumpyAdam(init, **args)
    for step_grads in grads:
        ref.step(step_grads)
    if finalize and ref.use_ema:
        return ref.averages
    return ref.weights


def assert_close(actual, expected, rtol):
    """Equal within `rtol`, relative to each tensor's largest entry."""
    for a, e, name in zip(actual, expected, NAMES):
        atol = rtol * max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("class_name", sorted(CLASSES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("jit_compile", [True, False])
def test_float64_equals_numpy_reference(class_name, config, jit_compile):
    ours_class, _, weight_decay = CLASSES[class_name]
    kwargs, ref_kwargs = CONFIGS[config]
    init, grads = make_problem()
    learning_rate = kwargs.get("learning_rate", 2.0**-7)
    kwargs = dict(kwargs, learning_rate=learning_rate)
    if "learning_rate" not in ref_kwargs:
        ref_kwargs = dict(ref_kwargs, learning_rate=learning_rate)
    scale = kwargs.get("loss_scale_factor", 1.0)
    finalize = kwargs.get("use_ema", False)
    ours = run(
        ours_class(jit_compile=jit_compile, **kwargs),
        init,
        grads,
        "float64",
        scale=scale,
        finalize=finalize,
    )
    expected = reference(
        init,
        [[g * scale for g in s] for s in grads],
        kwargs,
        ref_kwargs,
        weight_decay,
        finalize=finalize,
    )
    assert_close(ours, expected, rtol=1e-10)
    # The run must have moved the weights, or the comparison says nothing.
    assert max(np.max(np.abs(o - i)) for o, i in zip(ours, init)) > 1e-3


@pytest.mark.parametrize("class_name", sorted(CLASSES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("jit_compile", [True, False])
def test_float32_equals_keras(class_name, config, jit_compile):
    ours_class, keras_class, _ = CLASSES[class_name]
    kwargs, _ = CONFIGS[config]
    init, grads = make_problem(seed=1)
    scale = kwargs.get("loss_scale_factor", 1.0)
    finalize = kwargs.get("use_ema", False)
    ours = run(
        ours_class(jit_compile=jit_compile, **kwargs),
        init,
        grads,
        "float32",
        scale=scale,
        finalize=finalize,
    )
    # Keras 3 documents callable betas but fails on them ("Attempt to convert
    # a value (<function>) ... to a Tensor"): give it their values.
    keras_kwargs = {
        k: v() if k.startswith("beta") and callable(v) else v
        for k, v in kwargs.items()
    }
    theirs = run(
        keras_class(**keras_kwargs),
        init,
        grads,
        "float32",
        scale=scale,
        finalize=finalize,
    )
    assert_close(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_indexed_slices_without_duplicates_equal_keras_and_dense(
    jit_compile, train_table
):
    rng = np.random.RandomState(2)
    init = rng.randn(6, 3)
    steps = [
        ([0, 2, 5], rng.randn(3, 3)),
        ([1, 2, 4], rng.randn(3, 3)),
        ([5, 0, 3], rng.randn(3, 3)),
    ] * 4

    def train(optimizer, sparse):
        return train_table(optimizer, steps, sparse=sparse, init=init)

    ours = train(keras_adamw.AdamW(jit_compile=jit_compile), sparse=True)
    np.testing.assert_array_equal(
        ours, train(keras_adamw.AdamW(jit_compile=jit_compile), sparse=False)
    )
    theirs = train(keras.optimizers.AdamW(), sparse=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    ref = NumpyAdam(
        [init], weight_decay=0.004, learning_rate=float(np.float32(1e-3))
    )
    for indices, values in steps:
        ref.step([dense_from_sparse(indices, values, 6)])
    np.testing.assert_allclose(ours, ref.weights[0], rtol=1e-5, atol=1e-6)
