"""Runs the MirroredStrategy checks in a process of its own.

A process can hold MirroredStrategy objects of only one size (collective ops
keep their group keys), so tests/test_distribute.py runs this script once per
device count, from the repository root:

    python -m tests.jobs.mirrored_job --devices=2 --out=results.json

It writes, per case, the largest difference between the distributed run and
its independent counterpart (a one-device run on the same global batches, or
the float64 NumPy reference), plus counts the tests check.
"""

import argparse
import json
import os

from tests import environment

environment.set_defaults()

import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument(
    "--full",
    action="store_true",
    help="Every case; otherwise a subset for a second size.",
)
ARGS = parser.parse_args()

environment.use_logical_cpus(ARGS.devices)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_adamw  # noqa: E402
from keras_adamw import kernels  # noqa: E402
from keras_adamw import step as step_lib  # noqa: E402
from tests.reference import NumpyAdam  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy(
    [f"/cpu:{i}" for i in range(ARGS.devices)]
)
ONE_DEVICE = tf.distribute.get_strategy()
GLOBAL_BATCH = 16
RNG = np.random.RandomState(0)
IDS = RNG.randint(0, 10, size=(64, 3)).astype("int32")
IDS[:, 1] = IDS[:, 0]  # Repeated ids: sparse gradients with duplicates.
TARGETS = np.sin(IDS.sum(axis=1, keepdims=True) / 5.0).astype("float32")
RESULTS = {}


def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def copies(variable):
    """Every local copy of a (possibly mirrored) variable, as arrays."""
    tf_variable = getattr(variable, "value", variable)
    return (
        [
            np.asarray(c)
            for c in STRATEGY.experimental_local_results(tf_variable)
        ]
        if isinstance(tf_variable, tf.distribute.DistributedValues)
        else [np.asarray(tf_variable)]
    )


def state(model, optimizer):
    """Weights and optimizer variables, each as its list of copies."""
    return [copies(v) for v in model.trainable_variables] + [
        copies(v) for v in optimizer.variables
    ]


def max_difference(distributed, single):
    """Largest difference between any copy and the one-device value."""
    assert len(distributed) == len(single)
    worst = 0.0
    for dist_copies, (single_value,) in zip(distributed, single):
        assert len(dist_copies) == ARGS.devices, len(dist_copies)
        for value in dist_copies:
            scale = max(1.0, float(np.max(np.abs(single_value))))
            worst = max(
                worst, float(np.max(np.abs(value - single_value))) / scale
            )
    return worst


EVERYTHING = {
    "amsgrad": True,
    "use_ema": True,
    "ema_momentum": 0.9,
    "ema_overwrite_frequency": 3,
    "learning_rate": keras.optimizers.schedules.ExponentialDecay(0.02, 2, 0.5),
    "gradient_accumulation_steps": 2,
    "global_clipnorm": 0.05,
}
FIT_CONFIGS = {
    "amsgrad_ema": {
        "amsgrad": True,
        "use_ema": True,
        "ema_momentum": 0.9,
        "ema_overwrite_frequency": 3,
    },
    "everything": EVERYTHING,
    "everything_no_xla": dict(EVERYTHING, jit_compile=False),
}
# "plain" runs the XLA program; the others the fused CPU kernel (fused=None
# picks it on CPU devices), each device on its copies.
LOOP_CONFIGS = {"plain": {"fused": False}, "everything": EVERYTHING}
if not ARGS.full:
    FIT_CONFIGS = {"everything": EVERYTHING}


KERNEL_CALLS = []


def count_kernel_calls(apply_adam):
    """`kernels.apply_adam`, counting the kernel calls it builds (one per
    device each time a step function is traced)."""

    def counted(*args, **kwargs):
        KERNEL_CALLS.append(args[0][0].device)
        return apply_adam(*args, **kwargs)

    return counted


kernels.apply_adam = count_kernel_calls(kernels.apply_adam)


def kernel_calls_made():
    """The kernel calls built since the last call of this function."""
    made = len(KERNEL_CALLS)
    KERNEL_CALLS.clear()
    return made


def make_optimizer(config):
    kwargs = dict(learning_rate=0.02)
    kwargs.update(config)
    return keras_adamw.AdamW(**kwargs)


def fit(strategy, config):
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(config)
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(
        IDS,
        TARGETS,
        batch_size=GLOBAL_BATCH,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    return state(model, optimizer), optimizer


def custom_loop(strategy, config):
    """strategy.run + apply_gradients; the optimizer builds in step one."""
    with strategy.scope():
        model = make_model()
        optimizer = make_optimizer(config)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((IDS, TARGETS)).batch(GLOBAL_BATCH)
    )

    @tf.function
    def train_step(batch):
        def replica_step(ids, targets):
            with tf.GradientTape() as tape:
                errors = tf.square(model(ids) - targets)[:, 0]
                loss = tf.nn.compute_average_loss(
                    errors, global_batch_size=GLOBAL_BATCH
                )
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(
                zip(gradients, model.trainable_variables)
            )

        strategy.run(replica_step, args=batch)

    for _ in range(2):
        for batch in dataset:
            train_step(batch)
    return state(model, optimizer), optimizer


DISTRIBUTED_FITS = {}
for name, config in FIT_CONFIGS.items():
    kernel_calls_made()
    distributed, optimizer = fit(STRATEGY, config)
    kernel_traces = kernel_calls_made()
    DISTRIBUTED_FITS[name] = distributed
    single, _ = fit(ONE_DEVICE, config)
    RESULTS[f"fit/{name}"] = {
        "max_difference": max_difference(distributed, single),
        "iterations": int(np.asarray(copies(optimizer.iterations)[0])),
        "xla_traces": optimizer._programs.value.compiled(
            step_lib.apply_step
        ).experimental_get_tracing_count(),
        "kernel_traces": kernel_traces,
    }
for name, config in LOOP_CONFIGS.items():
    kernel_calls_made()
    distributed, optimizer = custom_loop(STRATEGY, config)
    kernel_traces = kernel_calls_made()
    single, _ = custom_loop(ONE_DEVICE, config)
    RESULTS[f"custom_loop/{name}"] = {
        "max_difference": max_difference(distributed, single),
        "xla_traces": optimizer._programs.value.compiled(
            step_lib.apply_step
        ).experimental_get_tracing_count(),
        "kernel_traces": kernel_traces,
    }

# jit_compile True and False under the strategy give the same numbers.
if ARGS.full:
    RESULTS["xla_vs_no_xla"] = {
        "max_difference": max_difference(
            DISTRIBUTED_FITS["everything"],
            [[c[0]] for c in DISTRIBUTED_FITS["everything_no_xla"]],
        )
    }


# Clipping acts on the cross-replica sum: per-replica gradients of different
# sizes, against a float64 reference that clips their sum.
def replica_gradients(step, replica):
    rng = np.random.RandomState(100 * step + replica)
    scale = [0.1, 3.0, 0.7, 8.0][step % 4] * (replica + 1)
    return [rng.randn(4, 3) * scale, rng.randn(3) * scale]


INIT = [
    np.random.RandomState(7).randn(4, 3),
    np.random.RandomState(8).randn(3),
]
STEPS = 8


def run_replica_gradients(optimizer_factory, mode="sum"):
    """Applies replica_gradients under STRATEGY; returns weight copies.

    mode "sum": apply_gradients sums; "aggregate_then_skip": the replica
    calls aggregate_gradients, then apply_gradients(skip=True);
    "presummed_skip": every replica passes the already summed gradient with
    skip_gradients_aggregation=True.
    """
    with STRATEGY.scope():
        variables = [
            keras.Variable(w, dtype="float64", name=f"w{i}")
            for i, w in enumerate(INIT)
        ]
        optimizer = optimizer_factory()
        # Built here: Keras 3 cannot build inside the step (see below).
        optimizer.build(variables)

    @tf.function
    def train_step(gradients):
        def replica_step(*grads):
            pairs = list(zip(grads, variables))
            if mode == "sum":
                optimizer.apply_gradients(pairs)
            elif mode == "aggregate_then_skip":
                optimizer.apply_gradients(
                    optimizer.aggregate_gradients(pairs),
                    skip_gradients_aggregation=True,
                )
            else:
                optimizer.apply_gradients(
                    pairs, skip_gradients_aggregation=True
                )

        STRATEGY.run(replica_step, args=tuple(gradients))

    for step in range(STEPS):

        def value_fn(context, step=step, index=0):
            replica = context.replica_id_in_sync_group
            if mode == "presummed_skip":
                grads = [
                    sum(
                        replica_gradients(step, r)[index]
                        for r in range(ARGS.devices)
                    )
                ]
            else:
                grads = [replica_gradients(step, replica)[index]]
            return tf.constant(grads[0], tf.float64)

        gradients = [
            STRATEGY.experimental_distribute_values_from_function(
                lambda ctx, i=i, step=step: value_fn(ctx, step, i)
            )
            for i in range(len(INIT))
        ]
        train_step(gradients)
    return [copies(v) for v in variables]


def reference_weights(**kwargs):
    kwargs.setdefault("weight_decay", 0.004)
    ref = NumpyAdam(INIT, learning_rate=2.0**-5, **kwargs)
    for step in range(STEPS):
        ref.step(
            [
                sum(replica_gradients(step, r)[i] for r in range(ARGS.devices))
                for i in range(2)
            ]
        )
    return [[w] for w in ref.weights]


CLIPS = [{"global_clipnorm": 1.5}, {"clipnorm": 1.0}, {"clipvalue": 0.5}]
for clip in CLIPS if ARGS.full else CLIPS[:1]:
    name = next(iter(clip))
    ours = run_replica_gradients(
        lambda: keras_adamw.AdamW(learning_rate=2.0**-5, **clip)
    )
    RESULTS[f"clip_sum/{name}"] = {
        "max_difference": max_difference(ours, reference_weights(**clip))
    }
    theirs = run_replica_gradients(
        lambda: keras.optimizers.AdamW(learning_rate=2.0**-5, **clip)
    )
    RESULTS[f"keras_clip_sum/{name}"] = {
        "max_difference": max_difference(theirs, reference_weights(**clip))
    }

for mode in ["aggregate_then_skip", "presummed_skip"] if ARGS.full else []:
    ours = run_replica_gradients(
        lambda: keras_adamw.AdamW(learning_rate=2.0**-5), mode=mode
    )
    RESULTS[f"skip/{mode}"] = {
        "max_difference": max_difference(ours, reference_weights())
    }

# Per-variable rules, a weight-decay schedule and both decay modes under
# the strategy, against the float64 reference.
for decay_mode in ["lr_scaled", "independent"] if ARGS.full else []:
    ours = run_replica_gradients(
        lambda: keras_adamw.AdamW(
            learning_rate=2.0**-5,
            # Powers of two: the float32 schedule is exact in float64.
            weight_decay=keras.optimizers.schedules.ExponentialDecay(
                2.0**-7, decay_steps=2, decay_rate=0.5, staircase=True
            ),
            weight_decay_mode=decay_mode,
            variable_rules=[
                ("w1", {"learning_rate_multiplier": 0.5, "beta_2": 0.9}),
                ("w0", {"weight_decay": 0.05}),
            ],
        )
    )
    expected = reference_weights(
        weight_decay=lambda calls: 2.0**-7 * 0.5 ** (calls // 2),
        weight_decay_mode=decay_mode,
        per_variable=[
            {"weight_decay": 0.05},
            {"learning_rate_multiplier": 0.5, "beta_2": 0.9},
        ],
    )
    RESULTS[f"rules/{decay_mode}"] = {
        "max_difference": max_difference(ours, expected)
    }

# Keras 3 cannot build an optimizer in its first apply_gradients inside a
# tf.function under the strategy; record what happens.
try:
    if not ARGS.full:
        raise RuntimeError("not run")
    with STRATEGY.scope():
        model = make_model()
        keras_optimizer = keras.optimizers.AdamW()

    @tf.function
    def keras_step(ids, targets):
        def replica_step(ids, targets):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(ids) - targets))
            gradients = tape.gradient(loss, model.trainable_variables)
            keras_optimizer.apply_gradients(
                zip(gradients, model.trainable_variables)
            )

        STRATEGY.run(replica_step, args=(ids, targets))

    keras_step(tf.constant(IDS[:16]), tf.constant(TARGETS[:16]))
    RESULTS["keras_build_in_step"] = {"placeholder_error": False}
except Exception as error:  # noqa: BLE001 - recording Keras' failure.
    RESULTS["keras_build_in_step"] = {
        "placeholder_error": (
            "You must feed a value for placeholder" in str(error)
        )
    }


# Checkpoints move between MirroredStrategy and one device.
def train_steps(strategy, model, optimizer, batches):
    with strategy.scope():
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(
        IDS[: GLOBAL_BATCH * batches],
        TARGETS[: GLOBAL_BATCH * batches],
        batch_size=GLOBAL_BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
    )


def checkpoint_round_trip(first, second, directory):
    config = {"amsgrad": True, "use_ema": True}
    with first.scope():
        model, optimizer = make_model(), make_optimizer(config)
    train_steps(first, model, optimizer, 2)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        os.path.join(directory, "ckpt")
    )
    with second.scope():
        model2, optimizer2 = make_model(), make_optimizer(config)
        optimizer2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=optimizer2).restore(
        path
    ).assert_existing_objects_matched()
    restored_iterations = int(np.asarray(copies(optimizer2.iterations)[0]))
    train_steps(second, model2, optimizer2, 2)
    # Uninterrupted, on one device.
    model3, optimizer3 = make_model(), make_optimizer(config)
    train_steps(ONE_DEVICE, model3, optimizer3, 2)
    train_steps(ONE_DEVICE, model3, optimizer3, 2)
    resumed = state(model2, optimizer2)
    if second is ONE_DEVICE:
        resumed = [[c[0]] * ARGS.devices for c in resumed]
    return {
        "max_difference": max_difference(
            resumed, [[c[0]] for c in state(model3, optimizer3)]
        ),
        "restored_iterations": restored_iterations,
    }


directory = os.path.dirname(os.path.abspath(ARGS.out)) if ARGS.full else None
if directory:
    RESULTS["checkpoint/mirrored_to_one"] = checkpoint_round_trip(
        STRATEGY, ONE_DEVICE, os.path.join(directory, "m2o")
    )
    RESULTS["checkpoint/one_to_mirrored"] = checkpoint_round_trip(
        ONE_DEVICE, STRATEGY, os.path.join(directory, "o2m")
    )

with open(ARGS.out, "w") as f:
    json.dump(RESULTS, f, indent=1)
print(json.dumps(RESULTS, indent=1))
