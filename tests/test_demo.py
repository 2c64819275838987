"""The README's demo command runs, compares with Keras, and rejects bad flags."""

import re
import subprocess
import sys


def run_demo(*flags):
    return subprocess.run(
        [sys.executable, "-m", "keras_adamw.demo", *flags],
        capture_output=True, text=True, timeout=300)


def test_demo_trains_and_compares_with_keras():
    result = run_demo("--epochs=2", "--examples=512", "--verbose=0")
    assert result.returncode == 0, result.stderr
    losses = re.search(r"loss: ([\d.]+) -> ([\d.]+) \(keras_adamw\)",
                       result.stdout)
    assert float(losses.group(2)) < 0.8 * float(losses.group(1))
    difference = re.search(r"largest weight difference after training: (\S+)",
                           result.stdout)
    assert float(difference.group(1)) < 1e-4


def test_demo_bad_flag_exits_2_with_a_message():
    result = run_demo("--epochs=0")
    assert result.returncode == 2
    assert "--epochs=0" in result.stderr


def test_demo_help_documents_every_flag():
    result = run_demo("--help")
    assert result.returncode == 0
    for flag in ["epochs", "batch_size", "examples", "learning_rate",
                 "weight_decay", "jit_compile", "seed", "verbose"]:
        line = re.search(rf"--(\[no\])?{flag}: (.+)", result.stdout)
        assert line and len(line.group(2)) > 10, flag
