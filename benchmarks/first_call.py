"""The first call of keras_adamw's XLA step on many small variables: the
time to trace it (Python building the graph) and to run it the first time
(TensorFlow's graph optimizations and XLA's compilation), then one later
call.

`keras_adamw.AdamW(jit_compile=True, fused=False)` is applied inside a
`tf.function`, as `model.fit` calls it, to --variables variables of
`optimizer_step.py`'s small workload (1k-4k parameters each). It measures
whichever keras_adamw Python imports, so two checkouts compare by running
it once with each on PYTHONPATH (a checkout from before `fused=` existed
runs without that argument); the header names the commit.

Usage:

    python benchmarks/first_call.py
    PYTHONPATH=/path/to/other/checkout python benchmarks/first_call.py
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import workloads  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "variables", 2000, "Number of small variables.", lower_bound=1
)
flags.DEFINE_integer("seed", 0, "Seed of the weights and gradients.")


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    import keras_adamw

    shapes = workloads.small_shapes(FLAGS.variables)
    weights, grads = workloads.make_data(shapes, FLAGS.seed)
    variables = [
        keras.Variable(w, name=f"w{i}") for i, w in enumerate(weights)
    ]
    gradients = [tf.constant(g) for g in grads]
    # Checkouts from before the fused kernel have no `fused` argument.
    fused = {"fused": False} if hasattr(keras_adamw, "fused") else {}
    optimizer = keras_adamw.AdamW(jit_compile=True, **fused)
    optimizer.build(variables)
    step = tf.function(lambda: optimizer.apply(gradients, variables))

    common.log(f"tracing the step on {len(variables)} variables")
    start = time.perf_counter()
    graph = step.get_concrete_function().graph
    trace = time.perf_counter() - start
    common.log("running it the first time (graph optimization, XLA)")
    start = time.perf_counter()
    step()
    first_run = time.perf_counter() - start
    start = time.perf_counter()
    step()
    later = time.perf_counter() - start
    assert int(optimizer.iterations.numpy()) == 2

    lines = common.header(
        "first_call: keras_adamw's XLA step, first call",
        ["tensorflow", "keras", "keras_adamw"],
    )
    lines += [
        "",
        f"{workloads.describe(shapes, 'float32')}; "
        f"the step's outer graph: {len(graph.get_operations())} ops",
        "",
        "| trace s | first run s | first call s | later call s |",
        "| --- | --- | --- | --- |",
        f"| {trace:.1f} | {first_run:.1f} | {trace + first_run:.1f} "
        f"| {later:.3f} |",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
