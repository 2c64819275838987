"""Bit-for-bit record of the step's numbers, kept across refactorings.

`python -m tests.golden_steps` writes `tests/data/golden_steps.npz`: for
every configuration of `tests/test_numerics.py`, both classes, float32 and
float64, XLA on and off, the model variables and every optimizer variable
after 12 calls (plus a sparse case, `update_step` and
`finalize_variable_values`). `tests/test_golden_steps.py` recomputes them
and asserts they are bit-identical: a change meant to keep behaviour (the
architecture redesign) must not move a single bit.

The file was written by the code before the redesign (commit 10be32a),
then rewritten once on purpose: float64 variables now get a float learning
rate exactly as given, not rounded to float32 (the float64 cases with a
float learning rate moved by up to 6e-9 relative; every float32 case and
every schedule case stayed bit-identical).
"""

import os
import sys

import keras
import numpy as np
import tensorflow as tf

import keras_adamw
from tests import test_numerics

PATH = os.path.join(os.path.dirname(__file__), "data", "golden_steps.npz")


def _record(out, key, optimizer, variables):
    for i, v in enumerate(variables):
        out[f"{key}/var{i}"] = np.asarray(v.numpy())
    for i, v in enumerate(optimizer.variables):
        out[f"{key}/opt{i}"] = np.asarray(v.numpy())


def dense_cases(out):
    # fused=False: the XLA and op-by-op paths' numbers, recorded before the
    # fused kernel existed (it agrees within float32 rounding, not bit for
    # bit: tests/test_fused.py).
    init, grads = test_numerics.make_problem(seed=3)
    for class_name, (cls, _, _) in sorted(test_numerics.CLASSES.items()):
        for config, (kwargs, _) in sorted(test_numerics.CONFIGS.items()):
            for dtype in ("float32", "float64"):
                for jit in (True, False):
                    optimizer = cls(jit_compile=jit, fused=False, **kwargs)
                    variables = [
                        keras.Variable(w, dtype=dtype, name=n)
                        for w, n in zip(init, test_numerics.NAMES)
                    ]
                    for step_grads in grads:
                        optimizer.apply(
                            [tf.constant(g, dtype=dtype) for g in step_grads],
                            variables,
                        )
                    if kwargs.get("use_ema"):
                        optimizer.finalize_variable_values(variables)
                    _record(
                        out,
                        f"{class_name}/{config}/{dtype}/{jit}",
                        optimizer,
                        variables,
                    )


def sparse_and_single_cases(out):
    rng = np.random.RandomState(4)
    init = rng.randn(6, 3)
    for dtype in ("float32", "float64"):
        for jit in (True, False):
            optimizer = keras_adamw.AdamW(
                jit_compile=jit, amsgrad=True, fused=False
            )
            table = keras.Variable(init, dtype=dtype, name="table")
            for _ in range(5):
                grad = tf.IndexedSlices(
                    tf.constant(rng.randn(6, 3), dtype),
                    tf.constant([1, 2, 2, 5, 1, 1]),
                    tf.constant([6, 3]),
                )
                optimizer.apply([grad], [table])
            _record(out, f"sparse/{dtype}/{jit}", optimizer, [table])

        # Recorded when `update_step` ran op by op whatever `jit_compile`
        # said; it now follows `jit_compile` like every other path.
        optimizer = keras_adamw.AdamW(weight_decay=0.1, jit_compile=False)
        weight = keras.Variable(init, dtype=dtype, name="w")
        optimizer.build([weight])
        for _ in range(3):
            optimizer.update_step(
                tf.constant(rng.randn(6, 3), dtype), weight, 0.01
            )
        _record(out, f"update_step/{dtype}", optimizer, [weight])


def compute():
    out = {}
    dense_cases(out)
    sparse_and_single_cases(out)
    return out


if __name__ == "__main__":
    arrays = compute()
    # XLA's code generation differs between TensorFlow releases (by up to
    # ~1e-8 relative): the bits are TensorFlow's version's.
    arrays["tensorflow_version"] = np.array(tf.__version__)
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    np.savez_compressed(PATH, **arrays)
    print(f"wrote {len(arrays)} arrays to {PATH}", file=sys.stderr)
