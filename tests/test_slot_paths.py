"""Slots are restored to their own variable (reliability issue, point 8):
the state saved records each slot's variable path (`keras_adamw.slot_paths`)
and a restore matches by it, in `.keras` files and `tf.train.Checkpoint`.

Same-shaped variables (two Dense(2) layers on 2 inputs) built in another
order are the case where matching by position swaps slots silently.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw


def make_model():
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(2, name="d1"),
            keras.layers.Dense(2, name="d2"),
        ],
        name="m",
    )


def trained(optimizer_class=keras_adamw.AdamW, order=None, **kwargs):
    """A model and an optimizer after one step in which variable i had
    gradient i + 1, so every slot differs from the others."""
    model = make_model()
    variables = model.trainable_variables
    optimizer = optimizer_class(**kwargs)
    optimizer.build([variables[i] for i in order or range(len(variables))])
    optimizer.apply(
        [tf.ones_like(v) * (i + 1) for i, v in enumerate(variables)],
        variables,
    )
    return model, optimizer


def slots_by_path(model, optimizer):
    """{(layer/variable, slot): value} through the optimizer's own lists."""
    result = {}
    names = ["momentum", "velocity"]
    for variable in model.trainable_variables:
        key = "/".join(variable.path.split("/")[-2:])  # Layer/variable.
        for name, slot_list in zip(
            names, [optimizer._momentums, optimizer._velocities]
        ):
            index = [id(v) for v in optimizer._trainable_variables].index(
                id(variable)
            )
            result[key, name] = slot_list[index].numpy()
    return result


def assert_same_slots(expected, actual):
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], str(key))


SWAPPED = [2, 3, 0, 1]  # d2's variables first.


def test_checkpoint_restored_before_build_gives_each_slot_its_variable(
    tmp_path,
):
    model, optimizer = trained()
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    restored_model = make_model()
    restored = keras_adamw.AdamW()
    status = tf.train.Checkpoint(
        model=restored_model, optimizer=restored
    ).restore(path)
    variables = restored_model.trainable_variables
    restored.build([variables[i] for i in SWAPPED])
    status.assert_existing_objects_matched()
    assert_same_slots(
        slots_by_path(model, optimizer),
        slots_by_path(restored_model, restored),
    )
    for a, b in zip(model.get_weights(), restored_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def snapshot(model, optimizer):
    return [v.numpy() for v in model.weights + optimizer.variables]


def test_checkpoint_into_an_optimizer_built_in_another_order_is_refused(
    tmp_path,
):
    model, optimizer = trained()
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    restored_model = make_model()
    variables = restored_model.trainable_variables
    restored = keras_adamw.AdamW()
    restored.build([variables[i] for i in SWAPPED])
    before = snapshot(restored_model, restored)
    with pytest.raises(ValueError, match="another order"):
        tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(
            path
        ).expect_partial()
    for a, b in zip(before, snapshot(restored_model, restored)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_with_other_slots_is_refused(tmp_path):
    model, optimizer = trained(amsgrad=True)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    restored_model = make_model()
    restored = keras_adamw.AdamW(use_ema=True)
    restored.build(restored_model.trainable_variables)
    before = snapshot(restored_model, restored)
    with pytest.raises(ValueError, match="other slots.*amsgrad"):
        tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(
            path
        ).expect_partial()
    for a, b in zip(before, snapshot(restored_model, restored)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direction", ["ours_to_keras", "keras_to_ours"])
def test_checkpoints_still_move_between_keras_and_keras_adamw(
    tmp_path, direction
):
    saver, loader = keras_adamw.AdamW, keras.optimizers.AdamW
    if direction == "keras_to_ours":
        saver, loader = loader, saver
    model, optimizer = trained(saver)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    restored_model = make_model()
    restored = loader()
    restored.build(restored_model.trainable_variables)
    tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(
        path
    ).assert_existing_objects_matched()
    assert_same_slots(
        slots_by_path(model, optimizer),
        slots_by_path(restored_model, restored),
    )


def test_keras_file_gives_each_slot_its_variable(tmp_path):
    # Built on d2 first; `load_model` builds in the model's order.
    model, optimizer = trained(order=SWAPPED)
    model.compile(optimizer=optimizer, loss="mse")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert int(loaded.optimizer.iterations) == 1
    assert_same_slots(
        slots_by_path(model, optimizer),
        slots_by_path(loaded, loaded.optimizer),
    )


def test_a_count_mismatch_says_what_differs():
    model, optimizer = trained(amsgrad=True)
    store = {}
    optimizer.save_own_variables(store)
    other = keras_adamw.AdamW()
    other.build(make_model().trainable_variables)
    with pytest.warns(UserWarning, match="3 slots per model variable.*2"):
        other.load_own_variables(store)


def wide_model():
    """`make_model` with a wider second layer: d2's variables differ."""
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(2, name="d1"),
            keras.layers.Dense(3, name="d2"),
        ],
        name="m",
    )


def test_checkpoint_of_other_shapes_changes_nothing(tmp_path):
    # Without the check, TensorFlow writes d1's variables and slots, then
    # fails on d2's.
    model, optimizer = trained()
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    restored_model = wide_model()
    restored = keras_adamw.AdamW()
    restored.build(restored_model.trainable_variables)
    before = snapshot(restored_model, restored)
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(
            path
        ).expect_partial()
    for a, b in zip(before, snapshot(restored_model, restored)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, model, match",
    [
        ({}, wide_model, r"shape \(2, 2\) for 'd2/kernel'"),
        ({"amsgrad": True}, make_model, "would make slots"),
    ],
)
def test_building_unlike_a_restored_checkpoint_builds_nothing(
    tmp_path, kwargs, model, match
):
    _, optimizer = trained()
    path = tf.train.Checkpoint(optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    restored = keras_adamw.AdamW(**kwargs)
    tf.train.Checkpoint(optimizer=restored).restore(path).expect_partial()
    with pytest.raises(ValueError, match=match):
        restored.build(model().trainable_variables)
    assert not restored.built and len(restored.variables) == 2


@pytest.mark.parametrize("direction", ["ours_to_keras", "keras_to_ours"])
def test_keras_files_still_move_between_keras_and_keras_adamw(
    tmp_path, direction
):
    saver, loader = keras_adamw.AdamW, keras.optimizers.AdamW
    if direction == "keras_to_ours":
        saver, loader = loader, saver
    model, optimizer = trained(saver)
    model.compile(optimizer=optimizer, loss="mse")
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored_model = make_model()
    restored = loader()
    restored.build(restored_model.trainable_variables)
    restored_model.compile(optimizer=restored, loss="mse")
    restored_model.load_weights(path)
    assert int(restored.iterations) == 1
    assert_same_slots(
        slots_by_path(model, optimizer),
        slots_by_path(restored_model, restored),
    )
