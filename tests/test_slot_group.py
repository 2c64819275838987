"""Slot groups (`keras_adamw.kernels.slot_group`): the fused kernel takes a
step's slots behind one handle. A step in a `tf.function` then captures
about two inputs per variable, a slot read in the same function is ordered
around the step as if the kernel took the slot's handle, and a group goes
away with its slots."""

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw
from keras_adamw import kernels
from keras_adamw.kernels import slot_group


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    reason = kernels.unavailable_reason()
    assert reason is None, f"the kernel must build here: {reason}"


def momentums(optimizer):
    return [v for v in optimizer.variables if "momentum" in v.path]


# skip_nonfinite puts the kernel inside a tf.cond, whose op takes the group.
@pytest.mark.parametrize("options", [{}, {"skip_nonfinite": True}])
def test_slot_reads_in_the_step_function_are_ordered_around_the_step(
    options,
):
    variables = [
        keras.Variable(np.full([64], float(i + 1), np.float32))
        for i in range(8)
    ]
    optimizer = keras_adamw.AdamW(learning_rate=0.1, fused=True, **options)
    optimizer.build(variables)
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


def test_a_step_in_a_function_captures_no_slot():
    # Gradients made inside the function: what it captures is the
    # variables, the group and a few scalars (step counter, learning rate),
    # not each variable's momentum and velocity.
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
    assert count < len(captured) < count + 12


def test_a_group_goes_with_its_slots():
    gc.collect()
    groups = len(slot_group._groups)
    variables = [keras.Variable(np.ones([3], np.float32)) for _ in range(3)]
    optimizer = keras_adamw.AdamW(fused=True)
    optimizer.apply([tf.ones([3])] * 3, variables)
    assert len(slot_group._groups) == groups + 1
    del optimizer
    gc.collect()
    assert len(slot_group._groups) == groups


def test_a_group_of_the_wrong_size_is_refused_before_any_write():
    variables = [tf.Variable([1.0, 2.0]), tf.Variable([3.0])]
    slots = [tf.Variable([0.0, 0.0]), tf.Variable([0.0])]
    group = slot_group.slot_group(kernels.load(), slots)  # Too few.
    vector = tf.constant([1.0, 1.0], tf.float64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="holds 2 slots"):
        kernels.load().keras_adamw_apply_adam(
            [v.handle for v in variables],
            group,
            [tf.constant([1.0, 1.0]), tf.constant([1.0])],
            tf.constant(0.1, tf.float64),
            *[vector] * 5,
            tf.constant(1, tf.int64),
        )
    assert variables[0].numpy().tolist() == [1.0, 2.0]
