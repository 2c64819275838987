"""Rules on a BERT-like Keras model: layer-wise learning-rate decay and
bias/norm exclusion with `fit`, `explain()` against the applied update,
and resuming from `.keras`, `tf.train.Checkpoint` and `BackupAndRestore`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adamw


@keras.saving.register_keras_serializable(package="test_rules_training")
class Block(keras.layers.Layer):
    """A transformer-like block: dense, residual, layer norm."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, activation="tanh", name="dense")
        self.norm = keras.layers.LayerNormalization(name="norm")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.norm.build(input_shape)

    def call(self, x):
        return self.norm(x + self.dense(x))

    def get_config(self):
        return dict(super().get_config(), units=self.units)


def make_model(blocks=3, seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="token_embedding")(ids)
    for i in range(blocks):
        x = Block(8, name=f"encoder_layer_{i}")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(ids, keras.layers.Dense(1, name="head")(x))


RNG = np.random.RandomState(0)
X = RNG.randint(0, 20, size=(32, 4)).astype("int32")
Y = np.sin(X.sum(axis=1, keepdims=True) / 7.0).astype("float32")


def make_optimizer(model):
    return keras_adamw.AdamW(
        learning_rate=0.01,
        weight_decay=0.1,
        variable_rules=[("bias|norm", {"weight_decay": 0.0})]
        + keras_adamw.layerwise_lr_decay(model, 0.5),
    )


def test_layerwise_rules_of_a_bert_like_model():
    model = make_model()
    rules = dict(keras_adamw.layerwise_lr_decay(model, 0.5))
    assert rules == {
        "embed": {"learning_rate_multiplier": 0.5**4},
        "(?:^|/)encoder_layer_2(?=[/_])": {"learning_rate_multiplier": 0.5},
        "(?:^|/)encoder_layer_1(?=[/_])": {"learning_rate_multiplier": 0.25},
        "(?:^|/)encoder_layer_0(?=[/_])": {"learning_rate_multiplier": 0.125},
    }
    rows = {
        r.path: r
        for r in make_optimizer(model).explain(model.trainable_variables)
    }
    assert rows["head/kernel"].learning_rate_multiplier == 1.0
    assert rows["encoder_layer_2/dense/kernel"].learning_rate_multiplier == (
        0.5
    )
    # The bias rule gives no multiplier: the layer's still applies.
    assert rows["encoder_layer_0/dense/bias"].learning_rate_multiplier == (
        0.125
    )
    assert rows["encoder_layer_0/dense/bias"].weight_decay == 0.0
    assert rows["encoder_layer_0/norm/gamma"].weight_decay == 0
    assert rows["encoder_layer_0/dense/kernel"].weight_decay == 0.1


def test_keras_auto_names_and_paths():
    paths = [
        "transformer_block/dense/kernel",
        "transformer_block_1/dense/kernel",
        "transformer_block_10/dense/kernel",
        "transformer_block_1_norm/gamma",
        "layer_normalization/gamma",
        "embedding/embeddings",
    ]
    rules = keras_adamw.layerwise_lr_decay(paths, 0.5)
    optimizer = keras_adamw.AdamW(variable_rules=rules)
    multipliers = {
        r.path: r.learning_rate_multiplier
        for r in optimizer.explain([_Path(p) for p in paths])
    }
    assert multipliers == {
        "transformer_block/dense/kernel": 0.5**11,
        "transformer_block_1/dense/kernel": 0.5**10,
        "transformer_block_10/dense/kernel": 0.5,
        "transformer_block_1_norm/gamma": 0.5**10,
        "layer_normalization/gamma": 1.0,
        "embedding/embeddings": 0.5**12,
    }
    with pytest.raises(ValueError, match="No block found"):
        keras_adamw.layerwise_lr_decay(["head/kernel"], 0.5)
    with pytest.raises(ValueError, match="decay"):
        keras_adamw.layerwise_lr_decay(paths, 0.0)
    with pytest.raises(TypeError, match="list of variable paths"):
        keras_adamw.layerwise_lr_decay("head/kernel", 0.5)


class _Path:
    """A stand-in variable with a path."""

    def __init__(self, path):
        self.path = self.name = path
        self.shape = (1,)
        self.dtype = "float32"


def test_fit_trains_and_explain_matches_the_applied_update():
    model = make_model()
    optimizer = make_optimizer(model)
    model.compile(optimizer=optimizer, loss="mse")
    # One step by hand, to read the update of every variable.
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(X) - Y))
    grads = tape.gradient(loss, model.trainable_variables)
    rows = optimizer.explain(model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    for row, variable, w, g in zip(
        rows, model.trainable_variables, before, grads
    ):
        g = tf.convert_to_tensor(g).numpy().astype(np.float64)
        # The first Adam step: alpha * m / (sqrt(v) + eps) with
        # m = (1 - b1) g, v = (1 - b2) g^2, as explain() claims the values.
        root = np.sqrt(1 - row.beta_2)
        expected = (
            w
            - w * row.decay_per_step
            - row.learning_rate * root * g / (root * np.abs(g) + row.epsilon)
        )
        np.testing.assert_allclose(
            variable.numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=row.path
        )
    multipliers = {r.learning_rate_multiplier for r in rows}
    assert multipliers == {1.0, 0.5, 0.25, 0.125, 0.0625}
    history = model.fit(X, Y, batch_size=8, epochs=8, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


def fit(model, epochs, **kwargs):
    model.fit(
        X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, **kwargs
    )


def compiled_model(seed=0):
    """The model, compiled with rules and an exclusion by variable."""
    model = make_model(seed=seed)
    optimizer = make_optimizer(model)
    optimizer.exclude_from_weight_decay(var_list=[model.layers[-1].kernel])
    model.compile(optimizer=optimizer, loss="mse")
    return model, optimizer


@pytest.fixture(scope="module")
def uninterrupted():
    model, _ = compiled_model()
    fit(model, 4)
    return model


def assert_same_weights(model, expected):
    for a, b in zip(model.trainable_variables, expected.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)


def test_keras_file_resumes_with_rules_and_exclusions(tmp_path, uninterrupted):
    model, optimizer = compiled_model()
    fit(model, 2)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.optimizer.variable_rules == optimizer.variable_rules
    rows = {r.path: r for r in loaded.optimizer.explain()}
    assert rows["head/kernel"].weight_decay == 0.0
    fit(loaded, 2)
    assert_same_weights(loaded, uninterrupted)


def test_checkpoint_resumes_with_rules(tmp_path, uninterrupted):
    model, optimizer = compiled_model()
    fit(model, 2)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    resumed = make_model(seed=1)
    resumed_optimizer = keras_adamw.AdamW.from_config(optimizer.get_config())
    resumed.compile(optimizer=resumed_optimizer, loss="mse")
    resumed_optimizer.build(resumed.trainable_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed_optimizer).restore(
        path
    ).assert_consumed()
    fit(resumed, 2)
    assert_same_weights(resumed, uninterrupted)


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("crash")


def test_backup_and_restore_resumes_with_rules(tmp_path, uninterrupted):
    backup = str(tmp_path / "backup")
    model, optimizer = compiled_model()
    with pytest.raises(RuntimeError, match="crash"):
        fit(
            model,
            4,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _Crash()],
        )
    # A new process would rebuild the model and optimizer from code.
    resumed, resumed_optimizer = compiled_model(seed=1)
    fit(resumed, 4, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert int(resumed_optimizer.iterations) == 16
    assert_same_weights(resumed, uninterrupted)
