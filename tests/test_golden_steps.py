"""The step's numbers are bit-identical to those recorded before the
architecture redesign (see `tests/golden_steps.py`)."""

import numpy as np
import tensorflow as tf

from tests import golden_steps


def test_numbers_are_bit_identical_to_the_recorded_ones():
    """Bit for bit on the TensorFlow release that recorded them; on another
    release (whose XLA may round differently) within float32 rounding."""
    expected = dict(np.load(golden_steps.PATH))
    recorded_on = str(expected.pop("tensorflow_version"))
    actual = golden_steps.compute()
    assert sorted(actual) == sorted(expected)
    same_release = recorded_on == tf.__version__
    differing = []
    for key in sorted(expected):
        if expected[key].dtype != actual[key].dtype:
            differing.append(key)
        elif same_release and not np.array_equal(expected[key], actual[key]):
            differing.append(key)
        elif not same_release and not np.allclose(
            expected[key], actual[key], rtol=1e-6, atol=1e-7
        ):
            differing.append(key)
    assert not differing, (recorded_on, differing[:10])
