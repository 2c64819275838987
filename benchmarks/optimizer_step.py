"""Times one AdamW step of several implementations on the same variables.

Every implementation updates the same set of variables (shapes from
--workload, dtype from --dtype) with the same fixed random gradients,
created once. Each timed step blocks until the update is done, and the
number of steps each optimizer counted is checked against the number run.
The report (stdout, Markdown) gives per implementation the median step
time, its spread (p10-p90 and IQR over --repeats samples), the first call
(tracing and compilation included) and the ratio to
keras_adamw.AdamW(jit_compile=True) called inside a `tf.function` (as
`model.fit` and a `tf.function` train step call it), measured in the same
run; and the floor: the bytes an AdamW step must move (28 per float32
parameter: read variable, gradient, m, v; write variable, m, v) at the
bandwidth that the fastest fused update of one flat buffer of the same size
reaches here (XLA, torch and jax are each tried). The targets of the
project are checked at the end of each table.

TensorFlow, torch and jax each run in their own child process: in one
process their thread pools fight over the 2 cores (torch's fused AdamW was
100x slower after TensorFlow had run). The header says how busy other
processes kept the machine; numbers taken on a busy machine are not
comparable (--wait_idle waits for a quiet one, --retries runs a framework
again when the machine was busy and keeps the quietest attempt).

Usage:

    python benchmarks/optimizer_step.py --workload=bert
    python benchmarks/optimizer_step.py --workload=bert --dtype=bfloat16
    python benchmarks/optimizer_step.py --workload=small
    python benchmarks/optimizer_step.py --workload=sweep
    python benchmarks/optimizer_step.py --implementations=keras_adamw_xla,torch_fused,floor

Implementations that are not installed (torch, jax/optax, tf_keras) are
skipped with a printed reason. `--list` prints the implementation names.
"""

import functools
import gc
import importlib.util
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("workload", "bert", ["bert", "small", "sweep"],
                  "bert: 169 variables, 90.9M parameters (a 7600x768 "
                  "embedding and 12 layers of 4 768x768, a 768x3072 and a "
                  "3072x768 kernel, their biases and 2 768-vectors). small: "
                  "2000 variables of 1024 to 4096 parameters. sweep: "
                  "--sweep_sizes total parameters, each in "
                  "--sweep_variables equal variables.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Dtype of the variables, gradients and optimizer slots.")
flags.DEFINE_integer("repeats", 10, "Timed samples per implementation.",
                     lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one, "
                     "which traces and compiles, is reported separately).",
                     lower_bound=1)
flags.DEFINE_integer("steps_per_repeat", 0,
                     "Steps averaged per sample; 0 picks enough steps for a "
                     "sample to last --min_repeat_ms (at most 200).",
                     lower_bound=0)
flags.DEFINE_float("min_repeat_ms", 20.0,
                   "With --steps_per_repeat=0, the shortest sample.",
                   lower_bound=0.0)
flags.DEFINE_list("implementations", ["all"],
                  "Comma-separated implementation names (see --list), or "
                  "'all'.")
flags.DEFINE_boolean("list", False, "Print the implementation names and "
                     "exit.")
flags.DEFINE_list("sweep_sizes", ["1M", "3M", "10M", "30M", "100M"],
                  "Total parameters of the sweep workload (k/M suffixes).")
flags.DEFINE_integer("sweep_variables", 16,
                     "Variables per size in the sweep workload.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the initial weights and gradients.")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate.")
flags.DEFINE_float("weight_decay", 0.004, "AdamW weight decay.")

BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
REFERENCE = "keras_adamw_xla_tf_function"


class Skip(Exception):
    """An implementation that cannot run here (the message says why)."""


# ----------------------------------------------------------------------
# Workloads.

def bert_shapes():
    """169 variables, 90,872,832 parameters."""
    shapes = [(7600, 768)]
    for _ in range(12):
        for _ in range(4):  # query, key, value, output projections
            shapes += [(768, 768), (768,)]
        shapes += [(768, 3072), (3072,), (3072, 768), (768,)]
        shapes += [(768,), (768,)]  # a layer norm's scale and offset
    return shapes


def small_shapes(count=2000):
    """`count` variables of 1024 to 4096 parameters, a few repeated shapes
    (as in a real model, where layers repeat)."""
    cycle = [(1024,), (32, 48), (2048,), (48, 64), (4096,), (64, 64),
             (1536,), (40, 80)]
    return [cycle[i % len(cycle)] for i in range(count)]


def parse_size(text):
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "kmg" else text
    return int(float(number) * scale)


def sweep_shapes(total, count):
    size = max(1, total // count)
    return [(size,)] * count


def make_data(shapes, seed):
    """Initial weights and fixed gradients, float32 NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = [(0.02 * rng.standard_normal(s, dtype=np.float32))
               for s in shapes]
    grads = [(1e-3 * rng.standard_normal(s, dtype=np.float32))
             for s in shapes]
    return weights, grads


# ----------------------------------------------------------------------
# Implementations. Each `setup_*` returns (step, check, cleanup): `step()`
# runs one step and blocks; `check(total)` returns a string describing how
# many steps the implementation itself counted (or raises); `cleanup()`
# drops references.

def _tf_dtype(dtype):
    import tensorflow as tf

    return {"float32": tf.float32, "bfloat16": tf.bfloat16}[dtype]


def _keras_variables(weights, dtype):
    import keras

    return [keras.Variable(w, dtype=dtype, name=f"w{i}")
            for i, w in enumerate(weights)]


_TF_GRADS = {}


def _tf_grads(grads, dtype):
    """The gradients as TensorFlow tensors, made once per workload and
    shared by the TensorFlow implementations (they are never written)."""
    import tensorflow as tf

    key = (id(grads), dtype)
    if key not in _TF_GRADS:
        _TF_GRADS.clear()
        _TF_GRADS[key] = [tf.cast(tf.constant(g), _tf_dtype(dtype))
                          for g in grads]
    return _TF_GRADS[key]


def _counted(iterations):
    def check(total):
        counted = int(iterations.numpy())
        if counted != total:
            raise RuntimeError(f"ran {total} steps but the optimizer "
                               f"counted {counted}")
        return counted
    return check


def _keras_adamw(weights, grads, dtype, jit_compile, wrap):
    import tensorflow as tf

    try:
        import keras_adamw
    except ImportError as error:
        raise Skip(f"keras_adamw not importable: {error}")
    variables = _keras_variables(weights, dtype)
    gradients = _tf_grads(grads, dtype)
    optimizer = keras_adamw.AdamW(
        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay,
        beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON,
        jit_compile=jit_compile)
    optimizer.build(variables)
    iterations = optimizer.iterations

    if wrap:
        @tf.function
        def apply():
            optimizer.apply(gradients, variables)
    else:
        def apply():
            optimizer.apply(gradients, variables)

    def step():
        apply()
        iterations.numpy()  # blocks (TF runs synchronously anyway)

    return step, _counted(iterations)


def _keras(weights, grads, dtype, jit_compile):
    import keras
    import tensorflow as tf

    variables = _keras_variables(weights, dtype)
    gradients = _tf_grads(grads, dtype)
    optimizer = keras.optimizers.AdamW(
        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay,
        beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON)
    optimizer.build(variables)
    iterations = optimizer.iterations

    @tf.function(jit_compile=jit_compile)
    def apply():
        optimizer.apply(gradients, variables)

    def step():
        apply()
        iterations.numpy()

    return step, _counted(iterations)


def _tf_keras(weights, grads, dtype, wrap):
    if importlib.util.find_spec("tf_keras") is None:
        raise Skip("tf_keras is not installed (pip install tf_keras)")
    import tensorflow as tf
    import tf_keras

    variables = [tf.Variable(tf.cast(w, _tf_dtype(dtype)), name=f"w{i}")
                 for i, w in enumerate(weights)]
    gradients = _tf_grads(grads, dtype)
    optimizer = tf_keras.optimizers.AdamW(
        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay,
        beta_1=BETA_1, beta_2=BETA_2, epsilon=EPSILON, jit_compile=True)
    optimizer.build(variables)
    pairs = list(zip(gradients, variables))

    if wrap:
        @tf.function
        def apply():
            optimizer.apply_gradients(pairs)
    else:
        def apply():
            optimizer.apply_gradients(pairs)

    def step():
        apply()
        optimizer.iterations.numpy()

    return step, _counted(optimizer.iterations)


def _torch(weights, grads, dtype, fused):
    if importlib.util.find_spec("torch") is None:
        raise Skip("torch is not installed (pip install torch)")
    import torch

    torch_dtype = {"float32": torch.float32,
                   "bfloat16": torch.bfloat16}[dtype]
    params = []
    for w, g in zip(weights, grads):
        p = torch.nn.Parameter(torch.from_numpy(w).to(torch_dtype).clone())
        p.grad = torch.from_numpy(g).to(torch_dtype).clone()
        params.append(p)
    kwargs = {"fused": True} if fused else {"foreach": True}
    try:
        optimizer = torch.optim.AdamW(
            params, lr=FLAGS.learning_rate, betas=(BETA_1, BETA_2),
            eps=EPSILON, weight_decay=FLAGS.weight_decay, **kwargs)
        optimizer.step()  # fails here if the dtype is unsupported
    except (RuntimeError, ValueError) as error:
        raise Skip(f"torch.optim.AdamW({kwargs}) with {dtype} params: "
                   f"{error}")
    # Reset: a fresh optimizer, so the step count starts at zero.
    for p, w in zip(params, weights):
        with torch.no_grad():
            p.copy_(torch.from_numpy(w).to(torch_dtype))
    optimizer = torch.optim.AdamW(
        params, lr=FLAGS.learning_rate, betas=(BETA_1, BETA_2),
        eps=EPSILON, weight_decay=FLAGS.weight_decay, **kwargs)

    def step():
        optimizer.step()  # synchronous on CPU

    def check(total):
        counted = int(optimizer.state[params[0]]["step"])
        if counted != total:
            raise RuntimeError(f"ran {total} steps, torch counted {counted}")
        return counted

    return step, check


def _optax(weights, grads, dtype):
    if importlib.util.find_spec("jax") is None:
        raise Skip("jax is not installed (pip install jax optax)")
    if importlib.util.find_spec("optax") is None:
        raise Skip("optax is not installed (pip install optax)")
    import jax
    import jax.numpy as jnp
    import optax

    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    transform = optax.adamw(FLAGS.learning_rate, b1=BETA_1, b2=BETA_2,
                            eps=EPSILON, weight_decay=FLAGS.weight_decay)
    state = {"params": [jnp.asarray(w, dtype=jax_dtype) for w in weights]}
    state["opt"] = transform.init(state["params"])
    gradients = [jnp.asarray(g, dtype=jax_dtype) for g in grads]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, gradients):
        updates, opt_state = transform.update(gradients, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step():
        state["params"], state["opt"] = update(state["params"], state["opt"],
                                               gradients)
        jax.block_until_ready((state["params"], state["opt"]))

    def check(total):
        counts = [leaf for leaf in jax.tree_util.tree_leaves(state["opt"])
                  if getattr(leaf, "ndim", 1) == 0]
        counted = int(counts[0]) if counts else total
        if counted != total:
            raise RuntimeError(f"ran {total} steps, optax counted {counted}")
        return counted

    return step, check


IMPLEMENTATIONS = {
    # name: (label, setup(weights, grads, dtype))
    "keras_adamw_xla_tf_function": (
        "keras_adamw.AdamW(jit_compile=True), in tf.function",
        lambda w, g, d: _keras_adamw(w, g, d, True, wrap=True)),
    "keras_adamw_xla": (
        "keras_adamw.AdamW(jit_compile=True), eager `apply`",
        lambda w, g, d: _keras_adamw(w, g, d, True, wrap=False)),
    "keras_adamw_noxla": (
        "keras_adamw.AdamW(jit_compile=False), eager `apply`",
        lambda w, g, d: _keras_adamw(w, g, d, False, wrap=False)),
    "keras_adamw_noxla_tf_function": (
        "keras_adamw.AdamW(jit_compile=False), in tf.function",
        lambda w, g, d: _keras_adamw(w, g, d, False, wrap=True)),
    "keras": (
        "keras.optimizers.AdamW, in tf.function (no XLA)",
        lambda w, g, d: _keras(w, g, d, jit_compile=False)),
    "keras_xla": (
        "keras.optimizers.AdamW, in tf.function(jit_compile=True)",
        lambda w, g, d: _keras(w, g, d, jit_compile=True)),
    "tf_keras_xla_tf_function": (
        "tf_keras.optimizers.AdamW(jit_compile=True), in tf.function",
        lambda w, g, d: _tf_keras(w, g, d, wrap=True)),
    "tf_keras_xla": (
        "tf_keras.optimizers.AdamW(jit_compile=True), eager",
        lambda w, g, d: _tf_keras(w, g, d, wrap=False)),
    "torch_fused": (
        "torch.optim.AdamW(fused=True), CPU",
        lambda w, g, d: _torch(w, g, d, fused=True)),
    "torch_foreach": (
        "torch.optim.AdamW(foreach=True), CPU",
        lambda w, g, d: _torch(w, g, d, fused=False)),
    "optax": (
        "optax.adamw under jax.jit (buffers donated)",
        lambda w, g, d: _optax(w, g, d)),
}


# ----------------------------------------------------------------------
# The floor: one fused AdamW update over one flat buffer of all parameters.
# Each setup returns (step, check) like the implementations.

def _flat_data(total, seed):
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    w = 0.02 * rng.standard_normal(total, dtype=np.float32)
    g = 1e-3 * rng.standard_normal(total, dtype=np.float32)
    return w, g


def _floor_xla(total, dtype):
    import tensorflow as tf

    w, g = _flat_data(total, FLAGS.seed)
    tf_dtype = _tf_dtype(dtype)
    variable = tf.Variable(tf.cast(w, tf_dtype))
    m = tf.Variable(tf.zeros([total], tf_dtype))
    v = tf.Variable(tf.zeros([total], tf_dtype))
    gradient = tf.cast(tf.constant(g), tf_dtype)
    count = tf.Variable(0.0)
    del w, g

    @tf.function(jit_compile=True)
    def update(gradient):
        t = count + 1.0
        alpha = (FLAGS.learning_rate * tf.sqrt(1.0 - BETA_2 ** t)
                 / (1.0 - BETA_1 ** t))
        x = tf.cast(variable, tf.float32)
        gg = tf.cast(gradient, tf.float32)
        mm = tf.cast(m, tf.float32) * BETA_1 + gg * (1 - BETA_1)
        vv = tf.cast(v, tf.float32) * BETA_2 + gg * gg * (1 - BETA_2)
        x = x * (1 - FLAGS.learning_rate * FLAGS.weight_decay)
        x = x - alpha * mm / (tf.sqrt(vv) + EPSILON)
        m.assign(tf.cast(mm, tf_dtype))
        v.assign(tf.cast(vv, tf_dtype))
        variable.assign(tf.cast(x, tf_dtype))
        count.assign(t)

    def step():
        update(gradient)
        count.numpy()

    return step, lambda total: int(count.numpy())


def _floor_torch(total, dtype):
    if importlib.util.find_spec("torch") is None:
        raise Skip("torch is not installed")
    import torch

    w, g = _flat_data(total, FLAGS.seed)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    p = torch.nn.Parameter(torch.from_numpy(w).to(torch_dtype))
    p.grad = torch.from_numpy(g).to(torch_dtype)
    optimizer = torch.optim.AdamW(
        [p], lr=FLAGS.learning_rate, betas=(BETA_1, BETA_2), eps=EPSILON,
        weight_decay=FLAGS.weight_decay, fused=True)
    return optimizer.step, lambda total: int(optimizer.state[p]["step"])


def _floor_jax(total, dtype):
    if importlib.util.find_spec("jax") is None:
        raise Skip("jax is not installed")
    import jax
    import jax.numpy as jnp

    w, g = _flat_data(total, FLAGS.seed)
    jax_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    state = [jnp.asarray(w, jax_dtype), jnp.zeros(total, jax_dtype),
             jnp.zeros(total, jax_dtype), jnp.float32(0)]
    gradient = jnp.asarray(g, jax_dtype)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def update(x, m, v, t, gradient):
        t = t + 1
        alpha = (FLAGS.learning_rate * jnp.sqrt(1 - BETA_2 ** t)
                 / (1 - BETA_1 ** t))
        gg = gradient.astype(jnp.float32)
        mm = m.astype(jnp.float32) * BETA_1 + gg * (1 - BETA_1)
        vv = v.astype(jnp.float32) * BETA_2 + gg * gg * (1 - BETA_2)
        xx = x.astype(jnp.float32) * (
            1 - FLAGS.learning_rate * FLAGS.weight_decay)
        xx = xx - alpha * mm / (jnp.sqrt(vv) + EPSILON)
        return (xx.astype(x.dtype), mm.astype(m.dtype), vv.astype(v.dtype),
                t)

    def step():
        state[:] = update(*state, gradient)
        jax.block_until_ready(state)

    return step, lambda total: int(state[3])


FLOORS = {
    "floor_xla": ("XLA (tf.function jit_compile=True), one flat tensor",
                  _floor_xla),
    "floor_torch": ("torch fused AdamW, one flat tensor", _floor_torch),
    "floor_jax": ("jax.jit (donated), one flat array", _floor_jax),
}

# Each group runs in its own process: torch's OpenMP threads and
# TensorFlow's thread pools in one process slow torch down by 100x or more
# on this 2-core machine (measured: fused AdamW on 1M parameters 0.7 ms
# alone, 120-180 ms after TensorFlow was imported and used).
GROUPS = {
    "tensorflow": [n for n in IMPLEMENTATIONS if not n.startswith(
        ("torch", "optax"))] + ["floor_xla"],
    "torch": ["torch_fused", "torch_foreach", "floor_torch"],
    "jax": ["optax", "floor_jax"],
}


# ----------------------------------------------------------------------
# Running (in a child process per group) and reporting (in the parent).

def selected_names():
    names = [n.strip() for n in FLAGS.implementations if n.strip()]
    if names == ["all"] or not names:
        names = list(IMPLEMENTATIONS) + ["floor"]
    if "floor" in names:
        names = [n for n in names if n != "floor"] + list(FLOORS)
    unknown = [n for n in names if n not in IMPLEMENTATIONS
               and n not in FLOORS]
    if unknown:
        raise app.UsageError(
            f"Unknown implementation(s) {unknown}; --list shows the names.")
    return names


def release():
    gc.collect()
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session()
    gc.collect()


def workloads():
    """(title, shapes) of each part of the workload."""
    if FLAGS.workload == "bert":
        return [("bert", bert_shapes())]
    if FLAGS.workload == "small":
        return [("small", small_shapes())]
    return [(text, sweep_shapes(parse_size(text), FLAGS.sweep_variables))
            for text in FLAGS.sweep_sizes]


def run(names, shapes, weights, grads, dtype):
    """Times each implementation or floor of `names`; returns
    {name: result dict}. All are set up and warmed up first, then sampled in
    turns (round r starts with implementation r), so that a change in the
    machine's load hits them all alike."""
    import numpy as np

    total = int(sum(int(np.prod(s)) for s in shapes))
    results, live = {}, {}
    for name in names:
        if name in FLOORS:
            label, setup = FLOORS[name]
            make = functools.partial(setup, total, dtype)
        else:
            label, setup = IMPLEMENTATIONS[name]
            make = functools.partial(setup, weights, grads, dtype)
        common.log(f"[{len(shapes)} variables, {total:,} parameters, "
                   f"{dtype}] set up and warm up {name}: {label}")
        try:
            step, check = make()
            first_call, last = common.warm_up(step, FLAGS.warmup)
            steps = common.steps_for(last, FLAGS.steps_per_repeat,
                                     FLAGS.min_repeat_ms / 1000.0)
            live[name] = dict(label=label, step=step, check=check,
                              first_call=first_call, steps=steps, times=[])
            common.log(f"    first call {first_call:.2f} s, then "
                       f"{last * 1e3:.3f} ms")
        except Skip as reason:
            common.log(f"    skipped: {reason}")
            results[name] = {"label": label, "skipped": str(reason)}
        except Exception as error:  # noqa: BLE001 - report and go on.
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            common.log(f"    failed: {message}")
            results[name] = {"label": label, "skipped": "failed: " + message}
        step = check = None
    order = list(live)
    for round_index in range(FLAGS.repeats):
        start = round_index % max(len(order), 1)
        for name in order[start:] + order[:start]:
            entry = live[name]
            entry["times"].append(common.sample(entry["step"],
                                                entry["steps"]))
        common.log(f"    round {round_index + 1}/{FLAGS.repeats} done")
    for name in order:
        entry = live.pop(name)
        try:
            entry["check"](max(FLAGS.warmup, 1)
                           + FLAGS.repeats * entry["steps"])
            results[name] = {"label": entry["label"],
                             "times": entry["times"],
                             "first_call": entry["first_call"],
                             "steps_per_repeat": entry["steps"]}
            common.log(f"{name}: median "
                       f"{sorted(entry['times'])[len(entry['times']) // 2] * 1e3:.3f} ms")
        except Exception as error:  # noqa: BLE001
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            results[name] = {"label": entry["label"],
                             "skipped": "failed check: " + message}
        entry.clear()
    release()
    return {name: results[name] for name in names if name in results}


def child(group, output):
    """Runs the selected names of `group` on every part of the workload and
    writes {part: {name: result}} as JSON to `output`."""
    import json

    if group == "tensorflow":
        import tensorflow  # noqa: F401
    names = [n for n in selected_names() if n in GROUPS[group]]
    results = {}
    for title, shapes in workloads():
        weights, grads = make_data(shapes, FLAGS.seed)
        batches = [names] if FLAGS.interleave else [[n] for n in names]
        results[title] = {}
        for batch in batches:
            results[title].update(run(batch, shapes, weights, grads,
                                      FLAGS.dtype))
        del weights, grads
        _TF_GRADS.clear()
        release()
    with open(output, "w") as f:
        json.dump(results, f)


def run_group(group, isolate):
    """Runs `group` in child processes (one per implementation if
    `isolate`); returns the merged {part: {name: result}}."""
    import json
    import subprocess
    import tempfile

    names = [n for n in selected_names() if n in GROUPS[group]]
    batches = [[n] for n in names] if isolate else [names]
    merged = {}
    for batch in batches:
        if not batch:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            output = os.path.join(tmp, "result.json")
            argv = [sys.executable, os.path.abspath(__file__),
                    f"--child_group={group}", f"--child_output={output}",
                    f"--implementations={','.join(batch)}"]
            for flag in ("workload", "dtype", "repeats", "warmup", "interleave",
                         "steps_per_repeat", "min_repeat_ms", "sweep_sizes",
                         "sweep_variables", "seed", "learning_rate",
                         "weight_decay"):
                value = FLAGS[flag].value
                if isinstance(value, list):
                    value = ",".join(value)
                argv.append(f"--{flag}={value}")
            completed = subprocess.run(argv, check=False)
            if completed.returncode != 0 or not os.path.exists(output):
                reason = (f"failed: the {group} process exited with code "
                          f"{completed.returncode}")
                for title, _ in workloads():
                    for name in batch:
                        label = (FLOORS.get(name) or IMPLEMENTATIONS[name])[0]
                        merged.setdefault(title, {})[name] = {
                            "label": label, "skipped": reason}
                continue
            with open(output) as f:
                for title, results in json.load(f).items():
                    merged.setdefault(title, {}).update(results)
    return merged


def ms(seconds):
    return f"{seconds * 1e3:.3f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def report(shapes, results, dtype, per_parameter):
    """Markdown lines for one part: the table, the floor, the skipped ones.

    Returns:
        (lines, {label: median seconds}) including the floor as a label.
    """
    import numpy as np

    total = int(sum(int(np.prod(s)) for s in shapes))
    itemsize = {"float32": 4, "bfloat16": 2}[dtype]
    bytes_per_step = 7 * itemsize * total
    order = list(IMPLEMENTATIONS) + list(FLOORS)
    timed = {n: (r["label"], common.Timing(r["first_call"], r["times"],
                                           r["steps_per_repeat"]))
             for n, r in sorted(results.items(),
                                key=lambda item: order.index(item[0]))
             if "times" in r}
    skipped = {n: (r["label"], r["skipped"]) for n, r in results.items()
               if "skipped" in r}
    floors = {n: t for n, t in timed.items() if n in FLOORS}
    reference = timed.get(REFERENCE)
    floor = best = None
    if floors:
        best = min(floors, key=lambda n: floors[n][1].median)
        floor = floors[best][1].median
    columns = ["implementation", "median ms", "p10-p90 ms", "IQR ms"]
    if per_parameter:
        columns.append("ns/param")
    columns += ["first call s", "x keras_adamw XLA", "x floor"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    medians = {}
    rows = [(label, t) for n, (label, t) in timed.items() if n not in FLOORS]
    if floor is not None:
        rows.append((f"**floor**: {bytes_per_step / total:.0f} B/param at "
                     f"{bytes_per_step / floor / 1e9:.1f} GB/s "
                     f"({floors[best][0]})", floors[best][1]))
    for label, timing in rows:
        median = timing.median
        medians[label] = median
        cells = [label, ms(median), f"{ms(timing.p10)}-{ms(timing.p90)}",
                 ms(timing.iqr)]
        if per_parameter:
            cells.append(f"{median / total * 1e9:.3f}")
        cells += [
            f"{timing.first_call:.2f}",
            f"{median / reference[1].median:.2f}" if reference else "-",
            f"{median / floor:.2f}" if floor else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if floors:
        lines.append(f"Floor candidates: fused AdamW over one flat buffer of "
                     f"{total:,} {dtype} parameters, "
                     f"{bytes_per_step / 1e6:.1f} MB read+written per step "
                     f"(variable, gradient, m, v read; variable, m, v "
                     f"written):")
        for n, (label, timing) in floors.items():
            lines.append(f"- {label}: {ms(timing.median)} ms, "
                         f"{bytes_per_step / timing.median / 1e9:.1f} GB/s")
        lines.append("")
    for n, (label, reason) in skipped.items():
        lines.append(f"- skipped {label} [{n}]: {reason}")
    if skipped:
        lines.append("")
    lines += targets(timed, floor)
    if floor is not None:
        medians = {("floor (best fused flat update)" if label.startswith(
            "**floor**") else label): m for label, m in medians.items()}
    return lines, medians


TARGETS = [
    # (other implementation or "floor", at least this much faster, wording)
    ("keras", 4.0, "at least 4x faster than keras.optimizers.AdamW without "
     "XLA"),
    ("keras_xla", 1.3, "at least 1.3x faster than keras.optimizers.AdamW "
     "under XLA"),
    ("torch_fused", 1.0, "no slower than torch fused"),
    ("floor", 1 / 1.25, "within 1.25x of the floor"),
]


def targets(timed, floor):
    """Lines checking keras_adamw against the project's speed targets."""
    lines = []
    for ours in ("keras_adamw_xla_tf_function", "keras_adamw_xla"):
        if ours not in timed:
            continue
        mine = timed[ours][1].median
        checks = []
        for other, factor, wording in TARGETS:
            theirs = floor if other == "floor" else (
                timed[other][1].median if other in timed else None)
            if theirs is None:
                continue
            speedup = theirs / mine
            verdict = "met" if speedup >= factor else "MISSED"
            if other == "floor":
                checks.append(f"{wording}: {mine / theirs:.2f}x the floor "
                              f"-> {verdict}")
            else:
                checks.append(f"{wording}: {speedup:.2f}x -> {verdict}")
        if checks:
            lines.append(f"Targets for {timed[ours][0]}:")
            lines += [f"- {check}" for check in checks]
            lines.append("")
    return lines


def describe(shapes, dtype):
    import numpy as np

    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes)
    return (f"{len(shapes)} variables, {total:,} parameters "
            f"({total / 1e6:.1f}M; smallest {min(sizes):,}, largest "
            f"{max(sizes):,}), {dtype}")


flags.DEFINE_enum("isolation", "group", ["group", "implementation"],
                  "Run each framework (TensorFlow, torch, jax) in its own "
                  "process ('group'), or each implementation in its own "
                  "process ('implementation', slower to start).")
flags.DEFINE_boolean("interleave", True,
                     "Within each framework's process, set up all "
                     "implementations first and take their samples in "
                     "turns (needs memory for all at once: about 12 GB for "
                     "bert); --nointerleave runs them one after the other.")
flags.DEFINE_integer("wait_idle", 0,
                     "Wait up to this many seconds for other processes to "
                     "leave the CPUs idle (< 0.2 cores busy) before each "
                     "framework's process starts.", lower_bound=0)
flags.DEFINE_integer("retries", 0,
                     "Run a framework's process again (up to this many "
                     "times) when other processes kept more than "
                     "--max_other_load cores busy during it; the attempt "
                     "with the quietest machine is reported.", lower_bound=0)
flags.DEFINE_float("max_other_load", 0.3,
                   "See --retries.", lower_bound=0.0)
flags.DEFINE_string("child_group", None, "Internal: run this group here.")
flags.DEFINE_string("child_output", None, "Internal: JSON output path.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.list:
        for name, (label, _) in list(IMPLEMENTATIONS.items()) + list(
                FLOORS.items()):
            print(f"{name:32s} {label}")
        print(f"{'floor':32s} all of floor_*")
        return
    selected_names()  # Validates --implementations before any work.
    if FLAGS.child_group:
        child(FLAGS.child_group, FLAGS.child_output)
        return

    lines = common.header(
        f"optimizer_step: one AdamW step, workload={FLAGS.workload}, "
        f"dtype={FLAGS.dtype}",
        ["tensorflow", "keras", "keras_adamw", "tf_keras", "numpy", "torch",
         "jax", "jaxlib", "optax"])
    lines.append(
        f"- timing: per implementation {FLAGS.warmup} warmup steps (the "
        f"first, with tracing/compilation, reported as 'first call'), then "
        f"{FLAGS.repeats} samples, each the mean of "
        + (f"{FLAGS.steps_per_repeat} steps" if FLAGS.steps_per_repeat
           else f"enough steps to last >= {FLAGS.min_repeat_ms:g} ms")
        + "; every step blocks until done; each framework runs in its own "
        f"process (--isolation={FLAGS.isolation}); within a process the "
        "samples of the implementations are "
        + ("taken in turns (--interleave)" if FLAGS.interleave else
           "taken one implementation after the other"))
    lines.append("- 'x keras_adamw XLA' = median / median of "
                 "keras_adamw.AdamW(jit_compile=True) in tf.function (as "
                 "model.fit and a tf.function train step call it; >1: "
                 "slower); 'x floor' = median / floor time")
    lines.append("")
    print("\n".join(lines), flush=True)
    started = time.perf_counter()

    results, loads = {}, []
    for group in GROUPS:
        if not any(n in GROUPS[group] for n in selected_names()):
            continue
        best = None
        for attempt in range(FLAGS.retries + 1):
            if FLAGS.wait_idle:
                common.wait_until_idle(FLAGS.wait_idle)
            load = common.OtherLoad().start()
            part = run_group(group, FLAGS.isolation == "implementation")
            used = load.stop()
            common.log(f"{group}: other processes kept {used:.2f} cores busy")
            if best is None or used < best[0]:
                best = (used, part)
            if used <= FLAGS.max_other_load:
                break
        attempts = f" (best of {attempt + 1} attempts)" if attempt else ""
        loads.append(f"{group} {best[0]:.2f}{attempts}")
        for title, part in best[1].items():
            results.setdefault(title, {}).update(part)
    print("- cores kept busy by other processes while each framework ran "
          "(0 = quiet machine; this machine has "
          f"{os.cpu_count()}): " + ", ".join(loads) + "\n")

    summary, titles = {}, []
    for title, shapes in workloads():
        print(f"## {title}: {describe(shapes, FLAGS.dtype)}\n")
        part_lines, medians = report(shapes, results.get(title, {}),
                                     FLAGS.dtype,
                                     per_parameter=FLAGS.workload == "sweep")
        print("\n".join(part_lines), flush=True)
        total = sum(_size(s) for s in shapes)
        titles.append(title)
        for label, median in medians.items():
            summary.setdefault(label, {})[title] = median / total * 1e9
    if FLAGS.workload == "sweep":
        print("## sweep summary: median ns per parameter per step\n")
        print("| implementation | " + " | ".join(titles) + " |")
        print("|---|" + "---|" * len(titles))
        for label, values in summary.items():
            print(f"| {label} | " + " | ".join(
                f"{values[t]:.3f}" if t in values else "-" for t in titles)
                + " |")
        print()
    print(f"(total wall time {time.perf_counter() - started:.0f} s)")


def _size(shape):
    size = 1
    for dim in shape:
        size *= dim
    return size


if __name__ == "__main__":
    app.run(main)
