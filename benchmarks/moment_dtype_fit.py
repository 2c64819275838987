"""Trains a small transformer with `model.fit` twice from the same weights
on the same batches: `keras_adamw.AdamW()` (float32 moments) and
`keras_adamw.AdamW(moment_dtype="bfloat16")` (4 bytes of optimizer state
per parameter instead of 8), and prints both loss curves and the final
losses.

The task is learnable next-token prediction: each sequence counts from a
random start with a random stride (mod --vocab). The model: token and
position embeddings, --blocks pre-norm blocks (causal attention, gelu
MLP), a final projection to the vocabulary.

Usage:

    python benchmarks/moment_dtype_fit.py
    python benchmarks/moment_dtype_fit.py --steps=600
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 400, "Training steps (batches).", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_integer("seq_len", 32, "Tokens per sequence.", lower_bound=2)
flags.DEFINE_integer("vocab", 256, "Vocabulary size.", lower_bound=2)
flags.DEFINE_integer("d_model", 64, "Model width.", lower_bound=1)
flags.DEFINE_integer("heads", 4, "Attention heads.", lower_bound=1)
flags.DEFINE_integer("blocks", 2, "Transformer blocks.", lower_bound=1)
flags.DEFINE_integer("every", 25, "Steps per point of the printed curves.")
flags.DEFINE_float("lr", 3e-3, "Learning rate.")


def make_data(np):
    rng = np.random.RandomState(0)
    count = FLAGS.steps * FLAGS.batch_size
    start = rng.randint(0, FLAGS.vocab, (count, 1))
    stride = rng.randint(1, 8, (count, 1))
    tokens = (start + stride * np.arange(FLAGS.seq_len + 1)) % FLAGS.vocab
    return tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")


def make_model(keras):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((FLAGS.seq_len,), dtype="int32")
    x = keras.layers.Embedding(FLAGS.vocab, FLAGS.d_model)(inputs)
    positions = keras.layers.Embedding(FLAGS.seq_len, FLAGS.d_model)(
        keras.ops.arange(FLAGS.seq_len)
    )
    x = x + positions
    for _ in range(FLAGS.blocks):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(
            FLAGS.heads, FLAGS.d_model // FLAGS.heads
        )(h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(4 * FLAGS.d_model, activation="gelu")(h)
        x = x + keras.layers.Dense(FLAGS.d_model)(h)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(FLAGS.vocab)(x))


def train(keras, keras_adamw, data, moment_dtype):
    model = make_model(keras)
    optimizer = keras_adamw.AdamW(FLAGS.lr, moment_dtype=moment_dtype)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    start = time.perf_counter()
    model.fit(
        *data,
        batch_size=FLAGS.batch_size,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[Record()],
    )
    state = sum(
        int(v.numpy().nbytes) for v in optimizer.variables if len(v.shape) > 0
    )
    parameters = sum(int(v.numpy().size) for v in model.trainable_variables)
    return losses, time.perf_counter() - start, state / parameters


def main(argv):
    del argv
    import keras
    import numpy as np

    import keras_adamw

    data = make_data(np)
    runs = {}
    for moment_dtype in (None, "bfloat16"):
        common.log(f"training with moment_dtype={moment_dtype}")
        runs[moment_dtype] = train(keras, keras_adamw, data, moment_dtype)
    lines = common.header(
        "moment_dtype='bfloat16' against float32 moments under fit",
        ["tensorflow", "keras", "keras_adamw"],
    )
    (f32, f32_time, f32_bytes), (b16, b16_time, b16_bytes) = runs.values()

    # fit's loss is the running mean over the epoch; the per-batch loss
    # of step i is recovered from consecutive means.
    def per_batch(means):
        return [
            m * (i + 1) - means[i - 1] * i if i else m
            for i, m in enumerate(means)
        ]

    f32, b16 = per_batch(f32), per_batch(b16)
    window = max(1, min(20, len(f32) // 10))
    final32 = float(np.mean(f32[-window:]))
    final16 = float(np.mean(b16[-window:]))
    lines += [
        f"- {FLAGS.steps} steps of batch {FLAGS.batch_size}, sequence "
        f"{FLAGS.seq_len}, vocabulary {FLAGS.vocab}, width {FLAGS.d_model}, "
        f"{FLAGS.blocks} blocks, lr {FLAGS.lr}",
        "",
        "| step | loss, float32 moments | loss, bfloat16 moments |",
        "| --- | --- | --- |",
    ]
    for i in range(0, len(f32), FLAGS.every):
        stop = min(i + FLAGS.every, len(f32))
        lines.append(
            f"| {i + 1}-{stop} | {np.mean(f32[i:stop]):.4f} "
            f"| {np.mean(b16[i:stop]):.4f} |"
        )
    lines += [
        "",
        f"- final loss (mean of the last {window} steps): float32 moments "
        f"{final32:.4f}, bfloat16 moments {final16:.4f} "
        f"({(final16 - final32) / final32 * 100:+.2f}%)",
        f"- optimizer state: {f32_bytes:.1f} vs {b16_bytes:.1f} bytes per "
        "parameter",
        f"- fit time: {f32_time:.1f} s vs {b16_time:.1f} s",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
