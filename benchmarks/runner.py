"""Runs the implementations of optimizer_step.py and times their steps.

TensorFlow, torch and jax each run in their own child process (GROUPS in
implementations.py): in one process their thread pools fight over the
cores. Inside a child, all implementations are set up and warmed up first
and their samples are taken in turns, so that a change in the machine's
load hits them all alike. The parent measures how busy other processes
kept the machine while each framework ran, and can wait for a quiet
machine or run a framework again.

A result is a dict: {"label", "times" (seconds per step, one per sample),
"first_call", "steps_per_repeat"} when timed, {"label", "skipped"} when
not.
"""

import functools
import gc
import json
import sys
from typing import NamedTuple

import common
import implementations
import workloads


class Sampling(NamedTuple):
    """How each implementation is timed (the flags of the same names)."""

    warmup: int  # untimed steps; the first is reported as the first call
    repeats: int  # timed samples
    steps_per_repeat: int  # steps per sample; 0: enough for min_repeat_ms
    min_repeat_ms: float
    interleave: bool  # sample all in turns, or one after the other


def release():
    gc.collect()
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session()
    gc.collect()


def _failure(error):
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def time_implementations(names, shapes, weights, grads, config, sampling):
    """Times each implementation or floor of `names`; returns
    {name: result}. All are set up and warmed up first, then sampled in
    turns (round r starts with implementation r)."""
    total = workloads.parameter_count(shapes)
    results, live = {}, {}
    for name in names:
        if name in implementations.FLOORS:
            label, setup = implementations.FLOORS[name]
            make = functools.partial(setup, total, config)
        else:
            label, setup = implementations.IMPLEMENTATIONS[name]
            make = functools.partial(setup, weights, grads, config)
        common.log(
            f"[{len(shapes)} variables, {total:,} parameters, "
            f"{config.dtype}] set up and warm up {name}: {label}"
        )
        try:
            step, check = make()
            first_call, last = common.warm_up(step, sampling.warmup)
            steps = common.steps_for(
                last,
                sampling.steps_per_repeat,
                sampling.min_repeat_ms / 1000.0,
            )
            live[name] = dict(
                label=label,
                step=step,
                check=check,
                first_call=first_call,
                steps=steps,
                times=[],
            )
            common.log(
                f"    first call {first_call:.2f} s, then {last * 1e3:.3f} ms"
            )
        except implementations.Skip as reason:
            common.log(f"    skipped: {reason}")
            results[name] = {"label": label, "skipped": str(reason)}
        except Exception as error:  # noqa: BLE001 - report and go on.
            message = _failure(error)
            common.log(f"    failed: {message}")
            results[name] = {"label": label, "skipped": "failed: " + message}
        step = check = None
    order = list(live)
    for round_index in range(sampling.repeats):
        start = round_index % max(len(order), 1)
        for name in order[start:] + order[:start]:
            entry = live[name]
            entry["times"].append(common.sample(entry["step"], entry["steps"]))
        common.log(f"    round {round_index + 1}/{sampling.repeats} done")
    for name in order:
        entry = live.pop(name)
        try:
            entry["check"](
                max(sampling.warmup, 1) + sampling.repeats * entry["steps"]
            )
            results[name] = {
                "label": entry["label"],
                "times": entry["times"],
                "first_call": entry["first_call"],
                "steps_per_repeat": entry["steps"],
            }
            median = sorted(entry["times"])[len(entry["times"]) // 2]
            common.log(f"{name}: median {median * 1e3:.3f} ms")
        except Exception as error:  # noqa: BLE001
            results[name] = {
                "label": entry["label"],
                "skipped": "failed check: " + _failure(error),
            }
        entry.clear()
    release()
    return {name: results[name] for name in names if name in results}


def child(group, names, parts, config, sampling, output):
    """Runs the names of `group` among `names` on every part of the
    workload ([(title, shapes)]), in this process; writes
    {title: {name: result}} as JSON to `output`."""
    if group == "tensorflow":
        import tensorflow  # noqa: F401
    names = [n for n in names if n in implementations.GROUPS[group]]
    results = {}
    for title, shapes in parts:
        weights, grads = workloads.make_data(shapes, config.seed)
        batches = [names] if sampling.interleave else [[n] for n in names]
        results[title] = {}
        for batch in batches:
            results[title].update(
                time_implementations(
                    batch, shapes, weights, grads, config, sampling
                )
            )
        del weights, grads
        implementations.forget_gradients()
        release()
    with open(output, "w") as f:
        json.dump(results, f)


def run_group(group, names, titles, isolate, start_child):
    """Runs the names of `group` among `names` in child processes (one per
    implementation if `isolate`); returns the merged
    {title: {name: result}}.

    `start_child(group, batch)` runs `child` for the names `batch` in a
    new process and returns (exit code, its JSON or None).
    """
    names = [n for n in names if n in implementations.GROUPS[group]]
    batches = [[n] for n in names] if isolate else [names]
    merged = {}
    for batch in batches:
        if not batch:
            continue
        code, results = start_child(group, batch)
        if results is None:
            reason = f"failed: the {group} process exited with code {code}"
            for title in titles:
                for name in batch:
                    merged.setdefault(title, {})[name] = {
                        "label": implementations.label(name),
                        "skipped": reason,
                    }
            continue
        for title, part in results.items():
            merged.setdefault(title, {}).update(part)
    return merged


def run_groups(
    names,
    titles,
    isolate,
    start_child,
    wait_idle=0,
    retries=0,
    max_other_load=0.3,
):
    """Runs every group with a name in `names` (see `run_group`). Before
    each, waits up to `wait_idle` seconds for a quiet machine; runs a group
    again (up to `retries` times) while other processes kept more than
    `max_other_load` cores busy, and keeps its quietest attempt.

    Returns:
        ({title: {name: result}}, ["<group> <other load>", ...]).
    """
    results, loads = {}, []
    for group in implementations.GROUPS:
        if not any(n in implementations.GROUPS[group] for n in names):
            continue
        best = None
        for attempt in range(retries + 1):
            if wait_idle:
                common.wait_until_idle(wait_idle)
            load = common.OtherLoad().start()
            part = run_group(group, names, titles, isolate, start_child)
            used = load.stop()
            common.log(f"{group}: other processes kept {used:.2f} cores busy")
            if best is None or used < best[0]:
                best = (used, part)
            if used <= max_other_load:
                break
        attempts = f" (best of {attempt + 1} attempts)" if attempt else ""
        loads.append(f"{group} {best[0]:.2f}{attempts}")
        for title, part in best[1].items():
            results.setdefault(title, {}).update(part)
    return results, loads
