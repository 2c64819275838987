"""The benchmark scripts: their workloads, their arithmetic, and a short run.

Speed itself is not asserted here (a test cannot time a shared machine
reliably); `benchmarks/README.md` and README.md give the measured tables.
These tests keep the scripts honest and runnable: the workloads are the
ones the README describes, the ratios and target verdicts are computed
right, both scripts run end to end, and the optimizer-state memory the
README states is what the optimizers allocate.
"""

import importlib
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_adamw

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def import_benchmark(name):
    """benchmarks/NAME.py as a module (benchmarks/ is a folder of scripts;
    workloads.py and report.py define no absl flags and need none)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def workloads():
    return import_benchmark("workloads")


@pytest.fixture(scope="module")
def report():
    return import_benchmark("report")


def test_bert_workload_is_bert_base_sized(workloads):
    shapes = workloads.bert_shapes()
    assert len(shapes) == 169
    assert sum(int(np.prod(s)) for s in shapes) == 90_872_832
    assert shapes[0] == (7600, 768)


def test_small_workload_is_2000_variables_of_1k_to_4k(workloads):
    sizes = [int(np.prod(s)) for s in workloads.small_shapes()]
    assert len(sizes) == 2000
    assert min(sizes) == 1024 and max(sizes) == 4096


def test_sweep_sizes_parse(workloads):
    assert workloads.parse_size("1M") == 1_000_000
    assert workloads.parse_size("30m") == 30_000_000
    assert workloads.parse_size("2.5k") == 2_500
    shapes = workloads.sweep_shapes(1_000_000, 16)
    assert len(shapes) == 16 and shapes[0] == (62_500,)


def timed(label, median):
    # Ten samples around `median`: the median of the samples is `median`.
    times = [
        median * f
        for f in (0.9, 0.95, 0.97, 0.99, 1.0, 1.0, 1.01, 1.03, 1.05, 1.2)
    ]
    return {
        "label": label,
        "times": times,
        "first_call": 1.0,
        "steps_per_repeat": 1,
    }


def test_report_ratios_floor_and_target_verdicts(report):
    shapes = [(1_000_000,)] * 10  # 10M float32 parameters
    results = {
        "keras_adamw_xla_tf_function": timed("ours", 0.010),
        "keras": timed("keras op by op", 0.050),  # 5x: met
        "keras_xla": timed("keras XLA", 0.012),  # 1.2x: missed
        "torch_fused": timed("torch fused", 0.009),  # 0.9x: missed
        "floor_xla": timed("flat XLA", 0.0085),
        "floor_torch": timed("flat torch", 0.0070),  # the floor
        "optax": {"label": "optax", "skipped": "jax is not installed"},
    }
    lines, medians = report.part_report(
        shapes, results, "float32", per_parameter=True
    )
    text = "\n".join(lines)
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in lines
        if line.startswith("| ") and " | " in line
    }
    # Columns: name, median ms, p10-p90, IQR, ns/param, first call,
    # x keras_adamw XLA, x floor.
    assert rows["ours"][1] == "10.000"
    assert rows["ours"][4] == "1.000"  # 10 ms / 10M parameters
    assert rows["ours"][6] == "1.00"
    assert rows["keras op by op"][6] == "5.00"
    assert rows["ours"][7].rstrip(" |") == f"{10 / 7:.2f}"
    # The floor is the fastest flat update: 28 B/param, 280 MB in 7 ms.
    assert "28 B/param at 40.0 GB/s (flat torch)" in text
    assert "- flat XLA: 8.500 ms" in text
    assert "skipped optax [optax]: jax is not installed" in text
    assert (
        "at least 4x faster than keras.optimizers.AdamW without XLA: "
        "5.00x -> met" in text
    )
    assert (
        "at least 1.3x faster than keras.optimizers.AdamW under XLA: "
        "1.20x -> MISSED" in text
    )
    assert "no slower than torch fused: 0.90x -> MISSED" in text
    assert "within 1.25x of the floor: 1.43x the floor -> MISSED" in text
    assert medians["ours"] == pytest.approx(0.010)


def run_script(args, timeout):
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_optimizer_step_runs_and_reports_every_implementation():
    out = run_script(
        [
            "benchmarks/optimizer_step.py",
            "--workload=sweep",
            "--sweep_sizes=20k",
            "--sweep_variables=3",
            "--implementations=keras_adamw_xla_tf_function,keras_adamw_noxla,"
            "keras_adamw_fused_tf_function,keras,keras_xla,torch_fused,"
            "floor_xla",
            "--repeats=2",
            "--warmup=1",
            "--steps_per_repeat=2",
        ],
        timeout=300,
    )
    assert "- command: python benchmarks/optimizer_step.py" in out
    assert "## 20k: 3 variables, 19,998 parameters" in out
    for label in (
        "keras_adamw.AdamW(jit_compile=True), in tf.function",
        "keras_adamw.AdamW(jit_compile=False), eager `apply`",
        "keras_adamw.AdamW(fused=True), the C++ CPU kernel, in tf.function",
        "keras.optimizers.AdamW, in tf.function (no XLA)",
        "keras.optimizers.AdamW, in tf.function(jit_compile=True)",
    ):
        row = next(
            line
            for line in out.splitlines()
            if line.startswith(f"| {label} |")
        )
        assert re.match(r"\| .* \| [0-9.]+ \| [0-9.]+-[0-9.]+ \|", row)
    reference = next(
        line
        for line in out.splitlines()
        if line.startswith(
            "| keras_adamw.AdamW(jit_compile=True), in tf.function |"
        )
    )
    assert "| 1.00 |" in reference
    assert "**floor**: 28 B/param" in out
    # torch is timed when installed, and named as missing otherwise.
    assert (
        "| torch.optim.AdamW(fused=True), CPU |" in out
        or "torch is not installed" in out
    )
    assert (
        "Targets for keras_adamw.AdamW(jit_compile=True), in "
        "tf.function:" in out
    )
    assert "ns per parameter per step" in out


def test_optimizer_step_lists_implementations():
    out = run_script(["benchmarks/optimizer_step.py", "--list"], timeout=60)
    for name in (
        "keras_adamw_xla_tf_function",
        "keras_adamw_fused_tf_function",
        "keras",
        "keras_xla",
        "tf_keras_xla_tf_function",
        "torch_fused",
        "optax",
        "floor",
    ):
        assert re.search(rf"^{name} ", out, re.M), name


def test_fit_epoch_runs_both_models_and_optimizers():
    out = run_script(
        [
            "benchmarks/fit_epoch.py",
            "--configs=single",
            "--optimizers=keras_adamw,keras_adamw_xla,keras",
            "--epochs=3",
            "--examples=64",
            "--batch_size=16",
            "--seq_len=8",
            "--vocab=40",
            "--d_model=16",
            "--heads=2",
            "--ff=32",
            "--blocks=1",
            "--resnet_blocks=1",
            "--resnet_width=4",
        ],
        timeout=400,
    )
    assert "failed" not in out
    tables = out.split("## ")[1:]
    assert [table.splitlines()[0] for table in tables] == [
        "transformer",
        "ResNet-like",
    ]
    for table in tables:
        rows = [
            line
            for line in table.splitlines()
            if line.startswith("| one CPU device |")
        ]
        assert [row.split(" | ")[1] for row in rows] == [
            "keras_adamw.AdamW (fused kernel)",
            "keras_adamw.AdamW(fused=False) (XLA)",
            "keras.optimizers.AdamW",
        ]
        # All train: the loss falls from the first epoch to the last.
        # (They need not agree: the token embedding's gradient repeats
        # ids, which Keras 3 handles wrongly; see
        # tests/test_keras_defects.py.)
        for row in rows:
            first_epoch_loss, final_loss = (
                float(row.split(" | ")[i]) for i in (6, 7)
            )
            assert final_loss < first_epoch_loss, row


def state_bytes_per_parameter(
    variables, optimizer_class=keras_adamw.AdamW, **kwargs
):
    optimizer = optimizer_class(**kwargs)
    optimizer.build(variables)
    parameters = sum(int(np.prod(v.shape)) for v in variables)
    scalars = {id(optimizer.iterations)}
    state = sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
        for v in optimizer.variables
        if id(v) not in scalars and len(v.shape) > 0
    )
    return state / parameters


def readme_state_table():
    """{configuration: bytes per parameter} from README's memory table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("Optimizer state per parameter", 1)[1]
    table = {}
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip(" `") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1].endswith(" B"):
            table[cells[0]] = float(cells[1][:-2])
    return table


def test_readme_states_the_optimizer_memory_the_optimizer_allocates():
    table = readme_state_table()
    float32 = [
        keras.Variable(np.zeros((30, 7)), dtype="float32"),
        keras.Variable(np.zeros((5,)), dtype="float32"),
    ]
    bfloat16 = [keras.Variable(np.zeros((30, 7)), dtype="bfloat16")]
    measured = {
        "AdamW(), float32 variables": state_bytes_per_parameter(float32),
        "AdamW(amsgrad=True)": state_bytes_per_parameter(
            float32, amsgrad=True
        ),
        "AdamW(use_ema=True)": state_bytes_per_parameter(
            float32, use_ema=True
        ),
        "AdamW(gradient_accumulation_steps=4)": state_bytes_per_parameter(
            float32, gradient_accumulation_steps=4
        ),
        "AdamW(), bfloat16 variables": state_bytes_per_parameter(bfloat16),
        'AdamW(moment_dtype="bfloat16"), float32 variables': (
            state_bytes_per_parameter(float32, moment_dtype="bfloat16")
        ),
        'AdamW(moment_dtype="float32"), bfloat16 variables': (
            state_bytes_per_parameter(bfloat16, moment_dtype="float32")
        ),
        "AdamW(kahan_summation=True), bfloat16 variables": (
            state_bytes_per_parameter(bfloat16, kahan_summation=True)
        ),
        "AdamW(kahan_summation=True, "
        'moment_dtype="float32"), bfloat16 variables': (
            state_bytes_per_parameter(
                bfloat16, kahan_summation=True, moment_dtype="float32"
            )
        ),
    }
    assert table == measured
    # The same as Keras 3's AdamW (README says so).
    assert (
        state_bytes_per_parameter(
            float32,
            keras.optimizers.AdamW,
            amsgrad=True,
            use_ema=True,
            gradient_accumulation_steps=4,
        )
        == state_bytes_per_parameter(
            float32, amsgrad=True, use_ema=True, gradient_accumulation_steps=4
        )
        == 20
    )
    assert state_bytes_per_parameter(bfloat16, keras.optimizers.AdamW) == 4


def test_sparse_embedding_benchmark_runs():
    out = run_script(
        [
            "benchmarks/sparse_embedding.py",
            "--rows=2000",
            "--ids=64",
            "--samples=1",
            "--lazy_steps=2",
            "--dense_steps=1",
        ],
        timeout=300,
    )
    for name in ("keras_adamw_lazy", "keras_adamw_dense", "keras"):
        assert re.search(rf"^\| {name} \| [0-9.]+ ms", out, re.M), name


def test_first_call_benchmark_runs_and_times_each_phase():
    out = run_script(
        ["benchmarks/first_call.py", "--variables=5"], timeout=300
    )
    assert "- command: python benchmarks/first_call.py --variables=5" in out
    assert "5 variables, " in out
    row = re.search(
        r"^\| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", out, re.M
    )
    assert row, out
    trace, first_run, first_call, _ = (float(x) for x in row.groups())
    assert first_call == pytest.approx(trace + first_run, abs=0.11)
