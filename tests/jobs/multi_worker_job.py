"""One training process for tests/test_multi_worker.py.

    python -m tests.jobs.multi_worker_job --out=DIR/name.npz [--multi_worker]
        [--backup_dir=DIR] [--crash_at_step=N --marker=FILE]

Trains a tiny Keras model with
`keras_adamw.AdamW(learning_rate=0.01, amsgrad=True, use_ema=True,
gradient_accumulation_steps=2)` through
`model.fit` on fixed synthetic data (EXAMPLES examples, global batches of
GLOBAL_BATCH, EPOCHS epochs, no shuffling) and writes to `--out`:

- `weight_<i>`: the model's weights after `fit` (EMA averages, since `fit`
  calls `finalize_variable_values` at the end);
- `optimizer_<i>`: `[v.numpy() for v in optimizer.variables]` (iterations,
  learning rate, momentums, velocities, velocity_hats, EMA averages);
- `events`: a JSON string saying what the process saw (its first epoch, the
  optimizer's iterations when its first batch began, the epochs it ran).

With `--multi_worker` the process is one worker of a
`tf.distribute.MultiWorkerMirroredStrategy` described by `TF_CONFIG`; without
it, one process with the default strategy trains on the same global batches.

With `--crash_at_step=N` the process calls `os._exit(1)` right after the
optimizer's N-th step, unless `--marker` exists; it creates the marker first,
so a restarted process with the same flags trains to the end.
"""

import argparse
import json
import os

from tests import environment

environment.set_defaults()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

EXAMPLES = 64
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = EXAMPLES // GLOBAL_BATCH
EPOCHS = 3


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--multi_worker", action="store_true")
    parser.add_argument("--backup_dir", default=None)
    parser.add_argument("--crash_at_step", type=int, default=None)
    parser.add_argument("--marker", default=None)
    # How a multi-worker run splits the global batches (see make_dataset);
    # the tests use the default, the others reproduce our measurements.
    parser.add_argument(
        "--split",
        default="halves",
        choices=["halves", "keras_auto", "auto_shard_off"],
    )
    args = parser.parse_args()
    if args.crash_at_step is not None and not args.marker:
        parser.error("--crash_at_step needs --marker")
    return args


ARGS = parse_args()

if ARGS.multi_worker:
    # Collective ops need no `enable_collective_ops` call: the strategy
    # starts the gRPC server from TF_CONFIG and configures collectives
    # itself. It must be created before any other TensorFlow op runs. RING is
    # what AUTO picks on CPU anyway (NCCL is GPU-only); naming it keeps the
    # test independent of that choice.
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=(
                tf.distribute.experimental.CommunicationImplementation.RING
            )
        )
    )
    assert STRATEGY.num_replicas_in_sync == 2, STRATEGY.num_replicas_in_sync
else:
    STRATEGY = tf.distribute.get_strategy()

import keras  # noqa: E402

import keras_adamw  # noqa: E402

RNG = np.random.RandomState(0)
X = RNG.normal(size=(EXAMPLES, 4)).astype("float32")
Y = (
    np.sin(X @ np.array([[1.0], [-2.0], [0.5], [1.5]]))
    + 0.1 * RNG.normal(size=(EXAMPLES, 1))
).astype("float32")


def global_batches():
    return tf.data.Dataset.from_tensor_slices((X, Y)).batch(GLOBAL_BATCH)


def make_dataset():
    """The training data: the same global batches in both modes.

    Multi-worker: each global batch of 16 is cut into two contiguous halves
    of `get_per_replica_batch_size(16) == 8`; worker `input_pipeline_id`
    takes its half. Keras' loss is the mean over the replica's 8 examples
    scaled by 1 / num_replicas_in_sync (`scale_loss_for_distribution`), and
    the optimizer sums the replicas' gradients, so a step uses exactly the
    one-process mean gradient over the global batch (up to float32
    summation order).

    What we measured with 2 workers and `experimental_distribute_dataset`
    (what `fit` calls on a plain `tf.data.Dataset`; `--split` selects
    them, and we printed the examples each worker read):
    - AutoShardPolicy AUTO (the default) falls back to DATA for in-memory
      data: the batch of 16 is re-batched to 8 and worker i gets every other
      sub-batch, i.e. the same halves as here; the end state equals the one
      process to 1.5e-8. It is right only because there is no file source
      (with files, AUTO shards by FILE and the global batches change).
    - AutoShardPolicy OFF: the batch is still re-batched to 8 but not
      sharded, so both workers read the same 8 examples at every step, and
      since `fit` stops an epoch after the dataset's 4 batches, an epoch
      sees only the first 32 examples. Wrong: momentums differ from the one
      process by up to 0.05.
    `distribute_datasets_from_function` states the split explicitly.
    """
    if not ARGS.multi_worker:
        return global_batches()
    if ARGS.split == "keras_auto":
        return global_batches()
    if ARGS.split == "auto_shard_off":
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        return global_batches().with_options(options)

    def worker_dataset(context):
        size = context.get_per_replica_batch_size(GLOBAL_BATCH)
        begin = context.input_pipeline_id * size
        return global_batches().map(
            lambda x, y: (x[begin : begin + size], y[begin : begin + size])
        )

    return STRATEGY.distribute_datasets_from_function(worker_dataset)


def work_around_keras_multi_worker_fit(model):
    """Two Keras 3.15.1 bugs make every `fit` under MultiWorkerMirroredStrategy
    with two or more workers fail, whatever the optimizer
    (keras-team/keras#20585, tensorflow/tensorflow#72388). Both are in
    keras/src/backend/tensorflow/trainer.py; we patch this one model.

    1. `_maybe_symbolic_build` takes the first distributed batch, an
       `(x, y)` tuple of `PerReplica` values, and calls
       `strategy.reduce("MEAN", batch, axis=None)` on the whole tuple. With
       one worker, MirroredStrategy passes a non-distributed structure
       through; with two workers `CollectiveAllReduceExtended._reduce_to`
       hands it to the collective ops: "ValueError: Attempt to convert a
       value (PerReplica:{...}) with an unsupported type ... to a Tensor".
       The symbolic build needs only shapes, so we build (model, loss,
       optimizer, in the strategy's scope) from this worker's local copy.
    2. `reduce_per_replica(..., reduction="auto")` (the train function
       ignores `distribute_reduction_method`) means `"mean"`, which for
       multi-worker is `strategy.reduce("MEAN", v, axis=0)`: a scalar log
       such as the loss fails with "Invalid reduction dimension 0 for input
       with 0 dimensions". We give every log a leading axis of length 1, so
       the reduction is the mean over the replicas, as intended.

    Neither patch touches the gradients or the optimizer.
    """
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        return {
            name: tf.reshape(value, [1])
            for name, value in train_step(data).items()
        }

    def maybe_symbolic_build(iterator=None, data_batch=None):
        strategy = model.distribute_strategy
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: strategy.experimental_local_results(v)[0],
                    next(batches),
                )
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model.train_step = train_step_with_vector_logs
    model._maybe_symbolic_build = maybe_symbolic_build


def task_index():
    if not ARGS.multi_worker:
        return 0
    return json.loads(os.environ["TF_CONFIG"])["task"]["index"]


class Record(keras.callbacks.Callback):
    """Records where training (re)started, and crashes on request."""

    def __init__(self):
        super().__init__()
        self.events = {
            "task": task_index(),
            "epochs_run": [],
            "first_epoch": None,
            "iterations_at_start": None,
        }

    def on_epoch_begin(self, epoch, logs=None):
        if self.events["first_epoch"] is None:
            self.events["first_epoch"] = epoch
        self.events["epochs_run"].append(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if self.events["iterations_at_start"] is None:
            self.events["iterations_at_start"] = int(
                self.model.optimizer.iterations.numpy()
            )

    def on_train_batch_end(self, batch, logs=None):
        if ARGS.crash_at_step is None or os.path.exists(ARGS.marker):
            return
        # Count calls, not optimizer.iterations (real steps under
        # gradient accumulation): a global step of this process's run.
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls >= ARGS.crash_at_step:
            with open(ARGS.marker, "w") as marker:
                marker.write(json.dumps(self.events))
            os._exit(1)  # A lost process: no cleanup, no exception.


def main():
    keras.config.disable_traceback_filtering()
    with STRATEGY.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.Dense(1),
            ]
        )
        optimizer = keras_adamw.AdamW(
            learning_rate=0.01,
            amsgrad=True,
            use_ema=True,
            gradient_accumulation_steps=2,
        )
        model.compile(optimizer=optimizer, loss="mse")
    if ARGS.multi_worker:
        work_around_keras_multi_worker_fit(model)
    record = Record()
    callbacks = []
    if ARGS.backup_dir:
        callbacks.append(
            keras.callbacks.BackupAndRestore(
                ARGS.backup_dir, save_freq="epoch"
            )
        )
    callbacks.append(record)
    model.fit(
        make_dataset(),
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update(
        {
            f"optimizer_{i}": v.numpy()
            for i, v in enumerate(optimizer.variables)
        }
    )
    record.events["optimizer_paths"] = [v.path for v in optimizer.variables]
    np.savez(ARGS.out, events=json.dumps(record.events), **arrays)


if __name__ == "__main__":
    main()
