"""The code in README.md runs as pasted.

Every ```python block of README.md, and of the Markdown files of this
repository it links to (and they link to, and so on), runs on its own in a
fresh interpreter: `python -c BLOCK` in an empty temporary directory, with
this checkout on PYTHONPATH, the TensorFlow backend and quiet TensorFlow
logs, and none of the settings this test process made for itself. Each must
exit 0. The blocks run two at a time (a small process pool), each test
waiting for its own block.

Only shell and text blocks (```sh, ```bash, ```console, ```text or a bare
```) are not run: a block in any other language fails
`test_every_block_is_python_shell_or_text`. Files that shell blocks name
and the repository files that links point to must exist.
"""

import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {"python"}
NOT_RUN = {"sh", "bash", "console", "shell", "text", ""}
TIMEOUT = 300  # seconds per block; each takes a few on an idle machine.
WORKERS = 2
# Set up by this test process for itself (conftest.py), not by a user.
NOT_INHERITED = ("DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION",)

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#+ (.+)$", re.M)


def markdown_files():
    """README.md and the repository's Markdown files it links to, found by
    following relative links from file to file, as paths from ROOT."""
    found, todo = [], ["README.md"]
    while todo:
        path = todo.pop(0)
        if path in found:
            continue
        found.append(path)
        for target in local_links(path):
            if target.endswith(".md") and os.path.isfile(
                os.path.join(ROOT, target)
            ):
                todo.append(target)
    return found


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def local_links(path):
    """The repository paths (from ROOT, anchors dropped) that the links of
    the Markdown file `path` point to; web links are left out."""
    targets = []
    for target in LINK.findall(read(path)):
        target = target.split("#", 1)[0]
        if not target or re.match(r"[a-z]+:", target):
            continue
        targets.append(
            os.path.normpath(os.path.join(os.path.dirname(path), target))
        )
    return targets


class Block:
    def __init__(self, path, text, match):
        self.path = path
        self.language = match.group(1).strip().lower()
        self.code = match.group(2)
        self.line = text.count("\n", 0, match.start()) + 1
        # Headings outside code blocks ("# comment" lines are not ones).
        headings = HEADING.findall(FENCE.sub("", text[: match.start()]))
        self.section = headings[-1] if headings else ""

    @property
    def id(self):
        return f"{self.path}:{self.line} ({self.section})"


def blocks():
    found = []
    for path in markdown_files():
        text = read(path)
        found += [Block(path, text, m) for m in FENCE.finditer(text)]
    return found


BLOCKS = blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.language in RUN]


def run_block(block, tmp):
    """Runs `block` with `python -c` in the empty directory `tmp`."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        PYTHONPATH=os.pathsep.join(
            [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
    )
    os.makedirs(tmp)
    try:
        return subprocess.run(
            [sys.executable, "-c", block.code],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=tmp,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(
            error.cmd,
            "timeout",
            error.stdout or "",
            f"{error.stderr or ''}\nstill running after {TIMEOUT} s",
        )


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory):
    """Every Python block's run, started in a pool of WORKERS processes
    when the first test asks: {block id: future CompletedProcess}."""
    root = tmp_path_factory.mktemp("readme_blocks")
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        yield {
            block.id: pool.submit(run_block, block, str(root / f"block{i}"))
            for i, block in enumerate(PYTHON_BLOCKS)
        }


def check_dtensor(result):
    first, last = map(
        float, re.search(r"loss ([\d.]+) -> ([\d.]+)", result.stdout).groups()
    )
    assert last < 0.8 * first, result.stdout
    assert "kernel_0_momentum ['batch', 'model']" in result.stdout, (
        result.stdout
    )


# More than "exits 0", by section.
CHECKS = {"DTensor": check_dtensor}


def test_readme_has_python_blocks():
    sections = {b.section for b in PYTHON_BLOCKS if b.path == "README.md"}
    assert {"Quickstart", "DTensor"} <= sections, sections


def test_every_block_is_python_shell_or_text():
    other = [
        (b.id, b.language) for b in BLOCKS if b.language not in RUN | NOT_RUN
    ]
    assert not other, other


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs_as_pasted(block, block_runs):
    result = block_runs[block.id].result()
    status = result.returncode
    assert status == 0, f"{block.id} exited {status}:\n{result.stderr[-3000:]}"
    if block.section in CHECKS:
        CHECKS[block.section](result)


# Run against an installed keras_adamw from a copy of the tests without the
# package's source beside them, links into keras_adamw/ cannot resolve.
layout_checks = pytest.mark.skipif(
    not os.path.isfile(os.path.join(ROOT, "keras_adamw", "__init__.py")),
    reason="not a full source tree: keras_adamw/ is not beside tests/",
)


@layout_checks
def test_files_named_in_shell_blocks_exist():
    path = re.compile(r"^[\w.-]+(/[\w.-]+)+\.(py|ipynb|md|cfg|toml|txt)$")
    missing = []
    for block in BLOCKS:
        if block.language not in NOT_RUN - {"", "text"}:
            continue
        for word in block.code.split():
            if path.match(word) and not os.path.exists(
                os.path.join(ROOT, word)
            ):
                missing.append((block.id, word))
    assert not missing, missing


@layout_checks
def test_links_to_repository_files_resolve():
    missing = [
        (path, target)
        for path in markdown_files()
        for target in local_links(path)
        if not os.path.exists(os.path.join(ROOT, target))
    ]
    assert not missing, missing
