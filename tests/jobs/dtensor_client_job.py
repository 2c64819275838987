"""One DTensor client for tests/test_dtensor_multi_client.py.

    python -m tests.jobs.dtensor_client_job --out=FILE.npz [--steps=N]
        [--feed=pack|copy]

With `DTENSOR_JOBS` (comma-separated host:port, one per client),
`DTENSOR_CLIENT_ID`, `DTENSOR_NUM_CLIENTS` and `DTENSOR_JOB_NAME` set, the
process is one client of a multi-client cluster; without them DTensor runs
in local mode (one client). Either way the global mesh is
`[("batch", 2), ("model", 2)]` over 4 CPU devices: each client configures
`4 // num_clients` logical CPU devices and `dtensor.create_distributed_mesh`
lays the mesh over all clients' devices (client c holds global devices
2c and 2c + 1, i.e. row c of the "batch" dimension).

`train_on_mesh` trains a two-layer MLP (fixed initial weights;
`DVariable`s made with `MeshPlacement.make_variable`: w1 and b1 sharded
along "model", w2 along "model" in its first dimension, b2 replicated) with
`keras_adamw.dtensor.AdamW(mesh, learning_rate=1e-2, amsgrad=True,
use_ema=True)`, one `tf.function` step per global batch of 16 (the same
batches on every client) sharded along "batch". `train_core` trains the
same MLP on the same batches on regular variables with the core
`keras_adamw.AdamW`. The test imports both to compute its references.

The process writes to `--out`:
- `init_<i>`, `weight_<i>`: the global value of each model weight before
  and after training;
- `optimizer_<i>`: the global value of each of `optimizer.variables`;
- `loss`: the global loss of each step;
- `info`: JSON: client id, number of clients, the mesh and this client's
  devices, the global rows of the first batch each local device holds,
  optimizer variable paths, timings.
"""

import argparse
import json
import os
import time

from tests import environment

environment.set_defaults()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

# Importing keras_adamw (and Keras) does not initialize the TF context, so
# it may come before `initialize_accelerator_system`.
import keras_adamw  # noqa: E402
from keras_adamw.dtensor import MeshPlacement  # noqa: E402

GLOBAL_DEVICES = 4
GLOBAL_BATCH = 16
MESH_DIMS = [("batch", 2), ("model", 2)]
U = dtensor.UNSHARDED
OPTIMIZER_ARGS = dict(
    learning_rate=1e-2, amsgrad=True, use_ema=True, skip_nonfinite=True
)
# A NaN in one example of this step's batch, in the rows client 1 feeds:
# every client must skip the step (skip_nonfinite).
NONFINITE_STEP, NONFINITE_ROW = 1, 12

_INIT_RNG = np.random.RandomState(0)
INIT = {
    "w1": (_INIT_RNG.randn(8, 16) * 0.3).astype("float32"),
    "b1": np.zeros(16, "float32"),
    "w2": (_INIT_RNG.randn(16, 4) * 0.3).astype("float32"),
    "b2": np.zeros(4, "float32"),
}
LAYOUTS = {"w1": [U, "model"], "b1": ["model"], "w2": ["model", U], "b2": [U]}


def global_batches(steps, with_nan=False):
    """`steps` global batches (x, y) of GLOBAL_BATCH examples; with
    `with_nan`, the batch `NONFINITE_STEP` holds a NaN in row
    `NONFINITE_ROW`."""
    rng = np.random.RandomState(1)
    x = rng.randn(steps, GLOBAL_BATCH, 8).astype("float32")
    y = np.sin(x[:, :, :4] * 2.0).astype("float32")
    if with_nan and steps > NONFINITE_STEP:
        x[NONFINITE_STEP, NONFINITE_ROW, 0] = np.nan
    return list(zip(x, y))


def local_shards(array, layout):
    """The pieces of the global `array` that this client's devices hold
    under `layout`, in the order of `mesh.local_device_ids()`."""
    mesh = layout.mesh
    pieces = []
    for location in mesh.local_device_locations():
        index = []
        for dim, spec in enumerate(layout.sharding_specs):
            if spec == U:
                index.append(slice(None))
                continue
            size = array.shape[dim] // mesh.dim_size(spec)
            begin = location[spec] * size
            index.append(slice(begin, begin + size))
        pieces.append(array[tuple(index)])
    return pieces


def feed(array, layout, how="pack"):
    """The global batch `array` (every client has all of it) as a DTensor
    with `layout`.

    A DTensor made eagerly from host data never moves that data between
    clients: each client supplies the components of its own devices, and
    the DTensor is what the clients supplied together.

    `pack` (the default) says so explicitly: each client passes exactly
    `mesh.num_local_devices()` pieces, cut from the global array by the
    mesh coordinates of its local devices (batch-sharded: client 0 rows
    0-7 twice, client 1 rows 8-15 twice).

    `copy` works on the multi-client mesh too (we checked: the same bits as
    `pack`): `copy_to_mesh` is `relayout` of a regular tensor to a
    replicated layout, which puts each client's own host value on its local
    devices (right only because every client passes the same value), then
    `relayout` to the sharded layout slices locally.
    """
    if how == "pack":
        return dtensor.pack(
            [tf.constant(p) for p in local_shards(array, layout)], layout
        )
    replicated = dtensor.copy_to_mesh(
        tf.constant(array), dtensor.Layout.replicated(layout.mesh, layout.rank)
    )
    return dtensor.relayout(replicated, layout)


def local_batch_rows(tensor, array):
    """For each of this client's components of the DTensor `tensor`, the
    rows of the global batch `array` it holds."""
    return [
        [
            int(np.flatnonzero((array == row).all(axis=1))[0])
            for row in component.numpy()
        ]
        for component in dtensor.unpack(tensor)
    ]


def mlp(weights, x):
    w1, b1, w2, b2 = weights
    return tf.matmul(tf.nn.tanh(tf.matmul(x, w1) + b1), w2) + b2


def train(weights, optimizer, batches):
    """One `tf.function` step per batch (on a multi-client mesh every client
    runs the same functions in the same order); returns the losses.

    Without AutoGraph: converting Keras' `apply_gradients` and what it calls
    takes most of the tracing time (about 15 s of 20 s on a busy 2-core
    machine), and nothing here needs it (Keras and keras_adamw use
    `tf.cond` where a branch depends on a tensor).
    """

    @tf.function(autograph=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(mlp(weights, x) - y))
        gradients = tape.gradient(loss, weights)
        optimizer.apply_gradients(zip(gradients, weights))
        return loss

    return [step(x, y) for x, y in batches]


def train_on_mesh(mesh, steps, how="pack"):
    """Trains the MLP on `mesh` with `keras_adamw.dtensor.AdamW`; returns
    ({name: global array}, info)."""
    place = MeshPlacement(mesh)
    batch_layout = dtensor.Layout(["batch", U], mesh)
    weights = [
        place.make_variable(
            tf.constant(INIT[k]),
            dtensor.Layout(LAYOUTS[k], mesh),
            name=k,
            trainable=True,
        )
        for k in INIT
    ]
    optimizer = keras_adamw.dtensor.AdamW(mesh, **OPTIMIZER_ARGS)
    batches = global_batches(steps, with_nan=True)
    on_mesh = [
        (feed(x, batch_layout, how), feed(y, batch_layout, how))
        for x, y in batches
    ]
    losses = train(weights, optimizer, on_mesh)
    # Global values: `MeshPlacement.numpy` relayouts to replicated (an
    # all-gather across all clients' devices) and takes this client's first
    # local component; it works unchanged on a multi-client mesh.
    arrays = {f"init_{i}": INIT[k] for i, k in enumerate(INIT)}
    arrays.update(
        {f"weight_{i}": place.numpy(w) for i, w in enumerate(weights)}
    )
    arrays.update(
        {
            f"optimizer_{i}": place.numpy(v)
            for i, v in enumerate(optimizer.variables)
        }
    )
    arrays["loss"] = np.array([place.numpy(loss) for loss in losses])
    info = {
        "mesh": mesh.to_string(),
        "local_device_ids": [int(i) for i in mesh.local_device_ids()],
        "local_devices": [str(d) for d in mesh.local_devices()],
        "local_batch_rows": local_batch_rows(on_mesh[0][0], batches[0][0]),
        "feed": how,
        "optimizer_paths": [v.path for v in optimizer.variables],
    }
    return arrays, info


def train_core(steps):
    """Trains the MLP on regular variables with the core `keras_adamw.AdamW`;
    returns ({name: array}, optimizer variable paths)."""
    weights = [tf.Variable(INIT[k], name=k) for k in INIT]
    optimizer = keras_adamw.AdamW(**OPTIMIZER_ARGS)
    losses = train(
        weights,
        optimizer,
        [
            (tf.constant(x), tf.constant(y))
            for x, y in global_batches(steps, with_nan=True)
        ],
    )
    arrays = {f"weight_{i}": w.numpy() for i, w in enumerate(weights)}
    arrays.update(
        {
            f"optimizer_{i}": v.numpy()
            for i, v in enumerate(optimizer.variables)
        }
    )
    arrays["loss"] = np.array([float(loss) for loss in losses])
    return arrays, [v.path for v in optimizer.variables]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--feed", default="pack", choices=["pack", "copy"])
    args = parser.parse_args()
    start = time.monotonic()
    times = {}

    # From DTENSOR_JOBS (1 client in local mode) and DTENSOR_CLIENT_ID.
    num_clients = dtensor.num_clients()
    client_id = dtensor.client_id()
    # DTensor's C++ side reads DTENSOR_NUM_CLIENTS itself: keep it in line.
    assert int(os.environ.get("DTENSOR_NUM_CLIENTS", "1")) == num_clients, (
        os.environ.get("DTENSOR_NUM_CLIENTS"),
        num_clients,
    )
    # The logical devices first, before anything initializes the TF
    # context. Then the accelerator system: in multi-client mode
    # (DTENSOR_JOBS set) it starts this client's gRPC server on its
    # DTENSOR_JOBS port, enables collective ops with task 0 as collective
    # leader, and connects to the coordination service (hosted by task 0),
    # so that one mesh can span both processes.
    environment.use_logical_cpus(GLOBAL_DEVICES // num_clients)
    dtensor.initialize_accelerator_system("CPU")
    times["initialized"] = time.monotonic() - start
    mesh = dtensor.create_distributed_mesh(MESH_DIMS, device_type="CPU")

    arrays, info = train_on_mesh(mesh, args.steps, args.feed)
    times["trained"] = time.monotonic() - start
    # No client leaves while another may still need it for a collective.
    dtensor.barrier(mesh, "done")
    times["done"] = time.monotonic() - start
    info.update(client_id=client_id, num_clients=num_clients, times=times)
    np.savez(args.out, info=json.dumps(info), **arrays)
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
