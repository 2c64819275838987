"""Variable groups (`keras_adamw.kernels.variable_group`): the fused kernel
takes a step's variables and slots behind one handle. A step in a
`tf.function` then captures no variable or slot of its own, a read of a
variable or slot in the same function (also in a `tf.cond` branch) is
ordered around the step as if the kernel took its handle, and a group goes
away with its variables."""

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import kernels
from keras_adamw.kernels import variable_group


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    reason = kernels.unavailable_reason()
    assert reason is None, f"the kernel must build here: {reason}"


def momentums(optimizer):
    return [v for v in optimizer.variables if "momentum" in v.path]


def built_optimizer(options):
    """Eight variables of 64 elements and a built fused AdamW with
    `options`."""
    variables = [
        keras.Variable(np.full([64], float(i + 1), np.float32))
        for i in range(8)
    ]
    optimizer = keras_adamw.AdamW(learning_rate=0.1, fused=True, **options)
    optimizer.build(variables)
    return variables, optimizer


# skip_nonfinite puts the kernel inside a tf.cond, whose op takes the group.
@pytest.mark.parametrize("options", [{}, {"skip_nonfinite": True}])
def test_slot_reads_in_the_step_function_are_ordered_around_the_step(
    options,
):
    variables, optimizer = built_optimizer(options)
    slots = momentums(optimizer)

    @tf.function
    def step_between_reads(gradients):
        before = [tf.convert_to_tensor(m) for m in slots]
        optimizer.apply(gradients, variables)
        after = [tf.convert_to_tensor(m) for m in slots]
        return before, after

    gradients = [tf.fill([64], float(i + 1)) for i in range(8)]
    for _ in range(3):
        previous = [m.numpy() for m in slots]
        before, after = step_between_reads(gradients)
        for read, value in zip(before, previous):
            np.testing.assert_array_equal(read.numpy(), value)
        for read, slot in zip(after, slots):
            np.testing.assert_array_equal(read.numpy(), slot.numpy())
        assert not all(np.array_equal(a, b) for a, b in zip(after, before))


# The model variables' reads: a forward pass before the step and any read
# after it (an EMA inside the step reads them after the kernel, in the
# tf.cond of skip_nonfinite and of gradient accumulation).
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"skip_nonfinite": True},
        {"use_ema": True, "ema_momentum": 0.5},
        {"use_ema": True, "ema_momentum": 0.5, "skip_nonfinite": True},
        {"gradient_accumulation_steps": 2},
    ],
)
def test_variable_reads_in_the_step_function_are_ordered_around_the_step(
    options,
):
    variables, optimizer = built_optimizer(options)

    @tf.function
    def step_between_reads():
        before = [tf.convert_to_tensor(v) for v in variables]
        # Gradients computed from the weights read before the step.
        optimizer.apply([2.0 * b for b in before], variables)
        after = [tf.convert_to_tensor(v) for v in variables]
        return before, after

    def averages():
        return [a.numpy() for a in optimizer.variables if "average" in a.path]

    for call in range(1, 5):
        previous = [v.numpy() for v in variables]
        old_averages = averages()
        before, after = step_between_reads()
        for read, value in zip(before, previous):
            np.testing.assert_array_equal(read.numpy(), value)
        for read, variable in zip(after, variables):
            np.testing.assert_array_equal(read.numpy(), variable.numpy())
        # With accumulation, every second call steps.
        stepped = call % options.get("gradient_accumulation_steps", 1) == 0
        assert stepped == (
            not any(np.array_equal(a, b) for a, b in zip(after, before))
        )
        if options.get("use_ema"):
            # The average moved to the NEW weights: 0.5 * old + 0.5 * new
            # (the first step copies them).
            assert len(old_averages) == len(variables)
            for average, old, new in zip(averages(), old_averages, after):
                expected = (
                    new.numpy() if call == 1 else 0.5 * old + 0.5 * new.numpy()
                )
                np.testing.assert_allclose(average, expected, rtol=1e-6)


def test_a_step_in_a_function_captures_no_variable_or_slot():
    # Gradients made inside the function: what it captures is the group
    # and a few scalars (step counter, learning rate), not each variable,
    # momentum and velocity.
    count = 40
    variables = [
        keras.Variable(np.ones([3], np.float32)) for _ in range(count)
    ]
    optimizer = keras_adamw.AdamW(fused=True)
    optimizer.build(variables)

    @tf.function
    def step():
        optimizer.apply([tf.ones([3])] * count, variables)

    step()
    captured = step.get_concrete_function().captured_inputs
    assert "KerasAdamwApplyAdam" in {
        op.type for op in step.get_concrete_function().graph.get_operations()
    }
    assert len(captured) < 12


def test_a_group_goes_with_its_variables():
    gc.collect()
    groups = len(variable_group._groups)
    variables = [keras.Variable(np.ones([3], np.float32)) for _ in range(3)]
    optimizer = keras_adamw.AdamW(fused=True)
    optimizer.apply([tf.ones([3])] * 3, variables)
    assert len(variable_group._groups) == groups + 1
    del optimizer
    gc.collect()
    assert len(variable_group._groups) == groups


def test_a_group_of_the_wrong_size_is_refused_before_any_write():
    variables = [tf.Variable([1.0, 2.0]), tf.Variable([3.0])]
    slots = [tf.Variable([0.0, 0.0]), tf.Variable([0.0])]
    # Variables and momentums only: velocities missing.
    group = variable_group.variable_group(kernels.load(), [*variables, *slots])
    vector = tf.constant([1.0, 1.0], tf.float64)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="holds 4 variables"
    ):
        kernels.load().keras_adamw_apply_adam(
            group,
            [tf.constant([1.0, 1.0]), tf.constant([1.0])],
            tf.constant(0.1, tf.float64),
            *[vector] * 5,
            tf.constant(1, tf.int64),
            [],
        )
    assert variables[0].numpy().tolist() == [1.0, 2.0]


def test_reads_of_variables_a_function_takes_as_arguments_are_ordered():
    # tf.function maps a tf.Variable argument's handle to an input, which
    # the group's ordering cannot see: the kernel op takes those handles.
    variables = [
        tf.Variable(np.full([64], float(i + 1), np.float32)) for i in range(4)
    ]
    optimizer = keras_adamw.AdamW(learning_rate=0.1, fused=True)
    optimizer.build(variables)

    @tf.function
    def step(variables, gradients):
        optimizer.apply(gradients, variables)
        return [v.read_value() for v in variables]

    gradients = [tf.fill([64], 1.0)] * 4
    for _ in range(3):
        after = step(variables, gradients)
        for read, variable in zip(after, variables):
            np.testing.assert_array_equal(read.numpy(), variable.numpy())
