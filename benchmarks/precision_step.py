"""Times one `keras_adamw.AdamW` step with each precision option against
the same optimizer without it, in the same process: `moment_dtype`,
`kahan_summation` and `skip_nonfinite` on --variables variables of
--size x --size parameters (float32 and bfloat16 variables). Every step is
`apply` inside a `tf.function` with XLA (the default); samples are taken
in turns (interleaved), medians reported, with the load other processes
put on the machine.

Usage:

    python benchmarks/precision_step.py
    python benchmarks/precision_step.py --size=256 --samples=3
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("variables", 8, "Variables.", lower_bound=1)
flags.DEFINE_integer("size", 1024, "Each variable is size x size.")
flags.DEFINE_integer("samples", 7, "Samples per configuration.")
flags.DEFINE_integer("steps", 5, "Steps per sample.")

# name: (variable dtype, AdamW arguments, the configuration it is compared to)
CONFIGS = {
    "float32": ("float32", {}, None),
    'float32, moment_dtype="bfloat16"': (
        "float32",
        {"moment_dtype": "bfloat16"},
        "float32",
    ),
    "float32, skip_nonfinite": (
        "float32",
        {"skip_nonfinite": True},
        "float32",
    ),
    "bfloat16": ("bfloat16", {}, None),
    'bfloat16, moment_dtype="float32"': (
        "bfloat16",
        {"moment_dtype": "float32"},
        "bfloat16",
    ),
    "bfloat16, kahan_summation": (
        "bfloat16",
        {"kahan_summation": True},
        "bfloat16",
    ),
}


def make(tf, keras, keras_adamw, dtype, kwargs):
    rng = tf.random.Generator.from_seed(0)
    shape = (FLAGS.size, FLAGS.size)
    variables = [
        keras.Variable(rng.normal(shape) * 0.05, dtype=dtype, name=f"w{i}")
        for i in range(FLAGS.variables)
    ]
    gradients = [tf.cast(rng.normal(shape), dtype) for _ in variables]
    optimizer = keras_adamw.AdamW(**kwargs)
    optimizer.build(variables)

    @tf.function
    def apply():
        optimizer.apply(gradients, variables)

    def step():
        apply()
        optimizer.iterations.numpy()  # Blocks until the step is done.

    return step


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import keras_adamw

    steps = {}
    for name, (dtype, kwargs, _) in CONFIGS.items():
        common.log(f"setting up {name}")
        steps[name] = make(tf, keras, keras_adamw, dtype, kwargs)
        steps[name]()
        steps[name]()
    times = {name: [] for name in steps}
    load = common.OtherLoad().start()
    for sample in range(FLAGS.samples):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                step()
            times[name].append((time.perf_counter() - start) / FLAGS.steps)
        common.log(f"sample {sample + 1}/{FLAGS.samples} done")
    other_load = load.stop()
    medians = {name: statistics.median(t) for name, t in times.items()}
    parameters = FLAGS.variables * FLAGS.size**2
    lines = common.header(
        "AdamW step with each precision option",
        ["tensorflow", "keras", "keras_adamw"],
    )
    lines += [
        f"- {FLAGS.variables} variables of {FLAGS.size} x {FLAGS.size} "
        f"({parameters / 1e6:.1f}M parameters); {FLAGS.samples} "
        f"interleaved samples of {FLAGS.steps} steps; other processes kept "
        f"{other_load:.2f} cores busy on average",
        "",
        "| configuration | median step | p10-p90 | against without |",
        "| --- | --- | --- | --- |",
    ]
    for name, (_, _, base) in CONFIGS.items():
        ratio = f"{medians[name] / medians[base]:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {medians[name] * 1e3:.1f} ms "
            f"| {common.percentile(times[name], 10) * 1e3:.1f}-"
            f"{common.percentile(times[name], 90) * 1e3:.1f} ms | {ratio} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
