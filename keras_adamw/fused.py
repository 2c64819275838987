"""Whether a step runs on the fused CPU kernel: the `fused` argument.

`keras_adamw.execution` asks `use_kernel` before every step; this is the
only place that decides (torch's pattern for `fused=`):

- `fused=False`: never; the step runs as `jit_compile` says (XLA or op
  by op).
- `fused=None` (the default, "auto"): the kernel when it is built (see
  `keras_adamw.kernels`) and the step is supported (below); else as
  `fused=False`.
- `fused=True`: the kernel, or a `ValueError` saying why it cannot run.

Supported: every option of a step (the graph around the kernel clips,
unscales, accumulates, moves the EMA and applies constraints; the kernel
updates variables and slots), variables of float16, bfloat16, float32 or
float64 on CPU devices, with or without a `tf.distribute` strategy whose
variables live on the computing devices (each local CPU device runs the
kernel on its copies). Not supported, so kept on XLA:

- variables on another device than a CPU (GPU, TPU): XLA is the fast
  path there;
- DTensor meshes: the kernel updates one local buffer per variable, and a
  sharded `DVariable` is one variable over many devices; the XLA program
  is laid out by DTensor. A `DVariable` is on a DTensor (`CUSTOM`) device,
  not a CPU, so the device check below keeps it on XLA;
- `ParameterServerStrategy` and `CentralStorageStrategy` (variables away
  from the computation);
- inside a function compiled by XLA (`tf.function(jit_compile=True)`,
  `model.compile(jit_compile=True)`), which cannot contain the op;
- what the kernel does not compute: lazy sparse rows
  (`sparse_updates="lazy"`: the kernel takes dense gradients). It
  computes both weight-decay modes, moments stored in float32 or bfloat16
  (`moment_dtype`) and `kahan_summation`'s compensated store.

Only the whole step (`step.apply_step`) uses the kernel; `update_step`
(one variable) and the EMA overwrite keep their path.
"""

import tensorflow as tf

from keras_adamw import _tf_compat
from keras_adamw import kernels
from keras_adamw import step

_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


# Strategies whose variables live away from the devices that compute (a
# parameter server, a central device): neither the kernel nor an XLA
# program reaches them from the computation.
_REMOTE_VARIABLE_STRATEGIES = (
    tf.distribute.experimental.ParameterServerStrategy,
    tf.distribute.experimental.CentralStorageStrategy,
)


def variables_are_remote(strategy):
    """Whether `strategy` keeps variables away from the devices that
    compute (`ParameterServerStrategy`, `CentralStorageStrategy`); also
    what keeps `keras_adamw.execution` off XLA.

    Example:

    >>> variables_are_remote(tf.distribute.get_strategy())
    False
    """
    return isinstance(strategy, _REMOTE_VARIABLE_STRATEGIES)


def _local_variables(variable):
    """The per-device copies of a (possibly distributed) variable."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy().experimental_local_results(
            variable
        )
    return (variable,)


def _device_type(variable):
    device = variable.device
    if not device:
        # Placed by TensorFlow's default: a CPU unless a GPU is visible.
        return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return tf.DeviceSpec.from_string(device).device_type or "CPU"


def variables_reason(state):
    """Why the kernel cannot update the variables of `state` (their dtypes,
    slots and devices), or `None`. Fixed once the optimizer is built, so
    `keras_adamw.execution` keeps the answer."""
    slot_lists = [state.momentums, state.velocities]
    if state.velocity_hats is not None:
        slot_lists.append(state.velocity_hats)
    for position, variable in enumerate(state.variables):
        name = variable.name
        if variable.dtype not in _DTYPES:
            return f"variable {name!r} has dtype {variable.dtype.name}"
        slot_dtype = state.momentums[position].dtype
        for slots in slot_lists:
            slot = slots[position]
            if slot.dtype != slot_dtype or slot_dtype not in (
                variable.dtype,
                tf.float32,
                tf.bfloat16,
            ):
                return (
                    f"slot {slot.name!r} is {slot.dtype.name}, its variable "
                    f"{name!r} {variable.dtype.name}"
                )
        for copy in _local_variables(variable):
            if _device_type(copy) != "CPU":
                return (
                    f"variable {name!r} is on {copy.device}; the kernel "
                    "runs on CPU only"
                )
    return None


def config_reason(config, gradients=()):
    """Why the kernel cannot compute a step of `config` on `gradients`
    (options it does not implement), or `None`."""
    if config is None:
        return None
    if any(isinstance(g, tf.IndexedSlices) for g in gradients):
        return 'sparse_updates="lazy" (the kernel takes dense gradients)'
    return None


def unsupported_reason(state, config, cache=None, gradients=()):
    """Why the kernel cannot run this step, or `None` if it can.

    Args:
        state: The step's `step.State`.
        config: The step's `step.StepConfig`.
        cache: Optional dict keeping `variables_reason` per set of
            variables (and strategy).

    Example:

    >>> v = tf.Variable([1.0])
    >>> state = step.State(tf.Variable(0, dtype=tf.int64), [v], [v], [v],
    ...                    None, None, None)
    >>> reason = unsupported_reason(state, None)
    >>> reason is None or "kernel" in reason
    True
    """
    reason = kernels.unavailable_reason()
    if reason is not None:
        return f"the fused kernel is not available here: {reason}"
    strategy = tf.distribute.get_strategy()
    if variables_are_remote(strategy):
        return (
            f"under {type(strategy).__name__} the variables live away from "
            "the devices that compute"
        )
    reason = config_reason(config, gradients)
    if reason is not None:
        return f"the fused kernel does not implement {reason}"
    if _tf_compat.in_xla_context():
        return (
            "the step is inside a function compiled by XLA "
            "(jit_compile=True), which cannot run the kernel"
        )
    if cache is None:
        return variables_reason(state)
    key = (id(strategy), tuple(id(v) for v in state.variables))
    if key not in cache:
        cache[key] = variables_reason(state)
    return cache[key]


def use_kernel(fused, function, state, config, cache=None, gradients=()):
    """Whether `function` runs with the fused kernel this step.

    Args:
        fused: The optimizer's `fused` argument: `None`, `True`, `False`.
        function: The step function (only `step.apply_step` can).
        state: The step's `step.State`.
        config: The step's `step.StepConfig`.
        cache: See `unsupported_reason`.
        gradients: The step's gradients.

    Raises:
        ValueError: `fused=True` and the kernel cannot run this step.

    Example:

    >>> use_kernel(False, step.apply_step, None, None)
    False
    """
    if fused is False or function is not step.apply_step:
        return False
    reason = unsupported_reason(state, config, cache, gradients)
    if reason is None:
        return True
    if fused:
        raise ValueError(
            f"fused=True, but the fused CPU kernel cannot run this step: "
            f"{reason}. Use fused=None to fall back to XLA."
        )
    return False
