"""Where the time of keras_adamw's XLA step goes on a CPU.

Three measurements behind the notes in benchmarks/README.md:

1. Memory traffic: the optimized HLO of keras_adamw's step, compiled by
   XLA for the variables of --shapes. For every loop fusion of the entry
   computation it prints the arrays read and written, and in total the
   bytes per parameter the program moves (the minimum is 28 in float32).
2. Bandwidth: the same in-place update `x = 0.999 * x + y` over one flat
   buffer of --bandwidth_size float32 numbers, as an XLA program, with
   torch (in its own process, if installed) and NumPy (one thread), in
   GB/s.
3. Odd sizes: the time of a flat XLA AdamW update over K variables whose
   size is a multiple of 8 and over K variables one element larger.
4. Fixed cost per variable: an XLA program that reads --launch_variables
   tiny variables in one loop, and one that writes each of them with its
   own loop; microseconds per variable. An AdamW step passes four buffers
   per variable (variable, gradient, momentum, velocity) and runs three
   loops per variable.

Usage:

    python benchmarks/xla_profile.py
    python benchmarks/xla_profile.py --shapes=4096x4096,4096 --repeats=20
"""

import os
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "shapes",
    ["7600x768", "768x3072", "3072"],
    "Variable shapes (AxB) for the HLO traffic count.",
)
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Dtype of the variables in the HLO traffic count.",
)
flags.DEFINE_integer(
    "bandwidth_size",
    90_872_832,
    "float32 numbers in the bandwidth test's buffers.",
    lower_bound=8,
)
flags.DEFINE_integer(
    "odd_variables", 169, "Variables in the odd-size test.", lower_bound=1
)
flags.DEFINE_integer(
    "odd_size",
    537_600,
    "Elements per variable in the odd-size test (a "
    "multiple of 8; the odd case adds one).",
    lower_bound=8,
)
flags.DEFINE_integer(
    "launch_variables",
    2000,
    "Variables in the fixed-cost test.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "repeats", 10, "Timed steps per measurement.", lower_bound=1
)
flags.DEFINE_boolean("torch_child", False, "Internal: time torch here.")

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "s64": 8}
_ARRAY = re.compile(r"(f32|bf16|f16|f64|s32|s64)\[([0-9,]*)\]")


def _elements(dims):
    count = 1
    for dim in filter(None, dims.split(",")):
        count *= int(dim)
    return count


def fusion_traffic(hlo):
    """[(name, bytes read, bytes written, elements)] of the entry's array
    fusions, from optimized HLO text. Scalars are ignored."""
    entry = hlo[hlo.index("\nENTRY") :]
    shapes = {}
    for name, dtype, dims in re.findall(
        r"%([\w.\-]+) = (\w+)\[([0-9,]*)\]", entry
    ):
        shapes[name] = (dtype, dims)
    rows = []
    for line in entry.splitlines():
        match = re.match(
            r"\s*%([\w.\-]+) = (\w+)\[([0-9,]*)\]\S* fusion\("
            r"([^)]*)\)",
            line,
        )
        if not match or not match.group(3):
            continue
        name, dtype, dims, operands = match.groups()
        elements = _elements(dims)
        read = 0
        for operand in re.findall(r"%([\w.\-]+)", operands):
            operand_dtype, operand_dims = shapes.get(operand, ("f32", ""))
            if operand_dims and _elements(operand_dims) == elements:
                read += elements * _DTYPE_BYTES.get(operand_dtype, 4)
        written = elements * _DTYPE_BYTES.get(dtype, 4)
        rows.append((name, read, written, elements))
    return rows


def traffic_report():
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_adamw
    from keras_adamw import step

    shapes = [tuple(int(d) for d in s.split("x")) for s in FLAGS.shapes]
    variables = [
        keras.Variable(
            np.zeros(s, np.float32), dtype=FLAGS.dtype, name=f"w{i}"
        )
        for i, s in enumerate(shapes)
    ]
    gradients = [tf.ones(s, FLAGS.dtype) for s in shapes]
    optimizer = keras_adamw.AdamW()
    optimizer.build(variables)
    # The compiled step and its arguments: keras_adamw.execution keeps the
    # program (see tests/test_xla.py).
    program = optimizer._programs.value.compiled(step.apply_step)
    hlo = program.experimental_get_compiler_ir(
        gradients,
        tuple(range(len(variables))),
        optimizer._state(),
        optimizer._hyperparameters(),
        optimizer._step_config(),
    )(stage="optimized_hlo")
    rows = fusion_traffic(hlo)
    parameters = sum(int(np.prod(s)) for s in shapes)
    print("## 1. Memory traffic of keras_adamw's XLA step (optimized HLO)\n")
    print(
        f"Variables {FLAGS.shapes}, {parameters:,} {FLAGS.dtype} parameters.\n"
    )
    print("| fusion | elements | MB read | MB written |")
    print("|---|---|---|---|")
    for name, read, written, elements in rows:
        print(
            f"| {name} | {elements:,} | {read / 1e6:.1f} | "
            f"{written / 1e6:.1f} |"
        )
    total = sum(r + w for _, r, w, _ in rows)
    print(
        f"\n{len(rows)} array fusions for {len(shapes)} variables; "
        f"{total / parameters:.1f} bytes moved per parameter "
        f"({ {'float32': 28, 'bfloat16': 14}[FLAGS.dtype] } if the "
        "variable, momentum and velocity were written by one "
        "loop).\n"
    )


def _rate(step, bytes_moved, repeats, finish=lambda: None):
    for _ in range(2):
        step()
    finish()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    finish()
    seconds = (time.perf_counter() - start) / repeats
    return seconds, bytes_moved / seconds / 1e9


def torch_child():
    import torch

    n = FLAGS.bandwidth_size
    x, y = torch.ones(n), torch.ones(n)
    # One pass, like XLA's fused loop: x += alpha * y (12 bytes).
    seconds, rate = _rate(
        lambda: x.add_(y, alpha=0.999), 12 * n, FLAGS.repeats
    )
    print(f"{seconds} {rate} {torch.get_num_threads()}")


def bandwidth_report():
    import numpy as np
    import tensorflow as tf

    n = FLAGS.bandwidth_size
    print(
        f"## 2. In-place `x = a * x + y` over {n:,} float32 numbers "
        "(12 bytes per element)\n"
    )
    print("| implementation | ms | GB/s |")
    print("|---|---|---|")
    x = tf.Variable(tf.ones([n]))
    y = tf.ones([n])

    @tf.function(jit_compile=True)
    def xla_step():
        x.assign(0.999 * x + y)

    seconds, rate = _rate(
        xla_step, 12 * n, FLAGS.repeats, lambda: x[0].numpy()
    )
    print(
        f"| XLA (tf.function jit_compile=True, "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'all'}"
        f" intra-op threads) | {seconds * 1e3:.1f} | {rate:.1f} |"
    )
    x = y = None  # Free the memory (the closure is done with them).
    a, b = np.ones(n, np.float32), np.ones(n, np.float32)

    def numpy_step():
        np.multiply(a, np.float32(0.999), out=a)
        np.add(a, b, out=a)

    seconds, rate = _rate(numpy_step, 20 * n, FLAGS.repeats)
    print(
        f"| NumPy, one thread (two passes, 20 bytes) | {seconds * 1e3:.1f} "
        f"| {rate:.1f} |"
    )
    a = b = None  # Free the memory.
    completed = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--torch_child",
            f"--bandwidth_size={n}",
            f"--repeats={FLAGS.repeats}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode == 0 and completed.stdout.strip():
        seconds, rate, threads = completed.stdout.split()
        print(
            f"| torch `add_(y, alpha=a)` ({threads} threads, own process) "
            f"| {float(seconds) * 1e3:.1f} | {float(rate):.1f} |"
        )
    else:
        print("| torch | not installed or failed | |")
    print()


def odd_size_report():
    import tensorflow as tf

    print(
        f"## 3. One XLA program updating {FLAGS.odd_variables} variables "
        "(AdamW arithmetic, flat)\n"
    )
    print("| elements per variable | ms | GB/s (28 B/param) |")
    print("|---|---|---|")
    for size in (FLAGS.odd_size, FLAGS.odd_size + 1):
        state = [
            [tf.Variable(tf.ones([size])) for _ in range(3)]
            for _ in range(FLAGS.odd_variables)
        ]
        gradient = tf.ones([size])

        @tf.function(jit_compile=True)
        def step():
            for variable, momentum, velocity in state:
                m = momentum + (gradient - momentum) * 0.1
                v = velocity + (gradient * gradient - velocity) * 0.001
                variable.assign(
                    variable - variable * 4e-6 - 1e-3 * m / (tf.sqrt(v) + 1e-7)
                )
                momentum.assign(m)
                velocity.assign(v)

        parameters = size * FLAGS.odd_variables
        seconds, rate = _rate(
            step,
            28 * parameters,
            FLAGS.repeats,
            lambda: state[0][0][0].numpy(),
        )
        print(f"| {size:,} | {seconds * 1e3:.1f} | {rate:.1f} |")
        state = None  # Free the memory.
    print()


def launch_report():
    import tensorflow as tf

    count = FLAGS.launch_variables
    print(
        f"## 4. Fixed cost per variable: {count:,} variables of 4 "
        "float32 numbers\n"
    )
    variables = [tf.Variable(tf.zeros([4])) for _ in range(count)]
    flat = tf.Variable(tf.zeros([4 * count]))

    @tf.function(jit_compile=True)
    def read_each():  # one loop (a concatenation) reading every variable
        flat.assign(tf.concat([v.read_value() for v in variables], 0))

    @tf.function(jit_compile=True)
    def write_each():  # one loop per variable
        for i, variable in enumerate(variables):
            variable.assign(flat[4 * i : 4 * i + 4] * 0.5)

    print("| program | ms | us per variable |")
    print("|---|---|---|")
    for label, program in (
        ("reads each variable in one loop", read_each),
        ("writes each variable in its own loop", write_each),
    ):
        # Called from a tf.function, as model.fit calls the optimizer.
        outer = tf.function(program)
        seconds, _ = _rate(outer, 0, FLAGS.repeats, lambda: flat[0].numpy())
        print(
            f"| {label} | {seconds * 1e3:.1f} | {seconds / count * 1e6:.1f} |"
        )
    print()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.torch_child:
        torch_child()
        return
    print(
        "\n".join(
            common.header(
                "xla_profile: where keras_adamw's XLA step spends its time",
                ["tensorflow", "keras", "keras_adamw", "numpy", "torch"],
            )
        )
    )
    print()
    traffic_report()
    bandwidth_report()
    odd_size_report()
    launch_report()


if __name__ == "__main__":
    app.run(main)
