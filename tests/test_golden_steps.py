"""The step's numbers are bit-identical to those recorded before the
architecture redesign (see `tests/golden_steps.py`)."""

import numpy as np

from tests import golden_steps


def test_numbers_are_bit_identical_to_the_recorded_ones():
    expected = np.load(golden_steps.PATH)
    actual = golden_steps.compute()
    assert sorted(actual) == sorted(expected.files)
    differing = [key for key in expected.files
                 if expected[key].dtype != actual[key].dtype
                 or not np.array_equal(expected[key], actual[key])]
    assert not differing, differing[:10]
