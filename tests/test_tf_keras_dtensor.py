"""keras_adamw.tf_keras on a DTensor mesh: a tf_keras model laid out with
`tf_keras.dtensor.experimental.LayoutMap` on a 2x2 mesh of logical CPUs,
trained with `fit` (tf_keras 2.21 supports `fit` on DTensor models fed by
a `dtensor.DTensorDataset`), against the same model on one device."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.experimental import dtensor

import keras_adamw.tf_keras

U = dtensor.UNSHARDED
MESH = dtensor.create_mesh([("batch", 2), ("model", 2)], device_type="CPU")
RNG = np.random.RandomState(0)
IDS = RNG.randint(0, 16, (64, 4)).astype("int32")
IDS[:, 1] = IDS[:, 0]  # Repeated ids within each example.
Y = RNG.randn(64, 1).astype("float32")
BATCH = 16
STEPS = 8
# Kernels sharded on "model"; the batch on "batch".
LAYOUTS = {
    "emb.*embeddings": [U, "model"],
    "d1.*kernel": [U, "model"],
    "d1.*bias": ["model"],
    "d2.*kernel": ["model", U],
}
KWARGS = {
    "learning_rate": 0.01,
    "weight_decay": 0.01,
    "amsgrad": True,
    "global_clipnorm": 0.5,
    "use_ema": True,
    "ema_momentum": 0.9,
}


def make_model():
    tf_keras.utils.set_random_seed(3)
    ids = tf_keras.Input((4,), dtype="int32")
    x = tf_keras.layers.Embedding(16, 8, name="emb")(ids)
    x = tf_keras.layers.Flatten()(x)
    x = tf_keras.layers.Dense(8, activation="tanh", name="d1")(x)
    return tf_keras.Model(ids, tf_keras.layers.Dense(1, name="d2")(x))


def make_sharded_model():
    layout_map = tf_keras.dtensor.experimental.LayoutMap(MESH)
    for pattern, specs in LAYOUTS.items():
        layout_map[pattern] = dtensor.Layout(specs, MESH)
    with layout_map.scope():
        return make_model()


def global_value(variable):
    value = tf.convert_to_tensor(variable)
    if not dtensor.is_dtensor(value):
        return value.numpy()
    replicated = dtensor.Layout.replicated(MESH, value.shape.rank)
    return dtensor.unpack(dtensor.relayout(value, replicated))[0].numpy()


def sharded_dataset():
    batch = dtensor.Layout(["batch", U], MESH)
    return dtensor.DTensorDataset(
        tf.data.Dataset.from_tensor_slices((IDS, Y)).repeat(),
        mesh=MESH,
        layouts=(batch, batch),
        global_batch_size=BATCH,
        batch_dim="batch",
    )


def fit(model, optimizer, dataset):
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(dataset, steps_per_epoch=STEPS // 2, epochs=2, verbose=0)
    return [global_value(v) for v in model.weights + optimizer.variables]


@pytest.fixture(scope="module")
def one_device():
    model = make_model()
    initial = [w.numpy() for w in model.weights]
    dataset = tf.data.Dataset.from_tensor_slices((IDS, Y)).batch(BATCH)
    values = fit(model, keras_adamw.tf_keras.AdamW(**KWARGS), dataset.repeat())
    return initial, values


@pytest.mark.parametrize("state_sharding_axis", [None, "batch"])
def test_fit_on_a_mesh_equals_one_device(one_device, state_sharding_axis):
    initial, expected = one_device
    model = make_sharded_model()
    assert all(isinstance(w, dtensor.DVariable) for w in model.weights)
    optimizer = keras_adamw.tf_keras.AdamW(
        mesh=MESH, state_sharding_axis=state_sharding_axis, **KWARGS
    )
    actual = fit(model, optimizer, sharded_dataset())
    assert int(global_value(optimizer.iterations)) == STEPS
    # Weights, EMA averages, m, v, vhat (after fit copied the averages in).
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5)

    # Every slot is a DVariable laid out like its variable (ZeRO-1: also
    # sharded on "batch" where the variable is replicated along it).
    by_name = {w.name: w for w in model.weights}
    for slot in optimizer.variables[1:]:
        variable = by_name[slot.name.split("/", 2)[2]]
        specs = list(variable.layout.sharding_specs)
        if state_sharding_axis is not None:
            for dim, spec in enumerate(specs):
                if spec == U and variable.shape[dim] % 2 == 0:
                    specs[dim] = state_sharding_axis
                    break
        assert list(slot.layout.sharding_specs) == specs, slot.name

    # The EMA moved (tf_keras' own mesh mode leaves it at the initial
    # weights): fit ended by copying the averages into the weights.
    moved = [np.abs(w - i).max() for w, i in zip(actual, initial)]
    assert min(moved) > 1e-3


def test_checkpoint_on_a_mesh_resumes_equal_to_uninterrupted(tmp_path):
    # No EMA: fit ends by copying the averages into the weights.
    kwargs = dict(KWARGS, use_ema=False)
    expected_model = make_sharded_model()
    expected_optimizer = keras_adamw.tf_keras.AdamW(mesh=MESH, **kwargs)
    expected = fit(expected_model, expected_optimizer, sharded_dataset())

    model = make_sharded_model()
    optimizer = keras_adamw.tf_keras.AdamW(mesh=MESH, **kwargs)
    model.compile(optimizer=optimizer, loss="mse")
    dataset = sharded_dataset()
    model.fit(dataset, steps_per_epoch=STEPS // 2, epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    model = make_sharded_model()
    optimizer = keras_adamw.tf_keras.AdamW(mesh=MESH, **kwargs)
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    checkpoint.restore(path).assert_existing_objects_matched()
    model.compile(optimizer=optimizer, loss="mse")
    # A new iterator from the start: 4 batches are all 64 examples, which
    # the uninterrupted run's second half saw in the same order.
    model.fit(dataset, steps_per_epoch=STEPS // 2, epochs=1, verbose=0)
    actual = [global_value(v) for v in model.weights + optimizer.variables]
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-6)
    for slot in optimizer.variables[1:]:
        assert isinstance(slot, dtensor.DVariable)

    # .keras state I/O: whole values out, back in their layouts.
    store = {}
    optimizer.save_own_variables(store)
    again = keras_adamw.tf_keras.AdamW(mesh=MESH, **kwargs)
    again.build(model.trainable_variables)
    again.load_own_variables(store)
    for i, (loaded, saved) in enumerate(
        zip(again.variables, optimizer.variables)
    ):
        assert store[str(i)].shape == saved.shape
        assert loaded.layout == saved.layout
        np.testing.assert_array_equal(
            global_value(loaded), global_value(saved)
        )


def test_keras_2_9_signature_on_a_mesh_and_config_round_trip():
    optimizer = keras_adamw.tf_keras.dtensor.AdamW(
        learning_rate=0.01,
        gradients_clip_option={"global_clipnorm": 0.5},
        ema_option=keras_adamw.tf_keras.dtensor.EMAOption(
            use_ema=True, ema_momentum=0.9
        ),
        mesh=MESH,
    )
    assert optimizer.global_clipnorm == 0.5 and optimizer.use_ema
    config = json.loads(json.dumps(optimizer.get_config()))
    assert config["mesh"] == MESH.to_string()
    again = keras_adamw.tf_keras.dtensor.AdamW.from_config(config)
    assert again.get_config() == optimizer.get_config()
    restored = tf_keras.optimizers.deserialize(
        json.loads(json.dumps(tf_keras.optimizers.serialize(optimizer)))
    )
    assert type(restored) is keras_adamw.tf_keras.dtensor.AdamW
    with pytest.raises(ValueError, match="clip_norm"):
        keras_adamw.tf_keras.dtensor.Adam(
            gradients_clip_option={"clip_norm": 1.0}
        )
