"""The Markdown report of optimizer_step.py: the header, and for each part
of the workload a table of median step times with their ratios to
keras_adamw and to the floor, and the verdicts on the project's targets."""

import os

import common
import workloads
from implementations import FLOORS
from implementations import IMPLEMENTATIONS

# The implementation the "x keras_adamw XLA" column divides by.
REFERENCE = "keras_adamw_xla_tf_function"

TARGETS = [
    # (other implementation or "floor", at least this much faster, wording)
    (
        "keras",
        4.0,
        "at least 4x faster than keras.optimizers.AdamW without XLA",
    ),
    (
        "keras_xla",
        1.3,
        "at least 1.3x faster than keras.optimizers.AdamW under XLA",
    ),
    ("torch_fused", 1.0, "no slower than torch fused"),
    ("floor", 1 / 1.25, "within 1.25x of the floor"),
]


def header(workload, dtype, sampling, isolation):
    """The lines before the tables: machine, versions, how it was timed."""
    lines = common.header(
        f"optimizer_step: one AdamW step, workload={workload}, dtype={dtype}",
        [
            "tensorflow",
            "keras",
            "keras_adamw",
            "tf_keras",
            "numpy",
            "torch",
            "jax",
            "jaxlib",
            "optax",
        ],
    )
    lines.append(
        f"- timing: per implementation {sampling.warmup} warmup steps (the "
        f"first, with tracing/compilation, reported as 'first call'), then "
        f"{sampling.repeats} samples, each the mean of "
        + (
            f"{sampling.steps_per_repeat} steps"
            if sampling.steps_per_repeat
            else f"enough steps to last >= {sampling.min_repeat_ms:g} ms"
        )
        + "; every step blocks until done; each framework runs in its own "
        f"process (--isolation={isolation}); within a process the "
        "samples of the implementations are "
        + (
            "taken in turns (--interleave)"
            if sampling.interleave
            else "taken one implementation after the other"
        )
    )
    lines.append(
        "- 'x keras_adamw XLA' = median / median of "
        "keras_adamw.AdamW(jit_compile=True) in tf.function (as "
        "model.fit and a tf.function train step call it; >1: "
        "slower); 'x floor' = median / floor time"
    )
    lines.append("")
    return lines


def load_line(loads):
    """The header's last line: `loads` from runner.run_groups."""
    return (
        "- cores kept busy by other processes while each framework ran "
        "(0 = quiet machine; this machine has "
        f"{os.cpu_count()}): " + ", ".join(loads) + "\n"
    )


def ms(seconds):
    return f"{seconds * 1e3:.3f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def part_report(shapes, results, dtype, per_parameter):
    """Markdown lines for one part: the table, the floor, the skipped ones.

    Returns:
        (lines, {label: median seconds}) including the floor as a label.
    """
    total = workloads.parameter_count(shapes)
    itemsize = {"float32": 4, "bfloat16": 2}[dtype]
    bytes_per_step = 7 * itemsize * total
    order = list(IMPLEMENTATIONS) + list(FLOORS)
    timed = {
        n: (
            r["label"],
            common.Timing(r["first_call"], r["times"], r["steps_per_repeat"]),
        )
        for n, r in sorted(
            results.items(), key=lambda item: order.index(item[0])
        )
        if "times" in r
    }
    skipped = {
        n: (r["label"], r["skipped"])
        for n, r in results.items()
        if "skipped" in r
    }
    floors = {n: t for n, t in timed.items() if n in FLOORS}
    reference = timed.get(REFERENCE)
    floor = best = None
    if floors:
        best = min(floors, key=lambda n: floors[n][1].median)
        floor = floors[best][1].median
    columns = ["implementation", "median ms", "p10-p90 ms", "IQR ms"]
    if per_parameter:
        columns.append("ns/param")
    columns += ["first call s", "x keras_adamw XLA", "x floor"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    medians = {}
    rows = [(label, t) for n, (label, t) in timed.items() if n not in FLOORS]
    if floor is not None:
        rows.append(
            (
                f"**floor**: {bytes_per_step / total:.0f} B/param at "
                f"{bytes_per_step / floor / 1e9:.1f} GB/s "
                f"({floors[best][0]})",
                floors[best][1],
            )
        )
    for label, timing in rows:
        median = timing.median
        medians[label] = median
        cells = [
            label,
            ms(median),
            f"{ms(timing.p10)}-{ms(timing.p90)}",
            ms(timing.iqr),
        ]
        if per_parameter:
            cells.append(f"{median / total * 1e9:.3f}")
        cells += [
            f"{timing.first_call:.2f}",
            f"{median / reference[1].median:.2f}" if reference else "-",
            f"{median / floor:.2f}" if floor else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if floors:
        lines.append(
            f"Floor candidates: fused AdamW over one flat buffer of "
            f"{total:,} {dtype} parameters, "
            f"{bytes_per_step / 1e6:.1f} MB read+written per step "
            f"(variable, gradient, m, v read; variable, m, v "
            f"written):"
        )
        for n, (label, timing) in floors.items():
            lines.append(
                f"- {label}: {ms(timing.median)} ms, "
                f"{bytes_per_step / timing.median / 1e9:.1f} GB/s"
            )
        lines.append("")
    for n, (label, reason) in skipped.items():
        lines.append(f"- skipped {label} [{n}]: {reason}")
    if skipped:
        lines.append("")
    lines += targets(timed, floor)
    if floor is not None:
        medians = {
            (
                "floor (best fused flat update)"
                if label.startswith("**floor**")
                else label
            ): m
            for label, m in medians.items()
        }
    return lines, medians


def targets(timed, floor):
    """Lines checking keras_adamw against the project's speed targets."""
    lines = []
    for ours in (
        "keras_adamw_fused_tf_function",
        "keras_adamw_xla_tf_function",
        "keras_adamw_xla",
    ):
        if ours not in timed:
            continue
        mine = timed[ours][1].median
        checks = []
        for other, factor, wording in TARGETS:
            theirs = (
                floor
                if other == "floor"
                else (timed[other][1].median if other in timed else None)
            )
            if theirs is None:
                continue
            speedup = theirs / mine
            verdict = "met" if speedup >= factor else "MISSED"
            if other == "floor":
                checks.append(
                    f"{wording}: {mine / theirs:.2f}x the floor -> {verdict}"
                )
            else:
                checks.append(f"{wording}: {speedup:.2f}x -> {verdict}")
        if checks:
            lines.append(f"Targets for {timed[ours][0]}:")
            lines += [f"- {check}" for check in checks]
            lines.append("")
    return lines


def tables(parts, results, dtype, per_parameter):
    """The lines after the header: a section per part of the workload
    ([(title, shapes)]) with `results` ({title: {name: result}}), and with
    `per_parameter` a summary of the ns per parameter of every part."""
    lines, summary, titles = [], {}, []
    for title, shapes in parts:
        lines += [f"## {title}: {workloads.describe(shapes, dtype)}", ""]
        part_lines, medians = part_report(
            shapes, results.get(title, {}), dtype, per_parameter
        )
        lines += part_lines
        total = workloads.parameter_count(shapes)
        titles.append(title)
        for label, median in medians.items():
            summary.setdefault(label, {})[title] = median / total * 1e9
    if per_parameter:
        lines += [
            "## sweep summary: median ns per parameter per step",
            "",
            "| implementation | " + " | ".join(titles) + " |",
            "|---|" + "---|" * len(titles),
        ]
        for label, values in summary.items():
            lines.append(
                f"| {label} | "
                + " | ".join(
                    f"{values[t]:.3f}" if t in values else "-" for t in titles
                )
                + " |"
            )
        lines.append("")
    return lines
