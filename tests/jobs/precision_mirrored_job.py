"""The precision options under MirroredStrategy, in a process of its own
(a process holds MirroredStrategy objects of one size only):

    python -m tests.jobs.precision_mirrored_job --out=results.json

Two logical CPUs; each replica has its own gradients (dense, or sparse
with repeated ids). Per option it writes the largest difference, over every
local copy, from the float64 reference applied to the cross-replica sum,
and for skip_nonfinite (a NaN on replica 1 only, at one step) each copy's
`skipped_steps` and whether the copies stayed bit-identical to each other.
"""

import argparse
import json

from tests import environment

environment.set_defaults()

import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()
DEVICES = 2
environment.use_logical_cpus(DEVICES)

import keras  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import keras_adamw  # noqa: E402
from tests.reference import NumpyAdam  # noqa: E402
from tests.reference import dense_from_sparse  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(2)])
STEPS = 10
NAN_STEP = 4
INIT = [
    np.random.RandomState(1).randn(6, 3),
    np.random.RandomState(2).randn(3),
]
NUMPY = {"float32": None, "bfloat16": ml_dtypes.bfloat16}
# name: (optimizer arguments, reference arguments, dtype, sparse)
OPTIONS = {
    "moment_dtype": (
        {"moment_dtype": "bfloat16"},
        {"moment_dtype": ml_dtypes.bfloat16},
        "float32",
        False,
    ),
    "kahan_summation": (
        {"kahan_summation": True, "moment_dtype": "float32"},
        {"kahan_summation": True, "moment_dtype": np.float32},
        "bfloat16",
        False,
    ),
    "skip_nonfinite": (
        {"skip_nonfinite": True},
        {"skip_nonfinite": True},
        "float32",
        False,
    ),
    "lazy": ({"sparse_updates": "lazy"}, {}, "float32", True),
}


def replica_gradients(step, replica, dtype, sparse, nan):
    """(ids or None, matrix gradient values, vector gradient) of a replica,
    rounded to `dtype`."""
    rng = np.random.RandomState(100 * step + replica)
    numpy_dtype = NUMPY[dtype] or np.float32
    ids = rng.randint(0, 6, 3) if sparse else None
    matrix = rng.randn(3 if sparse else 6, 3) * (replica + 1)
    vector = rng.randn(3)
    if nan and step == NAN_STEP and replica == 1:
        vector[0] = np.nan
    return (
        ids,
        matrix.astype(numpy_dtype).astype(np.float64),
        vector.astype(numpy_dtype).astype(np.float64),
    )


def copies(variable):
    value = getattr(variable, "value", variable)
    return [
        np.asarray(c, np.float64)
        for c in STRATEGY.experimental_local_results(value)
    ]


def run(name):
    kwargs, reference_kwargs, dtype, sparse = OPTIONS[name]
    nan = name == "skip_nonfinite"
    with STRATEGY.scope():
        variables = [
            keras.Variable(w, dtype=dtype, name=f"w{i}")
            for i, w in enumerate(INIT)
        ]
        optimizer = keras_adamw.AdamW(learning_rate=0.05, **kwargs)

    @tf.function
    def train_step(ids, matrix, vector):
        def replica_step(ids, matrix, vector):
            if sparse:
                matrix = tf.IndexedSlices(matrix, ids, tf.constant([6, 3]))
            optimizer.apply([matrix, vector], variables)

        STRATEGY.run(replica_step, args=(ids, matrix, vector))

    reference = NumpyAdam(
        [v.numpy().astype(np.float64) for v in variables],
        learning_rate=0.05,
        weight_decay=0.004,
        dtype=NUMPY[dtype],
        **reference_kwargs,
    )
    for step in range(STEPS):
        per_replica = [
            replica_gradients(step, r, dtype, sparse, nan)
            for r in range(DEVICES)
        ]

        def value(context, part, step=step):
            item = per_replica[context.replica_id_in_sync_group][part]
            if part == 0:
                return tf.constant(item if sparse else [0], tf.int32)
            return tf.constant(item, dtype)

        train_step(
            *[
                STRATEGY.experimental_distribute_values_from_function(
                    lambda context, part=part: value(context, part)
                )
                for part in range(3)
            ]
        )
        if sparse:
            ids = np.concatenate([p[0] for p in per_replica])
            values = np.concatenate([p[1] for p in per_replica])
            dense = dense_from_sparse(ids, values, 6)
            rows = [ids, None]
        else:
            dense, rows = sum(p[1] for p in per_replica), None
        vector = sum(p[2] for p in per_replica)
        reference.step([dense, vector], rows=rows)
    difference = 0.0
    for i, variable in enumerate(variables):
        expected = reference.weights[i]
        for copy in copies(variable):
            scale = np.maximum(1.0, np.abs(expected))
            difference = max(
                difference, float(np.max(np.abs(copy - expected) / scale))
            )
    result = {"max_difference": difference}
    if nan:
        result["skipped_steps"] = [
            int(c) for c in copies(optimizer.skipped_steps)
        ]
        result["reference_skipped_steps"] = reference.skipped_steps
        result["copies_identical"] = all(
            all(np.array_equal(c, copies(v)[0]) for c in copies(v))
            for v in optimizer.variables + variables
        )
        result["iterations"] = [int(c) for c in copies(optimizer.iterations)]
    return result


RESULTS = {name: run(name) for name in OPTIONS}
with open(ARGS.out, "w") as f:
    json.dump(RESULTS, f, indent=1)
print(json.dumps(RESULTS, indent=1))
