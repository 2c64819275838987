"""OptimizerLogger: learning rate and weight decay in fit's logs and in
TensorBoard."""

import glob

import keras
import numpy as np
import tensorflow as tf

import keras_adamw


def event_values(logdir, tag):
    """Scalar values written under `tag` in TensorBoard event files."""
    values = []
    for path in sorted(
        glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True)
    ):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == tag:
                    values.append(float(tf.make_ndarray(value.tensor)))
    return values


def test_learning_rate_and_weight_decay_in_history_and_tensorboard(tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.01, decay_steps=4, decay_rate=0.5
    )
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras_adamw.AdamW(learning_rate=schedule, weight_decay=0.1),
        loss="mse",
    )
    x = np.ones((32, 3), "float32")
    history = model.fit(
        x,
        x[:, :1],
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[
            keras_adamw.OptimizerLogger(),
            keras.callbacks.TensorBoard(str(tmp_path)),
        ],
    )
    # 4 steps per epoch: after epoch k the next step is 4k.
    expected = [0.01 * 0.5**k for k in (1, 2, 3)]
    np.testing.assert_allclose(
        history.history["learning_rate"], expected, rtol=1e-6
    )
    np.testing.assert_allclose(
        history.history["effective_weight_decay"],
        [0.1 * lr for lr in expected],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        event_values(str(tmp_path), "epoch_effective_weight_decay"),
        [0.1 * lr for lr in expected],
        rtol=1e-6,
    )
