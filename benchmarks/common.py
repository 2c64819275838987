"""Helpers shared by the benchmark scripts: the machine header, timing,
the machine's load, the flags two scripts share and their child
processes."""

import datetime
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags


def cpu_model():
    """The CPU model name from /proc/cpuinfo (or platform's guess)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def version(module_name):
    """The version of an installed module, without importing it if absent."""
    if importlib.util.find_spec(module_name) is None:
        return "not installed"
    try:
        from importlib import metadata

        distribution = {
            "tf_keras": "tf_keras",
            "keras_adamw": "keras_adamw",
            "tensorflow": "tensorflow",
        }.get(module_name, module_name)
        return metadata.version(distribution)
    except Exception:  # noqa: BLE001 - fall back to the module attribute.
        module = importlib.import_module(module_name)
        return getattr(module, "__version__", "unknown")


def header(title, modules):
    """Lines naming the machine, date, library versions and command line."""
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    versions = ", ".join(f"{m} {version(m)}" for m in modules)
    environment = (
        ", ".join(
            f"{k}={os.environ[k]}"
            for k in (
                "TF_XLA_FLAGS",
                "XLA_FLAGS",
                "OMP_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS",
                "TF_NUM_INTEROP_THREADS",
                "CUDA_VISIBLE_DEVICES",
            )
            if k in os.environ
        )
        or "none of TF_XLA_FLAGS/XLA_FLAGS/OMP_NUM_THREADS set"
    )
    return [
        f"# {title}",
        "",
        "- date: "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {platform.platform()}; CPU: {cpu_model()}; "
        f"{cores} logical cores ({usable} usable); "
        f"{memory_gib():.1f} GiB RAM",
        f"- Python {platform.python_version()}; {versions}",
        f"- keras_adamw source: {keras_adamw_source()}",
        f"- environment: {environment}",
        f"- command: python {shlex.join(sys.argv)}",
    ]


def keras_adamw_source():
    """Where keras_adamw is imported from, and which commit that is."""
    spec = importlib.util.find_spec("keras_adamw")
    if spec is None or not spec.origin:
        return "not installed"
    package = os.path.dirname(spec.origin)
    root = os.path.dirname(package)
    marker = os.path.join(root, "COMMIT")
    if os.path.exists(marker):
        with open(marker) as f:
            return f"{package} (snapshot of commit {f.read().strip()})"
    # A checkout has a .git folder; a `git worktree` a .git file.
    if os.path.exists(os.path.join(root, ".git")):
        return f"{package} (commit {git_description(root)})"
    return package


def _repository():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percentile(values, q):
    """Linear-interpolated percentile `q` in [0, 100] of `values`."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Timing:
    """Per-step times (seconds) of one implementation."""

    def __init__(self, first_call, times, steps_per_repeat):
        self.first_call = first_call
        self.times = times
        self.steps_per_repeat = steps_per_repeat

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def p10(self):
        return percentile(self.times, 10)

    @property
    def p90(self):
        return percentile(self.times, 90)

    @property
    def iqr(self):
        return percentile(self.times, 75) - percentile(self.times, 25)


def warm_up(step, warmup):
    """Runs `warmup` (at least 1) steps; returns the seconds of the first
    (with tracing and compilation) and of the last."""
    start = time.perf_counter()
    step()
    first_call = last = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        start = time.perf_counter()
        step()
        last = time.perf_counter() - start
    return first_call, last


def steps_for(
    last, steps_per_repeat, min_repeat_seconds, max_steps_per_repeat=200
):
    """Steps per sample: `steps_per_repeat`, or if 0 enough for a sample of
    `min_repeat_seconds` given a step of `last` seconds."""
    if steps_per_repeat > 0:
        return steps_per_repeat
    return max(
        1,
        min(
            max_steps_per_repeat, int(min_repeat_seconds / max(last, 1e-9)) + 1
        ),
    )


def sample(step, steps):
    """Seconds per step, averaged over `steps` consecutive steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def log(message):
    """Progress to stderr, so stdout stays a clean report."""
    print(message, file=sys.stderr, flush=True)


def _busy_jiffies():
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _own_cpu_seconds():
    times = os.times()
    return (
        times.user + times.system + times.children_user + times.children_system
    )


class OtherLoad:
    """Measures how many cores other processes kept busy between `start()`
    and `stop()`: the machine's busy time minus this process' and its
    waited-for children's CPU time, over the wall time."""

    def start(self):
        self._busy = _busy_jiffies()
        self._own = _own_cpu_seconds()
        self._wall = time.perf_counter()
        return self

    def stop(self):
        busy = _busy_jiffies()
        if busy is None or self._busy is None:
            return float("nan")
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self._wall
        machine = (busy[0] - self._busy[0]) / hz
        own = _own_cpu_seconds() - self._own
        return max(0.0, (machine - own) / max(wall, 1e-9))


def wait_until_idle(max_seconds, threshold=0.2, window=3.0):
    """Waits (up to `max_seconds`) until other processes use fewer than
    `threshold` cores over a `window`-second sample; returns their load in
    the last sample."""
    deadline = time.monotonic() + max_seconds
    while True:
        load = OtherLoad().start()
        time.sleep(window)
        used = load.stop()
        if used < threshold or time.monotonic() >= deadline:
            return used
        log(
            f"waiting for an idle machine: other processes use "
            f"{used:.2f} cores"
        )


def git_description(path):
    """'<commit>' of the repository at `path`, '+ uncommitted changes in
    keras_adamw/' when the package differs from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--", "keras_adamw"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes in keras_adamw/" if dirty else "")


def define_shared_flags():
    """Defines the flags that optimizer_step.py and fit_epoch.py both have:
    --seed, --learning_rate, --weight_decay, --wait_idle and the internal
    --child_output. A script that calls this adopts them with
    `flags.adopt_module_key_flags(common)`, so that its --help lists
    them."""
    flags.DEFINE_integer(
        "seed", 0, "Seed of the data and the initial weights."
    )
    flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate.")
    flags.DEFINE_float("weight_decay", 0.004, "AdamW weight decay.")
    flags.DEFINE_integer(
        "wait_idle",
        0,
        "Wait up to this many seconds for other processes "
        "to leave the CPUs idle (< 0.2 cores busy) before "
        "each child process starts.",
        lower_bound=0,
    )
    flags.DEFINE_string("child_output", None, "Internal: JSON output path.")


def run_child(script, arguments, forwarded):
    """Runs `python script *arguments --child_output=FILE`, plus
    --NAME=VALUE for each flag NAME in `forwarded` as this process has it.

    Returns:
        (exit code, the JSON the child wrote to FILE, or None if it failed).
    """
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "result.json")
        argv = [
            sys.executable,
            os.path.abspath(script),
            *arguments,
            f"--child_output={output}",
        ]
        for name in forwarded:
            value = flags.FLAGS[name].value
            if isinstance(value, list):
                value = ",".join(value)
            argv.append(f"--{name}={value}")
        completed = subprocess.run(argv, check=False)
        if completed.returncode != 0 or not os.path.exists(output):
            return completed.returncode, None
        with open(output) as f:
            return completed.returncode, json.load(f)
