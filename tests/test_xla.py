"""`jit_compile=True`: one XLA program updates all variables of a step.

The optimizers here say `fused=False`: on CPU the default (`fused=None`)
runs the fused kernel instead (tests/test_fused.py).
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import step


def xla_function(optimizer):
    return optimizer._programs.value.compiled(step.apply_step)


def test_one_program_for_all_variables_traced_once():
    variables = [
        keras.Variable(np.full((3, i + 1), 1.0), dtype="float32", name=f"w{i}")
        for i in range(5)
    ]
    optimizer = keras_adamw.AdamW(amsgrad=True, fused=False)
    grads = [tf.ones_like(v) for v in variables]
    for _ in range(6):
        optimizer.apply(grads, variables)
    assert xla_function(optimizer).experimental_get_tracing_count() == 1

    hlo = xla_function(optimizer).experimental_get_compiler_ir(
        grads,
        tuple(range(5)),
        optimizer._state(),
        optimizer._hyperparameters(),
        optimizer._step_config(),
    )(stage="hlo")
    assert hlo.count("ENTRY") == 1
    # Every variable, momentum, velocity and velocity_hat, and the step
    # counter, is updated in place by this one program.
    aliased = re.search(r"input_output_alias=\{(.*?)\}, entry", hlo).group(1)
    assert aliased.count("may-alias") == 4 * len(variables) + 1


def test_jit_compile_false_runs_no_xla_program():
    variable = keras.Variable([1.0, 2.0])
    optimizer = keras_adamw.AdamW(jit_compile=False)
    optimizer.apply([tf.ones([2])], [variable])
    assert xla_function(optimizer).experimental_get_tracing_count() == 0


def fit_weights(optimizer, model_jit_compile):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    rng = np.random.RandomState(0)
    x = rng.randn(64, 4).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model.compile(
        optimizer=optimizer, loss="mse", jit_compile=model_jit_compile
    )
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize("model_jit_compile", [True, False, "auto"])
def test_fit_traces_the_program_once_with_or_without_model_xla(
    model_jit_compile,
):
    optimizer = keras_adamw.AdamW(learning_rate=0.01, fused=False)
    ours = fit_weights(optimizer, model_jit_compile)
    assert optimizer.iterations.numpy() == 12
    assert xla_function(optimizer).experimental_get_tracing_count() == 1
    without_xla = fit_weights(
        keras_adamw.AdamW(learning_rate=0.01, jit_compile=False),
        model_jit_compile,
    )
    for a, b in zip(ours, without_xla):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
