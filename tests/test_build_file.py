"""BUILD must list every package module and every test file."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def listed_files():
    return set(
        re.findall(
            r'"((?:keras_adamw|tests)/[\w/]+\.py)"',
            (ROOT / "BUILD").read_text(),
        )
    )


def test_build_lists_every_module():
    modules = {
        str(p.relative_to(ROOT)) for p in (ROOT / "keras_adamw").rglob("*.py")
    }
    assert modules - listed_files() == set()


def test_build_lists_every_test_file():
    tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")}
    assert tests - listed_files() == set()


def test_readme_bazel_command_names_existing_targets():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^bazel test (.+)$", readme, re.M).group(1)
    targets = [t[len("//:") :] for t in command.split()]
    assert targets
    for target in targets:
        assert f"tests/{target}.py" in listed_files(), target
