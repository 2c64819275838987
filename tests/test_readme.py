"""The README's code examples run as written."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_dtensor_example_trains_and_shards_the_slots():
    (code,) = readme_section("DTensor")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=300, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(
        r"loss ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert last < 0.8 * first
    assert "kernel_0_momentum ['batch', 'model']" in result.stdout
