"""The README's demo command runs quietly, compares with Keras and ends with
a verdict, and rejects bad flags and arguments with one line; importing
keras_adamw changes no environment variable."""

import json
import os
import re
import subprocess
import sys

import pytest

from keras_adamw import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the pytest process sets up for itself (conftest.py), not what a
# user's shell has: the demo and the import must manage without it.
SET_BY_THE_TEST_SETUP = (
    "TF_CPP_MIN_LOG_LEVEL",
    "DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION",
)
# A line of TensorFlow's C++ logging: "I0000 00:00:1795858650.788570
# 14453 port.cc:153] ...", absl's note before its logging starts, and the
# second line of TensorFlow's CPU-instructions message.
TF_LOG_LINE = re.compile(
    r"[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog"
    r"|To enable the following instructions:"
)


def user_env():
    env = {
        k: v for k, v in os.environ.items() if k not in SET_BY_THE_TEST_SETUP
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def run_demo(*flags):
    return subprocess.run(
        [sys.executable, "-m", "keras_adamw.demo", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=user_env(),
    )


def message_lines(stderr):
    """stderr without TensorFlow's log lines."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not TF_LOG_LINE.match(line)
    ]


@pytest.fixture(scope="module")
def small_run():
    """One small demo run, as a user starts it (no TF_CPP_MIN_LOG_LEVEL)."""
    return run_demo("--epochs=2", "--examples=512", "--verbose=0")


def test_demo_trains_and_compares_with_keras(small_run):
    assert small_run.returncode == 0, small_run.stderr
    losses = re.search(
        r"loss: ([\d.]+) -> ([\d.]+) \(keras_adamw\)", small_run.stdout
    )
    assert float(losses.group(2)) < 0.8 * float(losses.group(1))
    difference = re.search(
        r"largest weight difference after training: (\S+)", small_run.stdout
    )
    assert float(difference.group(1)) < 1e-4


def test_demo_ends_with_a_one_line_verdict(small_run):
    assert small_run.returncode == 0, small_run.stderr
    last = small_run.stdout.strip().splitlines()[-1]
    verdict = re.fullmatch(
        r"keras_adamw and keras\.optimizers\.AdamW agree to (\S+)", last
    )
    assert verdict, last
    difference = re.search(
        r"largest weight difference after training: (\S+)", small_run.stdout
    ).group(1)
    assert float(verdict.group(1)) == pytest.approx(
        float(difference), rel=0.05
    )


def test_demo_prints_no_tensorflow_log_lines(small_run):
    """Needs keras_adamw/__init__.py to start TensorFlow quietly for the
    demo (issue 15): TensorFlow logs while it is imported, before the demo's
    own code runs."""
    assert small_run.returncode == 0, small_run.stderr
    noise = [
        line
        for line in (small_run.stdout + small_run.stderr).splitlines()
        if TF_LOG_LINE.match(line) or "cuInit" in line
    ]
    assert not noise, "\n".join(noise)


@pytest.mark.parametrize(
    "our_losses, their_losses, difference, expected",
    [
        (
            [0.5, 0.2],
            [0.5, 0.2],
            1.7e-6,
            r"keras_adamw and keras\.optimizers\.AdamW agree to 1\.7e-06",
        ),
        (
            [0.5, 0.2],
            [0.5, 0.3],
            0.02,
            r"differ by 0\.02, more than float32 rounding \(0\.0001\): their "
            r"first epochs agree .* --learning_rate",
        ),
        (
            [0.5, 0.2],
            [0.6, 0.3],
            0.02,
            r"differ by 0\.02, .*first-epoch losses already differ by 0\.17 "
            r"relative: not float32 rounding",
        ),
    ],
    ids=["agree", "drift", "differ"],
)
def test_verdict_says_whether_and_how_the_runs_differ(
    our_losses, their_losses, difference, expected
):
    line, status = demo.verdict(our_losses, their_losses, difference)
    assert "\n" not in line
    assert re.search(expected, line), line
    assert status == (0 if "agree to" in line else 1)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--epochs=0"], "--epochs=0"),
        (["--no_such_flag"], "no_such_flag"),
        (["10", "--epochs=2"], "positional arguments, got '10'"),
    ],
    ids=["bad-value", "unknown-flag", "positional"],
)
def test_bad_command_line_exits_2_with_one_line(args, expected):
    result = run_demo(*args)
    assert result.returncode == 2, result.stderr
    (line,) = message_lines(result.stderr)
    assert line.startswith("python -m keras_adamw.demo: "), line
    assert expected in line and "--help" in line, line
    assert result.stdout == ""


def test_demo_help_documents_every_flag():
    result = run_demo("--help")
    assert result.returncode == 0
    for flag in [
        "epochs",
        "batch_size",
        "examples",
        "learning_rate",
        "weight_decay",
        "jit_compile",
        "seed",
        "verbose",
    ]:
        line = re.search(rf"--(\[no\])?{flag}: (.+)", result.stdout)
        assert line and len(line.group(2)) > 10, flag


def test_importing_keras_adamw_changes_no_environment_variable():
    """`import keras_adamw` (and its dtensor package, and making an
    optimizer) in a fresh process: os.environ is as before. TensorFlow and
    Keras set variables of their own on import, so they come first."""
    code = """if True:
        import json, os
        import keras, tensorflow
        before = dict(os.environ)
        import keras_adamw, keras_adamw.dtensor
        keras_adamw.AdamW()
        after = dict(os.environ)
        print(json.dumps({k: [before.get(k), after.get(k)]
                          for k in sorted(set(before) | set(after))
                          if before.get(k) != after.get(k)}))
    """
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=user_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    changed = json.loads(result.stdout.strip().splitlines()[-1])
    assert changed == {}, changed
