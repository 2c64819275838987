"""Times one optimizer step on a large embedding table with a sparse
gradient: `keras_adamw.AdamW(sparse_updates="lazy")` against
`sparse_updates="dense"` (the default, exact dense-equivalent update) and
`keras.optimizers.AdamW`, in the same process.

The table is --rows x --dim float32 (default 1,000,000 x 64, 256 MB; with
momentum and velocity 768 MB); each step's gradient is a
`tf.IndexedSlices` of --ids random ids (repeats included, as an
`Embedding` layer gives). Every implementation is called inside a
`tf.function`, as `model.fit` calls it (keras_adamw with its default
jit_compile=True, Keras with its default, no XLA). Samples are taken in
turns (interleaved), medians reported, with the load other processes put
on the machine.

Usage:

    python benchmarks/sparse_embedding.py
    python benchmarks/sparse_embedding.py --rows=100000 --samples=5
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", 1_000_000, "Embedding rows.", lower_bound=1)
flags.DEFINE_integer("dim", 64, "Embedding width.", lower_bound=1)
flags.DEFINE_integer("ids", 4096, "Ids per batch.", lower_bound=1)
flags.DEFINE_integer("samples", 7, "Samples per implementation.")
flags.DEFINE_integer("lazy_steps", 50, "Steps per sample of lazy.")
flags.DEFINE_integer("dense_steps", 3, "Steps per sample of the others.")
flags.DEFINE_list(
    "implementations",
    ["keras_adamw_lazy", "keras_adamw_dense", "keras"],
    "keras_adamw_lazy, keras_adamw_dense, keras_adamw_lazy_noxla, keras.",
)


def make(name, tf, keras, keras_adamw, table_init, gradients):
    """A step function of implementation `name` on its own table."""
    table = keras.Variable(table_init, name="table")
    if name == "keras":
        optimizer = keras.optimizers.AdamW()
    else:
        optimizer = keras_adamw.AdamW(
            sparse_updates="dense" if name.endswith("dense") else "lazy",
            jit_compile=not name.endswith("noxla"),
        )
    optimizer.build([table])

    @tf.function
    def apply(gradient):
        optimizer.apply([gradient], [table])

    position = [0]

    def step():
        apply(gradients[position[0] % len(gradients)])
        position[0] += 1

    def block():
        return float(table.value[0, 0].numpy())

    return step, block


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_adamw

    rng = np.random.RandomState(0)
    table_init = tf.constant(
        rng.randn(FLAGS.rows, FLAGS.dim).astype("float32") * 0.05
    )
    gradients = [
        tf.IndexedSlices(
            tf.constant(rng.randn(FLAGS.ids, FLAGS.dim).astype("float32")),
            tf.constant(rng.randint(0, FLAGS.rows, FLAGS.ids), tf.int32),
            tf.constant([FLAGS.rows, FLAGS.dim]),
        )
        for _ in range(4)
    ]
    steps = {}
    first_call = {}
    for name in FLAGS.implementations:
        common.log(f"setting up {name}")
        step, block = make(name, tf, keras, keras_adamw, table_init, gradients)
        start = time.perf_counter()
        step()
        block()
        first_call[name] = time.perf_counter() - start
        step()
        block()
        steps[name] = (step, block)
    times = {name: [] for name in steps}
    load = common.OtherLoad().start()
    for sample in range(FLAGS.samples):
        for name, (step, block) in steps.items():
            count = FLAGS.lazy_steps if "lazy" in name else FLAGS.dense_steps
            start = time.perf_counter()
            for _ in range(count):
                step()
            block()
            times[name].append((time.perf_counter() - start) / count)
        common.log(f"sample {sample + 1}/{FLAGS.samples} done")
    other_load = load.stop()
    lines = common.header(
        "Sparse embedding step: lazy vs dense",
        ["tensorflow", "keras", "keras_adamw"],
    )
    lines += [
        f"- table {FLAGS.rows:,} x {FLAGS.dim} float32, {FLAGS.ids:,} ids "
        f"per step; {FLAGS.samples} interleaved samples; other processes "
        f"kept {other_load:.2f} cores busy on average",
        "",
        "| implementation | median step | p10-p90 | first call "
        "| dense / this |",
        "| --- | --- | --- | --- | --- |",
    ]
    reference = statistics.median(times.get("keras_adamw_dense", [np.nan]))
    for name, samples in times.items():
        median = statistics.median(samples)
        lines.append(
            f"| {name} | {median * 1e3:.2f} ms "
            f"| {common.percentile(samples, 10) * 1e3:.2f}-"
            f"{common.percentile(samples, 90) * 1e3:.2f} ms "
            f"| {first_call[name]:.2f} s | {reference / median:.1f}x |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
