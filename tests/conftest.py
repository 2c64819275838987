"""Fixtures shared by the test files. The environment and the four logical
CPU devices are set up before this by the root conftest.py (for the job
processes, which load no conftest, by tests/environment.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.reference import dense_from_sparse


def _train_table(optimizer, steps, sparse, rows=6, dim=3, init=None):
    """Applies `steps`, a list of (indices, values) gather gradients, to a
    float32 `rows` x `dim` table starting at `init`: as `tf.IndexedSlices`
    if `sparse`, else as their dense sum. Returns the table in float64."""
    table = keras.Variable(init, dtype="float32", name="table")
    for indices, values in steps:
        if sparse:
            gradient = tf.IndexedSlices(
                tf.constant(values, tf.float32),
                tf.constant(indices),
                tf.constant([rows, dim]),
            )
        else:
            gradient = tf.constant(
                dense_from_sparse(indices, values, rows), tf.float32
            )
        optimizer.apply([gradient], [table])
    return table.numpy().astype(np.float64)


@pytest.fixture
def train_table():
    """`_train_table`: sparse gradients against their dense sum."""
    return _train_table
