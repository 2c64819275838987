"""The precision options in DTensor mode on a 2x2 mesh of logical CPUs,
against the float64 reference: slots in `moment_dtype` and compensation
slots laid out like their variables, skipped steps, and `"lazy"` falling
back to the exact dense update with one warning."""

import warnings

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import keras_adamw
from keras_adamw.dtensor import MeshPlacement
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

U = dtensor.UNSHARDED
MESH = dtensor.create_mesh([("batch", 2), ("model", 2)], device_type="CPU")
PLACE = MeshPlacement(MESH)
LAYOUTS = {"rows": ["model", U], "both": ["batch", "model"], "scalar": []}
SHAPES = {"rows": (4, 6), "both": (4, 6), "scalar": ()}
NAMES = list(LAYOUTS)
STEPS = 10
NAN_STEP = 3
NUMPY = {"float32": None, "bfloat16": ml_dtypes.bfloat16}
# name: (optimizer arguments, reference arguments, dtype, tolerance)
OPTIONS = {
    "moment_dtype": (
        {"moment_dtype": "bfloat16"},
        {"moment_dtype": ml_dtypes.bfloat16},
        "float32",
        1e-5,
    ),
    "kahan_summation": (
        {"kahan_summation": True, "moment_dtype": "float32"},
        {"kahan_summation": True, "moment_dtype": np.float32},
        "bfloat16",
        4 * 2.0**-7,
    ),
    "skip_nonfinite": (
        {"skip_nonfinite": True},
        {"skip_nonfinite": True},
        "float32",
        1e-5,
    ),
}


def layout(name):
    return dtensor.Layout(LAYOUTS[name], MESH)


def problem(dtype, nan):
    rng = np.random.RandomState(5)
    cast = NUMPY[dtype] or np.float32
    init = {n: np.asarray(rng.randn(*SHAPES[n])).astype(cast) for n in NAMES}
    grads = []
    for step in range(STEPS):
        step_grads = [
            np.asarray(rng.randn(*SHAPES[n]) * [0.2, 2.0][step % 2]).astype(
                cast
            )
            for n in NAMES
        ]
        if nan and step == NAN_STEP:
            step_grads[0][0, 0] = np.nan
        grads.append(step_grads)
    return init, grads


@pytest.mark.parametrize(
    "name,jit_compile",
    [
        ("moment_dtype", True),
        ("kahan_summation", False),
        ("skip_nonfinite", True),
        ("skip_nonfinite", False),
    ],
)
def test_option_on_mesh_equals_reference(name, jit_compile):
    kwargs, reference_kwargs, dtype, tolerance = OPTIONS[name]
    init, grads = problem(dtype, name == "skip_nonfinite")
    variables = [
        PLACE.make_variable(
            tf.constant(init[n], dtype), layout(n), name=n, trainable=True
        )
        for n in NAMES
    ]
    optimizer = keras_adamw.dtensor.AdamW(
        MESH, learning_rate=0.05, jit_compile=jit_compile, **kwargs
    )

    @tf.function
    def apply(gradients):
        optimizer.apply_gradients(zip(gradients, variables))

    for step_grads in grads:
        apply(
            [
                PLACE.to_mesh(tf.constant(g, dtype), layout(n))
                for g, n in zip(step_grads, NAMES)
            ]
        )
    reference = NumpyAdam(
        [init[n].astype(np.float64) for n in NAMES],
        learning_rate=0.05,
        weight_decay=0.004,
        dtype=NUMPY[dtype],
        **reference_kwargs,
    )
    for step_grads in grads:
        reference.step([g.astype(np.float64) for g in step_grads])
    for i, (variable, n) in enumerate(zip(variables, NAMES)):
        ours = PLACE.numpy(variable).astype(np.float64)
        expected = reference.weights[i]
        scale = np.maximum(1.0, np.abs(expected))
        assert np.max(np.abs(ours - expected) / scale) <= tolerance, n
        slots = [optimizer._momentums[i], optimizer._velocities[i]]
        if optimizer._compensations is not None:
            slots.append(optimizer._compensations[i])
        for slot in slots:
            assert dtensor.fetch_layout(slot.value) == layout(n)
        moment = kwargs.get("moment_dtype") or dtype
        assert optimizer._velocities[i].dtype == moment
    if name == "skip_nonfinite":
        assert int(PLACE.numpy(optimizer.skipped_steps)) == 1
        assert int(PLACE.numpy(optimizer.iterations)) == STEPS - 1


def test_lazy_on_mesh_falls_back_to_dense_with_one_warning():
    rng = np.random.RandomState(3)
    table_init = rng.randn(6, 4)
    ids = np.array([1, 2, 2, 5, 1, 1], np.int32)
    table = PLACE.make_variable(
        tf.constant(table_init, tf.float32),
        dtensor.Layout([U, "model"], MESH),
        name="table",
        trainable=True,
    )
    optimizer = keras_adamw.dtensor.AdamW(MESH, sparse_updates="lazy")
    values = rng.randn(6, 4).astype(np.float32)
    reference = NumpyAdam(
        [table_init], learning_rate=float(np.float32(1e-3)), weight_decay=0.004
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            gradient = tf.IndexedSlices(
                PLACE.to_mesh(tf.constant(values), PLACE.replicated(2)),
                PLACE.to_mesh(tf.constant(ids), PLACE.replicated(1)),
                tf.constant([6, 4]),
            )
            optimizer.apply_gradients([(gradient, table)])
            reference.step([dense_from_sparse(ids, values, 6)])
    messages = [str(w.message) for w in caught if "lazy" in str(w.message)]
    assert len(messages) == 1 and "falls back to the dense" in messages[0]
    # Dense: rows 0, 3 and 4 (no gradient) moved too, as the reference.
    np.testing.assert_allclose(
        PLACE.numpy(table), reference.weights[0], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(PLACE.numpy(table)[0], table_init[0])
