"""Entry point of the Bazel `py_test` targets: runs pytest on the given files.

bazel test //:test_numerics   # runs: pytest -q tests/test_numerics.py
"""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(pytest.main(sys.argv[1:]))
