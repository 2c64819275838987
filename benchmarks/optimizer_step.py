"""Times one AdamW step of several implementations on the same variables.

Every implementation updates the same set of variables (shapes from
--workload, dtype from --dtype) with the same fixed random gradients,
created once. Each timed step blocks until the update is done, and the
number of steps each optimizer counted is checked against the number run.
The report (stdout, Markdown) gives per implementation the median step
time, its spread (p10-p90 and IQR over --repeats samples), the first call
(tracing and compilation included) and the ratio to
keras_adamw.AdamW(jit_compile=True) called inside a `tf.function` (as
`model.fit` and a `tf.function` train step call it), measured in the same
run; and the floor: the bytes an AdamW step must move (28 per float32
parameter: read variable, gradient, m, v; write variable, m, v) at the
bandwidth that the fastest fused update of one flat buffer of the same size
reaches here (XLA, torch and jax are each tried). The targets of the
project are checked at the end of each table.

TensorFlow, torch and jax each run in their own child process: in one
process their thread pools fight over the 2 cores (torch's fused AdamW was
100x slower after TensorFlow had run). The header says how busy other
processes kept the machine; numbers taken on a busy machine are not
comparable (--wait_idle waits for a quiet one, --retries runs a framework
again when the machine was busy and keeps the quietest attempt).

Usage:

    python benchmarks/optimizer_step.py --workload=bert
    python benchmarks/optimizer_step.py --workload=bert --dtype=bfloat16
    python benchmarks/optimizer_step.py --workload=small
    python benchmarks/optimizer_step.py --workload=sweep
    python benchmarks/optimizer_step.py \
        --implementations=keras_adamw_xla,torch_fused,floor

Implementations that are not installed (torch, jax/optax, tf_keras) are
skipped with a printed reason. `--list` prints the implementation names.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The work is done in workloads.py (the variables), implementations.py (the
# AdamW implementations and the floor), runner.py (child processes and
# sampling) and report.py (the tables); this file is the command line.
import common  # noqa: E402
import implementations  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402
import workloads  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "workload",
    "bert",
    ["bert", "small", "sweep"],
    "bert: 169 variables, 90.9M parameters (a 7600x768 "
    "embedding and 12 layers of 4 768x768, a 768x3072 and a "
    "3072x768 kernel, their biases and 2 768-vectors). small: "
    "2000 variables of 1024 to 4096 parameters. sweep: "
    "--sweep_sizes total parameters, each in "
    "--sweep_variables equal variables.",
)
flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Dtype of the variables, gradients and optimizer slots.",
)
flags.DEFINE_integer(
    "repeats", 10, "Timed samples per implementation.", lower_bound=1
)
flags.DEFINE_integer(
    "warmup",
    3,
    "Untimed steps first (the first one, "
    "which traces and compiles, is reported separately).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "steps_per_repeat",
    0,
    "Steps averaged per sample; 0 picks enough steps for a "
    "sample to last --min_repeat_ms (at most 200).",
    lower_bound=0,
)
flags.DEFINE_float(
    "min_repeat_ms",
    20.0,
    "With --steps_per_repeat=0, the shortest sample.",
    lower_bound=0.0,
)
flags.DEFINE_list(
    "implementations",
    ["all"],
    "Comma-separated implementation names (see --list), or 'all'.",
)
flags.DEFINE_boolean("list", False, "Print the implementation names and exit.")
flags.DEFINE_list(
    "sweep_sizes",
    ["1M", "3M", "10M", "30M", "100M"],
    "Total parameters of the sweep workload (k/M suffixes).",
)
flags.DEFINE_integer(
    "sweep_variables",
    16,
    "Variables per size in the sweep workload.",
    lower_bound=1,
)
flags.DEFINE_enum(
    "isolation",
    "group",
    ["group", "implementation"],
    "Run each framework (TensorFlow, torch, jax) in its own "
    "process ('group'), or each implementation in its own "
    "process ('implementation', slower to start).",
)
flags.DEFINE_boolean(
    "interleave",
    True,
    "Within each framework's process, set up all "
    "implementations first and take their samples in "
    "turns (needs memory for all at once: about 12 GB for "
    "bert); --nointerleave runs them one after the other.",
)
flags.DEFINE_integer(
    "retries",
    0,
    "Run a framework's process again (up to this many "
    "times) when other processes kept more than "
    "--max_other_load cores busy during it; the attempt "
    "with the quietest machine is reported.",
    lower_bound=0,
)
flags.DEFINE_float("max_other_load", 0.3, "See --retries.", lower_bound=0.0)
flags.DEFINE_string("child_group", None, "Internal: run this group here.")
# --seed, --learning_rate, --weight_decay, --wait_idle and --child_output.
common.define_shared_flags()
flags.adopt_module_key_flags(common)

# What a child process gets from the parent, besides its group and names.
CHILD_FLAGS = (
    "workload",
    "dtype",
    "repeats",
    "warmup",
    "interleave",
    "steps_per_repeat",
    "min_repeat_ms",
    "sweep_sizes",
    "sweep_variables",
    "seed",
    "learning_rate",
    "weight_decay",
)


def start_child(group, batch):
    """Runs the implementations `batch` of `group` in a child process of
    this script; returns (exit code, {title: {name: result}} or None)."""
    return common.run_child(
        __file__,
        [f"--child_group={group}", f"--implementations={','.join(batch)}"],
        CHILD_FLAGS,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.list:
        for name in list(implementations.IMPLEMENTATIONS) + list(
            implementations.FLOORS
        ):
            print(f"{name:32s} {implementations.label(name)}")
        print(f"{'floor':32s} all of floor_*")
        return
    try:
        names = implementations.select(FLAGS.implementations)
    except ValueError as error:
        raise app.UsageError(str(error))
    parts = workloads.parts(
        FLAGS.workload, FLAGS.sweep_sizes, FLAGS.sweep_variables
    )
    sampling = runner.Sampling(
        FLAGS.warmup,
        FLAGS.repeats,
        FLAGS.steps_per_repeat,
        FLAGS.min_repeat_ms,
        FLAGS.interleave,
    )
    if FLAGS.child_group:
        config = implementations.Config(
            FLAGS.dtype, FLAGS.learning_rate, FLAGS.weight_decay, FLAGS.seed
        )
        runner.child(
            FLAGS.child_group,
            names,
            parts,
            config,
            sampling,
            FLAGS.child_output,
        )
        return

    print(
        "\n".join(
            report.header(
                FLAGS.workload, FLAGS.dtype, sampling, FLAGS.isolation
            )
        ),
        flush=True,
    )
    started = time.perf_counter()
    results, loads = runner.run_groups(
        names,
        [title for title, _ in parts],
        FLAGS.isolation == "implementation",
        start_child,
        wait_idle=FLAGS.wait_idle,
        retries=FLAGS.retries,
        max_other_load=FLAGS.max_other_load,
    )
    print(report.load_line(loads))
    print(
        "\n".join(
            report.tables(
                parts,
                results,
                FLAGS.dtype,
                per_parameter=FLAGS.workload == "sweep",
            )
        ),
        flush=True,
    )
    print(f"(total wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    app.run(main)
