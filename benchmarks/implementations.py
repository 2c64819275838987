"""The AdamW implementations optimizer_step.py times, and the floor.

IMPLEMENTATIONS maps a name to (label, setup(weights, grads, config)):
keras_adamw, Keras 3, tf_keras, torch and optax, each updating its own
copy of the workload's variables with the same fixed gradients. FLOORS
maps a name to (label, setup(total, config)): one fused AdamW update over
one flat buffer of all `total` parameters, in XLA, torch and jax. A setup
returns (step, check): `step()` runs one step and blocks until it is done;
`check(total)` returns how many steps the implementation itself counted
(and raises when that is not `total`). A setup raises Skip when the
implementation cannot run here. GROUPS says which framework's process
runs each name.
"""

import functools
import importlib.util
from typing import NamedTuple

BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7


class Config(NamedTuple):
    """What every implementation is set up with."""

    dtype: str  # "float32" or "bfloat16": variables, gradients and slots
    learning_rate: float
    weight_decay: float
    seed: int  # of the floor's flat buffers (the workload has its own)


class Skip(Exception):
    """An implementation that cannot run here (the message says why)."""


def _require(module, hint=""):
    if importlib.util.find_spec(module) is None:
        raise Skip(
            f"{module} is not installed" + (f" ({hint})" if hint else "")
        )


# ----------------------------------------------------------------------
# TensorFlow: keras_adamw, Keras 3 and tf_keras.


def _keras_variables(weights, dtype):
    import keras

    return [
        keras.Variable(w, dtype=dtype, name=f"w{i}")
        for i, w in enumerate(weights)
    ]


def _keras_kwargs(config):
    return dict(
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        beta_1=BETA_1,
        beta_2=BETA_2,
        epsilon=EPSILON,
    )


_TF_GRADS = {}


def _tf_grads(grads, dtype):
    """The gradients as TensorFlow tensors, made once per workload and
    shared by the TensorFlow implementations (they are never written)."""
    import tensorflow as tf

    key = (id(grads), dtype)
    if key not in _TF_GRADS:
        _TF_GRADS.clear()
        _TF_GRADS[key] = [
            tf.cast(tf.constant(g), getattr(tf, dtype)) for g in grads
        ]
    return _TF_GRADS[key]


def forget_gradients():
    """Drops the TensorFlow gradients of the last workload."""
    _TF_GRADS.clear()


def _verified(counted, total, who):
    """`counted` (the steps an optimizer counted) if it is `total`; `who`
    names the counter in the error otherwise."""
    counted = int(counted)
    if counted != total:
        raise RuntimeError(f"ran {total} steps{who} counted {counted}")
    return counted


def _tf_step(apply, iterations, function=None):
    """(step, check) of a TensorFlow optimizer: `apply()`, in a
    `tf.function(**function)` unless `function` is None, then a read of
    `iterations` (which blocks; TF runs synchronously anyway)."""
    import tensorflow as tf

    if function is not None:
        apply = tf.function(apply, **function)

    def step():
        apply()
        iterations.numpy()

    return step, lambda total: _verified(
        iterations.numpy(), total, " but the optimizer"
    )


# Five per-variable rules over the workload's variables (named w0, w1, ...),
# each touching a different hyperparameter: they should cost nothing.
FIVE_RULES = [
    ("w1[0-9]$", {"learning_rate_multiplier": 0.5}),
    ("w2", {"weight_decay": 0.0}),
    ("w3", {"beta_1": 0.8}),
    ("w4", {"epsilon": 1e-6}),
    ("w5", {"beta_2": 0.99, "learning_rate_multiplier": 2.0}),
]


def _keras_adamw(
    weights, grads, config, jit_compile, wrap, rules=None, fused=False
):
    try:
        import keras_adamw
    except ImportError as error:
        raise Skip(f"keras_adamw not importable: {error}")
    variables = _keras_variables(weights, config.dtype)
    gradients = _tf_grads(grads, config.dtype)
    if fused:
        from keras_adamw import kernels

        reason = kernels.unavailable_reason()
        if reason is not None:
            raise Skip(f"the fused kernel is not available: {reason}")
    # fused=False: the XLA (or op-by-op) path, whatever the default picks.
    optimizer = keras_adamw.AdamW(
        **_keras_kwargs(config),
        jit_compile=jit_compile,
        variable_rules=rules,
        fused=fused,
    )
    optimizer.build(variables)

    def apply():
        optimizer.apply(gradients, variables)

    return _tf_step(apply, optimizer.iterations, {} if wrap else None)


def _keras(weights, grads, config, jit_compile):
    import keras

    variables = _keras_variables(weights, config.dtype)
    gradients = _tf_grads(grads, config.dtype)
    optimizer = keras.optimizers.AdamW(**_keras_kwargs(config))
    optimizer.build(variables)

    def apply():
        optimizer.apply(gradients, variables)

    return _tf_step(apply, optimizer.iterations, {"jit_compile": jit_compile})


def _tf_keras(weights, grads, config, wrap):
    _require("tf_keras", "pip install tf_keras")
    import tensorflow as tf
    import tf_keras

    variables = [
        tf.Variable(tf.cast(w, getattr(tf, config.dtype)), name=f"w{i}")
        for i, w in enumerate(weights)
    ]
    gradients = _tf_grads(grads, config.dtype)
    optimizer = tf_keras.optimizers.AdamW(
        **_keras_kwargs(config), jit_compile=True
    )
    optimizer.build(variables)
    pairs = list(zip(gradients, variables))

    def apply():
        optimizer.apply_gradients(pairs)

    return _tf_step(apply, optimizer.iterations, {} if wrap else None)


# ----------------------------------------------------------------------
# torch and optax.


def _torch_adamw(params, config, **kwargs):
    import torch

    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(BETA_1, BETA_2),
        eps=EPSILON,
        weight_decay=config.weight_decay,
        **kwargs,
    )


def _torch(weights, grads, config, fused):
    _require("torch", "pip install torch")
    import torch

    dtype = config.dtype
    torch_dtype = getattr(torch, dtype)
    params = []
    for w, g in zip(weights, grads):
        p = torch.nn.Parameter(torch.from_numpy(w).to(torch_dtype).clone())
        p.grad = torch.from_numpy(g).to(torch_dtype).clone()
        params.append(p)
    kwargs = {"fused": True} if fused else {"foreach": True}
    try:
        optimizer = _torch_adamw(params, config, **kwargs)
        optimizer.step()  # fails here if the dtype is unsupported
    except (RuntimeError, ValueError) as error:
        raise Skip(f"torch.optim.AdamW({kwargs}) with {dtype} params: {error}")
    # Reset: a fresh optimizer, so the step count starts at zero.
    for p, w in zip(params, weights):
        with torch.no_grad():
            p.copy_(torch.from_numpy(w).to(torch_dtype))
    optimizer = _torch_adamw(params, config, **kwargs)

    def step():
        optimizer.step()  # synchronous on CPU

    return step, lambda total: _verified(
        optimizer.state[params[0]]["step"], total, ", torch"
    )


def _optax(weights, grads, config):
    _require("jax", "pip install jax optax")
    _require("optax", "pip install optax")
    import jax
    import jax.numpy as jnp
    import optax

    jax_dtype = getattr(jnp, config.dtype)
    transform = optax.adamw(
        config.learning_rate,
        b1=BETA_1,
        b2=BETA_2,
        eps=EPSILON,
        weight_decay=config.weight_decay,
    )
    state = {"params": [jnp.asarray(w, dtype=jax_dtype) for w in weights]}
    state["opt"] = transform.init(state["params"])
    gradients = [jnp.asarray(g, dtype=jax_dtype) for g in grads]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, gradients):
        updates, opt_state = transform.update(gradients, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step():
        state["params"], state["opt"] = update(
            state["params"], state["opt"], gradients
        )
        jax.block_until_ready((state["params"], state["opt"]))

    def check(total):
        counts = [
            leaf
            for leaf in jax.tree_util.tree_leaves(state["opt"])
            if getattr(leaf, "ndim", 1) == 0
        ]
        return _verified(counts[0] if counts else total, total, ", optax")

    return step, check


IMPLEMENTATIONS = {
    # name: (label, setup(weights, grads, config))
    "keras_adamw_xla_tf_function": (
        "keras_adamw.AdamW(jit_compile=True), in tf.function",
        lambda w, g, c: _keras_adamw(w, g, c, True, wrap=True),
    ),
    "keras_adamw_xla_tf_function_5_rules": (
        "keras_adamw.AdamW(jit_compile=True, 5 rules), in tf.function",
        lambda w, g, c: _keras_adamw(
            w, g, c, True, wrap=True, rules=FIVE_RULES
        ),
    ),
    "keras_adamw_xla": (
        "keras_adamw.AdamW(jit_compile=True), eager `apply`",
        lambda w, g, c: _keras_adamw(w, g, c, True, wrap=False),
    ),
    "keras_adamw_fused_tf_function": (
        "keras_adamw.AdamW(fused=True), the C++ CPU kernel, in tf.function",
        lambda w, g, c: _keras_adamw(w, g, c, False, wrap=True, fused=True),
    ),
    "keras_adamw_fused": (
        "keras_adamw.AdamW(fused=True), the C++ CPU kernel, eager `apply`",
        lambda w, g, c: _keras_adamw(w, g, c, False, wrap=False, fused=True),
    ),
    "keras_adamw_noxla": (
        "keras_adamw.AdamW(jit_compile=False), eager `apply`",
        lambda w, g, c: _keras_adamw(w, g, c, False, wrap=False),
    ),
    "keras_adamw_noxla_tf_function": (
        "keras_adamw.AdamW(jit_compile=False), in tf.function",
        lambda w, g, c: _keras_adamw(w, g, c, False, wrap=True),
    ),
    "keras": (
        "keras.optimizers.AdamW, in tf.function (no XLA)",
        lambda w, g, c: _keras(w, g, c, jit_compile=False),
    ),
    "keras_xla": (
        "keras.optimizers.AdamW, in tf.function(jit_compile=True)",
        lambda w, g, c: _keras(w, g, c, jit_compile=True),
    ),
    "tf_keras_xla_tf_function": (
        "tf_keras.optimizers.AdamW(jit_compile=True), in tf.function",
        lambda w, g, c: _tf_keras(w, g, c, wrap=True),
    ),
    "tf_keras_xla": (
        "tf_keras.optimizers.AdamW(jit_compile=True), eager",
        lambda w, g, c: _tf_keras(w, g, c, wrap=False),
    ),
    "torch_fused": (
        "torch.optim.AdamW(fused=True), CPU",
        lambda w, g, c: _torch(w, g, c, fused=True),
    ),
    "torch_foreach": (
        "torch.optim.AdamW(foreach=True), CPU",
        lambda w, g, c: _torch(w, g, c, fused=False),
    ),
    "optax": ("optax.adamw under jax.jit (buffers donated)", _optax),
}


# ----------------------------------------------------------------------
# The floor: one fused AdamW update over one flat buffer of all parameters.


def _flat_data(total, seed):
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    w = 0.02 * rng.standard_normal(total, dtype=np.float32)
    g = 1e-3 * rng.standard_normal(total, dtype=np.float32)
    return w, g


def _flat_adamw(x, g, m, v, t, sqrt, config):
    """Step `t` of AdamW on float32 arrays (TensorFlow or jax); returns the
    new variable, momentum and velocity."""
    alpha = config.learning_rate * sqrt(1.0 - BETA_2**t) / (1.0 - BETA_1**t)
    m = m * BETA_1 + g * (1 - BETA_1)
    v = v * BETA_2 + g * g * (1 - BETA_2)
    x = x * (1 - config.learning_rate * config.weight_decay)
    return x - alpha * m / (sqrt(v) + EPSILON), m, v


def _floor_xla(total, config):
    import tensorflow as tf

    w, g = _flat_data(total, config.seed)
    tf_dtype = getattr(tf, config.dtype)
    variable = tf.Variable(tf.cast(w, tf_dtype))
    m = tf.Variable(tf.zeros([total], tf_dtype))
    v = tf.Variable(tf.zeros([total], tf_dtype))
    gradient = tf.cast(tf.constant(g), tf_dtype)
    count = tf.Variable(0.0)
    del w, g

    @tf.function(jit_compile=True)
    def update(gradient):
        t = count + 1.0
        x, mm, vv = _flat_adamw(
            tf.cast(variable, tf.float32),
            tf.cast(gradient, tf.float32),
            tf.cast(m, tf.float32),
            tf.cast(v, tf.float32),
            t,
            tf.sqrt,
            config,
        )
        m.assign(tf.cast(mm, tf_dtype))
        v.assign(tf.cast(vv, tf_dtype))
        variable.assign(tf.cast(x, tf_dtype))
        count.assign(t)

    def step():
        update(gradient)
        count.numpy()

    return step, lambda total: int(count.numpy())


def _floor_torch(total, config):
    _require("torch")
    import torch

    w, g = _flat_data(total, config.seed)
    torch_dtype = getattr(torch, config.dtype)
    p = torch.nn.Parameter(torch.from_numpy(w).to(torch_dtype))
    p.grad = torch.from_numpy(g).to(torch_dtype)
    optimizer = _torch_adamw([p], config, fused=True)
    return optimizer.step, lambda total: int(optimizer.state[p]["step"])


def _floor_jax(total, config):
    _require("jax")
    import jax
    import jax.numpy as jnp

    w, g = _flat_data(total, config.seed)
    jax_dtype = getattr(jnp, config.dtype)
    state = [
        jnp.asarray(w, jax_dtype),
        jnp.zeros(total, jax_dtype),
        jnp.zeros(total, jax_dtype),
        jnp.float32(0),
    ]
    gradient = jnp.asarray(g, jax_dtype)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def update(x, m, v, t, gradient):
        t = t + 1
        xx, mm, vv = _flat_adamw(
            x.astype(jnp.float32),
            gradient.astype(jnp.float32),
            m.astype(jnp.float32),
            v.astype(jnp.float32),
            t,
            jnp.sqrt,
            config,
        )
        return (xx.astype(x.dtype), mm.astype(m.dtype), vv.astype(v.dtype), t)

    def step():
        state[:] = update(*state, gradient)
        jax.block_until_ready(state)

    return step, lambda total: int(state[3])


FLOORS = {
    # name: (label, setup(total, config))
    "floor_xla": (
        "XLA (tf.function jit_compile=True), one flat tensor",
        _floor_xla,
    ),
    "floor_torch": ("torch fused AdamW, one flat tensor", _floor_torch),
    "floor_jax": ("jax.jit (donated), one flat array", _floor_jax),
}

# Each group runs in its own process: torch's OpenMP threads and
# TensorFlow's thread pools in one process slow torch down by 100x or more
# on this 2-core machine (measured: fused AdamW on 1M parameters 0.7 ms
# alone, 120-180 ms after TensorFlow was imported and used).
GROUPS = {
    "tensorflow": [
        n for n in IMPLEMENTATIONS if not n.startswith(("torch", "optax"))
    ]
    + ["floor_xla"],
    "torch": ["torch_fused", "torch_foreach", "floor_torch"],
    "jax": ["optax", "floor_jax"],
}


def label(name):
    """The label of an implementation or floor."""
    return (FLOORS.get(name) or IMPLEMENTATIONS[name])[0]


def select(requested):
    """The names `requested` stands for ("all", or names, where "floor" is
    every floor); raises ValueError naming any unknown one."""
    names = [n.strip() for n in requested if n.strip()]
    if names == ["all"] or not names:
        names = list(IMPLEMENTATIONS) + ["floor"]
    if "floor" in names:
        names = [n for n in names if n != "floor"] + list(FLOORS)
    unknown = [
        n for n in names if n not in IMPLEMENTATIONS and n not in FLOORS
    ]
    if unknown:
        raise ValueError(
            f"Unknown implementation(s) {unknown}; --list shows the names."
        )
    return names
