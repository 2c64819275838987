"""ParameterServerStrategy with an in-process cluster, in a process of its own.

    python -m tests.jobs.ps_job --out=results.json

Two workers and one parameter server run as in-process servers on free
localhost ports (the TensorFlow tutorial's setup). Writes what
tests/test_distribute.py checks: keras_adamw trains with a ClusterCoordinator
custom loop (falling back from XLA with one warning), and Keras 3's fit
cannot train under this strategy at all.
"""

import argparse
import json
import warnings

from tests import environment

environment.set_defaults()

import tensorflow as tf  # noqa: E402

from tests.jobs.processes import free_ports  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
ARGS = parser.parse_args()


ports = free_ports(3)
cluster = tf.train.ClusterSpec(
    {
        "worker": [f"127.0.0.1:{port}" for port in ports[:2]],
        "ps": [f"127.0.0.1:{ports[2]}"],
    }
)
# With 2 cores, a server's default inter-op pool can block on remote reads.
config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=8)
servers = [
    tf.distribute.Server(
        cluster,
        job_name="worker",
        task_index=i,
        protocol="grpc",
        config=config,
    )
    for i in range(2)
]
servers.append(
    tf.distribute.Server(
        cluster, job_name="ps", task_index=0, protocol="grpc", config=config
    )
)
strategy = tf.distribute.ParameterServerStrategy(
    tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster, rpc_layer="grpc"
    )
)
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_adamw  # noqa: E402

RESULTS = {}
rng = np.random.RandomState(0)
X = rng.randn(16, 4).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]])).astype("float32")
STEPS = 30

with strategy.scope():
    kernel = tf.Variable(tf.zeros([4, 1]), name="kernel")
    bias = tf.Variable(tf.zeros([1]), name="bias")
    optimizer = keras_adamw.AdamW(learning_rate=0.1)  # jit_compile=True
    optimizer.build([kernel, bias])
RESULTS["variables_on_ps"] = all(
    "/job:ps" in v.device for v in [kernel, bias, optimizer.iterations.value]
)


@tf.function
def train_step():
    def replica_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(X @ kernel + bias - Y))
        gradients = tape.gradient(loss, [kernel, bias])
        optimizer.apply_gradients(zip(gradients, [kernel, bias]))
        return loss

    return strategy.run(replica_step)


with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    losses = [coordinator.schedule(train_step) for _ in range(STEPS)]
    coordinator.join()
RESULTS["fallback_warnings"] = sum(
    "cannot run under ParameterServerStrategy" in str(w.message)
    for w in caught
)
RESULTS["first_loss"] = float(losses[0].fetch())
RESULTS["last_loss"] = float(losses[-1].fetch())
RESULTS["iterations"] = int(optimizer.iterations.numpy())
RESULTS["steps"] = STEPS

# Keras 3's fit under ParameterServerStrategy.
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adamw.AdamW(), loss="mse")
try:
    model.fit(
        tf.data.Dataset.from_tensor_slices((X, Y)).batch(4).repeat(),
        epochs=1,
        steps_per_epoch=2,
        verbose=0,
    )
    RESULTS["keras_fit_error"] = None
except Exception as error:  # noqa: BLE001 - recording Keras' failure.
    RESULTS["keras_fit_error"] = str(error)[:500]

with open(ARGS.out, "w") as f:
    json.dump(RESULTS, f, indent=1)
print(json.dumps(RESULTS, indent=1))
