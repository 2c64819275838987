"""keras_adamw in DTensor mode on a 2x2 mesh of logical CPU devices."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import keras_adamw
from keras_adamw.dtensor import MeshPlacement
from keras_adamw.dtensor import state_bytes_per_device
from tests.jobs import dtensor_client_job as job
from tests.reference import NumpyAdam
from tests.reference import dense_from_sparse

U = dtensor.UNSHARDED
MESH = dtensor.create_mesh([("batch", 2), ("model", 2)], device_type="CPU")
PLACE = MeshPlacement(MESH)
LAYOUTS = {
    "replicated": [U, U],
    "rows": ["model", U],
    "columns": [U, "model"],
    "both": ["batch", "model"],
    "scalar": [],
}
SHAPES = {
    "replicated": (4, 6),
    "rows": (4, 6),
    "columns": (4, 6),
    "both": (4, 6),
    "scalar": (),
}
NAMES = list(LAYOUTS)
STEPS = 6


def layout(name):
    return dtensor.Layout(LAYOUTS[name], MESH)


def make_problem(seed=0):
    rng = np.random.RandomState(seed)
    init = {n: rng.randn(*SHAPES[n]) for n in NAMES}
    grads = [
        [rng.randn(*SHAPES[n]) * [0.1, 2.0, 0.5][s % 3] for n in NAMES]
        for s in range(STEPS)
    ]
    return init, grads


def make_dvariables(init, dtype):
    return [
        PLACE.make_variable(
            tf.constant(init[n], dtype), layout(n), name=n, trainable=True
        )
        for n in NAMES
    ]


def on_mesh(value, name, dtype):
    return PLACE.to_mesh(tf.constant(value, dtype), layout(name))


def train(optimizer, variables, grads, dtype, jit_function=True):
    """Applies `grads` with `apply_gradients` inside a tf.function."""

    @tf.function
    def apply(gradients):
        optimizer.apply_gradients(zip(gradients, variables))

    for step_grads in grads:
        apply([on_mesh(g, n, dtype) for g, n in zip(step_grads, NAMES)])
    return [PLACE.numpy(v) for v in variables]


CONFIGS = {
    "dense": {},
    "amsgrad": {"amsgrad": True},
    "ema": {"use_ema": True, "ema_momentum": 0.8},
    "global_clipnorm": {"global_clipnorm": 1.0},
    "accumulation": {"gradient_accumulation_steps": 2},
    "schedule": {
        "learning_rate": keras.optimizers.schedules.ExponentialDecay(
            2.0**-6, decay_steps=2, decay_rate=0.5
        )
    },
    "everything": {
        "amsgrad": True,
        "use_ema": True,
        "ema_momentum": 0.8,
        "global_clipnorm": 1.0,
        "gradient_accumulation_steps": 2,
    },
}


def test_slots_are_dvariables_with_their_variables_layout():
    init, _ = make_problem()
    variables = make_dvariables(init, tf.float32)
    optimizer = keras_adamw.dtensor.AdamW(
        MESH, amsgrad=True, use_ema=True, gradient_accumulation_steps=2
    )
    optimizer.build(variables)
    slot_lists = {
        "momentum": optimizer._momentums,
        "velocity": optimizer._velocities,
        "velocity_hat": optimizer._velocity_hats,
        "average": optimizer._model_variables_moving_average,
        "gradient_accumulator": optimizer._accumulated_gradients,
    }
    # Optimizer variables are keras.Variables, each holding a DVariable.
    for slot_name, slots in slot_lists.items():
        for variable, slot, name in zip(variables, slots, NAMES):
            assert isinstance(slot.value, dtensor.DVariable), slot_name
            assert dtensor.fetch_layout(slot.value) == layout(name), (
                slot_name,
                name,
            )
            # The core's slot names: {variable name}_{slot}.
            assert slot.path == f"{optimizer.name}/{name}_0_{slot_name}"
            assert slot.dtype == variable.dtype
    for scalar in [optimizer._iterations, optimizer._learning_rate]:
        assert isinstance(scalar.value, dtensor.DVariable)
        assert dtensor.fetch_layout(scalar.value) == (
            dtensor.Layout.replicated(MESH, 0)
        )
    # 2 scalars + 5 slots per variable, all on the mesh.
    assert len(optimizer.variables) == 2 + 5 * len(variables)
    assert all(
        isinstance(v.value, dtensor.DVariable) for v in optimizer.variables
    )
    # keras_adamw.AdamW(mesh=...) is the same mode.
    core = keras_adamw.AdamW(mesh=MESH)
    core.build(variables)
    assert [dtensor.fetch_layout(s.value) for s in core._momentums] == [
        layout(n) for n in NAMES
    ]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("jit_compile", [True, False])
def test_numbers_equal_the_core_optimizer(config, jit_compile):
    init, grads = make_problem()
    kwargs = CONFIGS[config]
    ours = train(
        keras_adamw.dtensor.AdamW(MESH, jit_compile=jit_compile, **kwargs),
        make_dvariables(init, tf.float32),
        grads,
        tf.float32,
    )
    core = keras_adamw.AdamW(**kwargs)
    core_variables = [keras.Variable(init[n], dtype="float32") for n in NAMES]
    for step_grads in grads:
        core.apply(
            [tf.constant(g, tf.float32) for g in step_grads], core_variables
        )
    for a, b, name in zip(ours, core_variables, NAMES):
        np.testing.assert_allclose(
            a, b.numpy(), rtol=1e-6, atol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("config", ["dense", "everything"])
@pytest.mark.parametrize("jit_compile", [True, False])
def test_float64_equals_numpy_reference(config, jit_compile):
    init, grads = make_problem(seed=1)
    kwargs = dict(CONFIGS[config], learning_rate=2.0**-6)
    optimizer = keras_adamw.dtensor.AdamW(
        MESH, jit_compile=jit_compile, **kwargs
    )
    ours = train(
        optimizer, make_dvariables(init, tf.float64), grads, tf.float64
    )
    if kwargs.get("use_ema"):
        optimizer.finalize_variable_values(optimizer._trainable_variables)
        ours = [PLACE.numpy(v) for v in optimizer._trainable_variables]
    ref = NumpyAdam([init[n] for n in NAMES], weight_decay=0.004, **kwargs)
    for step_grads in grads:
        ref.step(step_grads)
    expected = ref.averages if kwargs.get("use_ema") else ref.weights
    for a, e, name in zip(ours, expected, NAMES):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=name)
    assert max(np.abs(a - init[n]).max() for a, n in zip(ours, NAMES)) > 1e-3


MESH_RULES = [
    ("^rows$", {"learning_rate_multiplier": 0.5}),
    ("columns", {"weight_decay": 0.0, "beta_1": 0.8}),
    ("both", {"epsilon": 1e-3, "beta_2": 0.99, "weight_decay": 0.02}),
]
MESH_PER_VARIABLE = {
    "rows": {"learning_rate_multiplier": 0.5},
    "columns": {"weight_decay": 0.0, "beta_1": 0.8},
    "both": {"epsilon": 1e-3, "beta_2": 0.99, "weight_decay": 0.02},
}


@pytest.mark.parametrize("jit_compile", [True, False])
def test_variable_rules_on_the_mesh_equal_numpy_reference(jit_compile):
    # Per-variable rules, a weight-decay schedule and the independent
    # decay mode, on sharded float64 DVariables.
    init, grads = make_problem(seed=2)
    optimizer = keras_adamw.dtensor.AdamW(
        MESH,
        jit_compile=jit_compile,
        learning_rate=2.0**-6,
        # Powers of two: the float32 schedule is exact in float64.
        weight_decay=keras.optimizers.schedules.ExponentialDecay(
            2.0**-7, decay_steps=2, decay_rate=0.5, staircase=True
        ),
        weight_decay_mode="independent",
        variable_rules=MESH_RULES,
    )
    ours = train(
        optimizer, make_dvariables(init, tf.float64), grads, tf.float64
    )
    ref = NumpyAdam(
        [init[n] for n in NAMES],
        learning_rate=2.0**-6,
        weight_decay=lambda calls: 2.0**-7 * 0.5 ** (calls // 2),
        weight_decay_mode="independent",
        per_variable=[MESH_PER_VARIABLE.get(n) for n in NAMES],
    )
    for step_grads in grads:
        ref.step(step_grads)
    for a, e, name in zip(ours, ref.weights, NAMES):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=name)
    rows = {row.path: row for row in optimizer.explain()}
    assert rows["columns"].layout == "[unsharded, model]"
    assert rows["columns"].weight_decay == 0.0
    assert rows["rows"].learning_rate_multiplier == 0.5


@pytest.mark.parametrize("jit_compile", [True, False])
def test_sparse_gradients_are_densified_on_the_mesh(jit_compile):
    # A gather from a column-sharded table, ids repeating, in a tf.function.
    rng = np.random.RandomState(3)
    table_init = rng.randn(6, 4)
    ids = np.array([1, 2, 2, 5, 1, 1], np.int32)
    targets = rng.randn(6, 4)
    table = PLACE.make_variable(
        tf.constant(table_init, tf.float32),
        dtensor.Layout([U, "model"], MESH),
        name="table",
        trainable=True,
    )
    optimizer = keras_adamw.dtensor.AdamW(MESH, jit_compile=jit_compile)
    ids_on_mesh = PLACE.to_mesh(ids, PLACE.replicated(1))
    targets_on_mesh = PLACE.to_mesh(
        tf.constant(targets, tf.float32), dtensor.Layout([U, "model"], MESH)
    )

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            rows = tf.gather(table, ids_on_mesh)
            loss = tf.reduce_sum(tf.square(rows - targets_on_mesh))
        (gradient,) = tape.gradient(loss, [table])
        optimizer.apply_gradients([(gradient, table)])
        return isinstance(gradient, tf.IndexedSlices)

    ref = NumpyAdam(
        [table_init], learning_rate=float(np.float32(1e-3)), weight_decay=0.004
    )
    for _ in range(4):
        current = ref.weights[0]
        values = 2 * (current[ids] - targets)
        ref.step([dense_from_sparse(ids, values, 6)])
        step()
    np.testing.assert_allclose(
        PLACE.numpy(table), ref.weights[0], rtol=1e-5, atol=1e-6
    )


def test_variables_off_the_mesh_are_rejected():
    optimizer = keras_adamw.dtensor.AdamW(MESH)
    regular = tf.Variable(tf.ones([4, 6]), name="regular")
    with pytest.raises(ValueError, match="'regular:0' is a ResourceVariable"):
        optimizer.apply([tf.ones([4, 6])], [regular])
    assert not optimizer.built
    other_mesh = dtensor.create_mesh([("x", 4)], device_type="CPU")
    elsewhere = MeshPlacement(other_mesh).make_variable(
        tf.ones([4]), dtensor.Layout(["x"], other_mesh), name="elsewhere"
    )
    with pytest.raises(ValueError, match="'elsewhere:0' lives on mesh"):
        optimizer.apply([tf.ones([4])], [elsewhere])
    assert int(PLACE.numpy(optimizer.iterations)) == 0
    with pytest.raises(TypeError, match="mesh"):
        keras_adamw.dtensor.AdamW("not a mesh")
    with pytest.raises(ValueError, match="state_sharding_axis='data'"):
        keras_adamw.dtensor.AdamW(MESH, state_sharding_axis="data")


class MLP(tf.Module):
    """The multi-client job's two-layer MLP, its weights DVariables with the
    job's layouts (or plain variables)."""

    def __init__(self, placement=None):
        if placement is None:
            self.weights = [tf.Variable(job.INIT[k], name=k) for k in job.INIT]
        else:
            self.weights = [
                placement.make_variable(
                    tf.constant(job.INIT[k]),
                    dtensor.Layout(job.LAYOUTS[k], MESH),
                    name=k,
                    trainable=True,
                )
                for k in job.INIT
            ]

    def __call__(self, x):
        return job.mlp(self.weights, x)


def make_data():
    """The multi-client job's first 8 global batches, one after another."""
    x, y = zip(*job.global_batches(8))
    return np.concatenate(x), np.concatenate(y)


def train_mlp(model, optimizer, x, y, to_mesh=None, epochs=3):
    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        gradients = tape.gradient(loss, model.weights)
        optimizer.apply_gradients(zip(gradients, model.weights))
        return loss

    losses = []
    for _ in range(epochs):
        for i in range(0, len(x), 16):
            xb, yb = x[i : i + 16], y[i : i + 16]
            if to_mesh is not None:
                xb, yb = to_mesh(xb), to_mesh(yb)
            losses.append(
                float(step(xb, yb))
                if to_mesh is None
                else float(PLACE.numpy(step(xb, yb)))
            )
    return losses


def batch_sharded(array):
    return PLACE.to_mesh(array, dtensor.Layout(["batch", U], MESH))


def test_mlp_on_batch_sharded_data_equals_one_device():
    x, y = make_data()
    model = MLP(PLACE)
    optimizer = keras_adamw.dtensor.AdamW(MESH, learning_rate=1e-2)
    losses = train_mlp(model, optimizer, x, y, to_mesh=batch_sharded)
    assert losses[-1] < 0.5 * losses[0]
    single = MLP()
    train_mlp(single, keras_adamw.AdamW(learning_rate=1e-2), x, y)
    for a, b in zip(model.weights, single.weights):
        np.testing.assert_allclose(
            PLACE.numpy(a), b.numpy(), rtol=1e-5, atol=1e-5
        )


def optimizer_arrays(optimizer):
    return [PLACE.numpy(v) for v in optimizer.variables]


@pytest.mark.parametrize("state_sharding_axis", [None, "batch"])
def test_checkpoint_restores_sharded_state_and_resumes(
    tmp_path, state_sharding_axis
):
    x, y = make_data()
    kwargs = dict(
        learning_rate=1e-2,
        amsgrad=True,
        use_ema=True,
        state_sharding_axis=state_sharding_axis,
    )
    model = MLP(PLACE)
    optimizer = keras_adamw.dtensor.AdamW(MESH, **kwargs)
    train_mlp(model, optimizer, x, y, to_mesh=batch_sharded, epochs=1)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        str(tmp_path / "ckpt")
    )
    layouts = [dtensor.fetch_layout(v.value) for v in optimizer.variables]

    restored_model = MLP(PLACE)
    restored = keras_adamw.dtensor.AdamW(MESH, **kwargs)
    restored.build(restored_model.weights)
    tf.train.Checkpoint(model=restored_model, optimizer=restored).restore(
        path
    ).assert_existing_objects_matched()
    assert [dtensor.fetch_layout(v.value) for v in restored.variables] == (
        layouts
    )
    for a, b in zip(optimizer_arrays(restored), optimizer_arrays(optimizer)):
        np.testing.assert_array_equal(a, b)

    train_mlp(model, optimizer, x, y, to_mesh=batch_sharded, epochs=1)
    train_mlp(restored_model, restored, x, y, to_mesh=batch_sharded, epochs=1)
    for a, b in zip(restored_model.weights, model.weights):
        np.testing.assert_array_equal(PLACE.numpy(a), PLACE.numpy(b))


def test_save_and_load_own_variables_on_sharded_slots():
    x, y = make_data()
    model = MLP(PLACE)
    optimizer = keras_adamw.dtensor.AdamW(
        MESH, learning_rate=1e-2, state_sharding_axis="batch"
    )
    train_mlp(model, optimizer, x, y, to_mesh=batch_sharded, epochs=1)
    store = {}
    optimizer.save_own_variables(store)
    assert len(store) == len(optimizer.variables)

    fresh = keras_adamw.dtensor.AdamW(
        MESH, learning_rate=1e-2, state_sharding_axis="batch"
    )
    fresh.build(MLP(PLACE).weights)
    fresh.load_own_variables(store)
    for a, b in zip(optimizer_arrays(fresh), optimizer_arrays(optimizer)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh.variables, optimizer.variables):
        assert dtensor.fetch_layout(a.value) == dtensor.fetch_layout(b.value)
    assert int(store["0"]) == 8


def test_zero_sharding_shrinks_per_device_state_and_keeps_numbers():
    x, y = make_data()
    results = {}
    for axis in [None, "batch"]:
        model = MLP(PLACE)
        optimizer = keras_adamw.dtensor.AdamW(
            MESH, learning_rate=1e-2, amsgrad=True, state_sharding_axis=axis
        )
        train_mlp(model, optimizer, x, y, to_mesh=batch_sharded, epochs=1)
        results[axis] = (model, optimizer)
    plain_model, plain = results[None]
    sharded_model, sharded = results["batch"]
    # Per device, floats in one slot of w1 [8,16 | -,model], b1 [16 | model],
    # w2 [16,4 | model,-], b2 [4 | -]. Sharding along "batch" halves each,
    # except b1, whose one dimension is already sharded (DTensor shards a
    # dimension along one mesh axis only).
    plain_floats = 8 * 16 // 2 + 16 // 2 + 16 * 4 // 2 + 4
    sharded_floats = 8 * 16 // 4 + 16 // 2 + 16 * 4 // 4 + 4 // 2
    scalar_bytes = 8 + 4  # int64 step counter, float32 learning rate.
    slots = 3  # momentum, velocity, velocity_hat.
    assert (
        state_bytes_per_device(plain)
        == [scalar_bytes + slots * 4 * plain_floats] * 4
    )
    assert (
        state_bytes_per_device(sharded)
        == [scalar_bytes + slots * 4 * sharded_floats] * 4
    )
    for a, b in zip(plain_model.weights, sharded_model.weights):
        np.testing.assert_allclose(
            PLACE.numpy(a), PLACE.numpy(b), rtol=1e-6, atol=1e-7
        )
    assert [
        dtensor.fetch_layout(m.value).sharding_specs
        for m in sharded._momentums
    ] == [["batch", "model"], ["model"], ["model", "batch"], ["batch"]]


def test_all_reduce_combining_must_be_off(monkeypatch):
    # MeshPlacement sets the flag to "0" only when it is unset; with the
    # pass on, DTensor may move a variable's read before an earlier write.
    monkeypatch.setenv("DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION", "1")
    with pytest.raises(ValueError, match="COMBINE_ALL_REDUCES.*'1'"):
        MeshPlacement(MESH)


# Run in fresh processes, as a user's program: the variable unset.
_FLAG_PROGRAM = """if True:
    import os, sys
    from tests import environment
    environment.set_defaults()
    environment.use_logical_cpus(4)
    import tensorflow as tf
    from tensorflow.experimental import dtensor
    import keras_adamw
    FLAG = "DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION"
    print("after import:", os.environ.get(FLAG))
    mesh = dtensor.create_mesh([("batch", 2), ("model", 2)],
                               device_type="CPU")
    if sys.argv[1] == "after_dtensor_started":
        dtensor.copy_to_mesh(tf.zeros([2]),
                             dtensor.Layout.replicated(mesh, 1))
    try:
        keras_adamw.dtensor.AdamW(mesh)
    except ValueError as error:
        print("ValueError:", error)
    print("after optimizer:", os.environ.get(FLAG))
"""


@pytest.mark.parametrize(
    "when", ["before_dtensor_starts", "after_dtensor_started"]
)
def test_the_first_mesh_placement_turns_all_reduce_combining_off(when):
    """Importing keras_adamw sets nothing; the first MeshPlacement (here
    made by the optimizer) sets the variable to "0" while DTensor has not
    started, and raises once it has (DTensor read it unset)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DTENSOR_ENABLE_COMBINE_ALL_REDUCES_OPTIMIZATION"
    }
    result = subprocess.run(
        [sys.executable, "-c", _FLAG_PROGRAM, when],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after import: None" in result.stdout, result.stdout
    if when == "before_dtensor_starts":
        assert "after optimizer: 0" in result.stdout, result.stdout
        assert "ValueError" not in result.stdout, result.stdout
    else:
        assert "after DTensor started" in result.stdout, result.stdout
        assert "after optimizer: None" in result.stdout, result.stdout
