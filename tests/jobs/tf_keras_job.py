"""keras_adamw.tf_keras checks that need a process of their own:

1. `import keras_adamw` does not import tf_keras, and without tf_keras
   `import keras_adamw.tf_keras` says how to install it (simulated by
   `sys.modules["tf_keras"] = None`);
2. a tf_keras model under `tf.distribute.MirroredStrategy` over 2 logical
   CPUs equals the same training on one device (a process holds
   MirroredStrategy objects of one size only, so not in pytest's).

    python -m tests.jobs.tf_keras_job --out=results.json
"""

import argparse
import json
import sys

from tests import environment

environment.set_defaults()

import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()
environment.use_logical_cpus(2)

import numpy as np  # noqa: E402

import keras_adamw  # noqa: E402, F401

RESULTS = {"keras_adamw_imports_tf_keras": "tf_keras" in sys.modules}
sys.modules["tf_keras"] = None  # What a missing tf_keras looks like.
try:
    import keras_adamw.tf_keras  # noqa: F811

    RESULTS["missing_tf_keras_error"] = None
except ImportError as error:
    RESULTS["missing_tf_keras_error"] = str(error)
del sys.modules["tf_keras"]

import tf_keras  # noqa: E402

import keras_adamw.tf_keras  # noqa: E402

RNG = np.random.RandomState(0)
IDS = RNG.randint(0, 10, size=(32, 3)).astype("int32")
IDS[:, 1] = IDS[:, 0]  # Repeated ids: sparse gradients with duplicates.
Y = RNG.randn(32, 1).astype("float32")


def make_model():
    tf_keras.utils.set_random_seed(1)
    ids = tf_keras.Input((3,), dtype="int32")
    x = tf_keras.layers.Embedding(10, 4)(ids)
    x = tf_keras.layers.Flatten()(x)
    x = tf_keras.layers.Dense(4, activation="tanh")(x)
    return tf_keras.Model(ids, tf_keras.layers.Dense(1)(x))


def train(strategy, jit_compile):
    with strategy.scope():
        model = make_model()
        optimizer = keras_adamw.tf_keras.AdamW(
            0.01,
            weight_decay=0.01,
            global_clipnorm=0.5,  # Clips: only right after the sum.
            use_ema=True,
            ema_momentum=0.9,
            jit_compile=jit_compile,
        )
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(IDS, Y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    copies = [
        [c.numpy() for c in strategy.experimental_local_results(v)]
        for v in model.weights + list(optimizer.variables)
    ]
    return copies, int(optimizer.iterations.numpy())


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for jit_compile in (True, False):
    expected, _ = train(tf.distribute.get_strategy(), jit_compile)
    actual, steps = train(mirrored, jit_compile)
    RESULTS[f"mirrored/jit={jit_compile}"] = {
        "steps": steps,
        "copies": sorted({len(c) for c in actual}),
        "max_difference": max(
            float(np.abs(copy - e[0]).max())
            for a, e in zip(actual, expected)
            for copy in a
        ),
    }

with open(ARGS.out, "w") as out:
    json.dump(RESULTS, out)
