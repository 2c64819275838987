"""One optimizer call, on explicitly passed variables.

`apply_step` is the program that `jit_compile=True` compiles with XLA: it
unscales the gradients, accumulates them or takes a real step (clip, update
each variable with `adam_math.adam_update`, move the EMA), applies
constraints and counts the call. It reads and writes only the variables in
its `State` argument, never the optimizer, so the same program runs on one
device, on each device of a `tf.distribute` strategy (given that device's
copies), and on DTensor variables.

`update_one` (Keras' `update_step`) and `copy_averages` (Keras'
`finalize_variable_values`) take the same arguments, so
`keras_adamw.execution` runs all three the same way.
"""

import collections

import tensorflow as tf

from keras_adamw import adam_math
from keras_adamw import kernels

State = collections.namedtuple(
    "State",
    [
        "iterations",
        "variables",
        "momentums",
        "velocities",
        "velocity_hats",
        "averages",
        "accumulators",
    ],
)
State.__doc__ = """The variables one step reads and writes.

`variables` and each slot list are aligned: entry `i` belongs to model
variable `i`. `velocity_hats`, `averages` and `accumulators` are `None`
when amsgrad, EMA or gradient accumulation is off.
"""

StepConfig = collections.namedtuple(
    "StepConfig",
    [
        "amsgrad",
        "clipnorm",
        "clipvalue",
        "global_clipnorm",
        "loss_scale_factor",
        "gradient_accumulation_steps",
        "use_ema",
        "ema_momentum",
        "ema_overwrite_frequency",
        "decays",
        "constraints",
        "fused",
    ],
    defaults=(False,),
)
StepConfig.__doc__ = """The Python-level settings of a step.

A namedtuple of plain values, so a `tf.function` retraces exactly when one
of them changes. `decays[i]` says whether variable `i` gets weight decay;
`constraints[i]` is its constraint or `None`. `fused`: update the
variables with the fused CPU kernel (`keras_adamw.kernels`), chosen by
`keras_adamw.fused`.
"""


def _read(variable, dtype):
    return tf.cast(tf.convert_to_tensor(variable), dtype)


def _store(variable, value):
    variable.assign(tf.cast(value, variable.dtype))


def real_iterations(iterations, config):
    """The number of real steps taken: calls // accumulation steps."""
    if config.gradient_accumulation_steps:
        return iterations // config.gradient_accumulation_steps
    return iterations


def apply_step(gradients, indices, state, hyper, config):
    """Applies one call's gradients to `state`.

    Args:
        gradients: Dense gradients of the variables `indices` name.
        indices: Tuple of positions in `state.variables`.
        state: A `State` of `tf.Variable`s.
        hyper: Dict of scalar tensors: `learning_rate`, `beta_1`, `beta_2`,
            `epsilon` and, for AdamW, `weight_decay`.
        config: A `StepConfig`.
    """
    variables = [state.variables[i] for i in indices]
    gradients = [
        tf.cast(g, adam_math.compute_dtype(v.dtype))
        for g, v in zip(gradients, variables)
    ]
    if config.loss_scale_factor is not None:
        gradients = [
            g / adam_math.as_scalar(config.loss_scale_factor, g.dtype)
            for g in gradients
        ]

    steps = config.gradient_accumulation_steps
    if steps:
        accumulators = [state.accumulators[i] for i in indices]

        def update():
            mean = [
                (g + _read(a, g.dtype)) / steps
                for g, a in zip(gradients, accumulators)
            ]
            real_step(mean, indices, state, hyper, config)
            # Keras resets every accumulator, also those without a gradient
            # in this call: a window's leftovers never leak into the next.
            for accumulator in state.accumulators:
                _store(accumulator, tf.zeros_like(accumulator))

        def accumulate():
            for g, a in zip(gradients, accumulators):
                _store(a, _read(a, g.dtype) + g)

        tf.cond(
            tf.equal((state.iterations + 1) % steps, 0), update, accumulate
        )
    else:
        real_step(gradients, indices, state, hyper, config)

    for index, variable in zip(indices, variables):
        constraint = config.constraints[index]
        if constraint is not None:
            _store(variable, constraint(tf.convert_to_tensor(variable)))
    state.iterations.assign_add(1)


def real_step(gradients, indices, state, hyper, config):
    """A real step: clip, update each variable, then move the EMA."""
    gradients = adam_math.clip_gradients(
        gradients, config.clipnorm, config.clipvalue, config.global_clipnorm
    )
    real_index = real_iterations(state.iterations, config)
    if config.fused:
        update_variables_fused(
            gradients, indices, real_index + 1, state, hyper, config
        )
    else:
        for gradient, index in zip(gradients, indices):
            update_variable(
                gradient, index, real_index + 1, state, hyper, config
            )
    if config.use_ema:
        update_moving_average(real_index, state, config)


def update_variable(gradient, index, step, state, hyper, config):
    """Applies `adam_math.adam_update` to variable `index` and its slots."""
    variable = state.variables[index]
    dtype = adam_math.compute_dtype(variable.dtype)
    velocity_hat = state.velocity_hats[index] if config.amsgrad else None
    weight_decay = None
    if config.decays[index] and "weight_decay" in hyper:
        weight_decay = tf.cast(hyper["weight_decay"], dtype)
    new = adam_math.adam_update(
        _read(variable, dtype),
        tf.cast(gradient, dtype),
        _read(state.momentums[index], dtype),
        _read(state.velocities[index], dtype),
        None if velocity_hat is None else _read(velocity_hat, dtype),
        learning_rate=tf.cast(hyper["learning_rate"], dtype),
        beta_1=tf.cast(hyper["beta_1"], dtype),
        beta_2=tf.cast(hyper["beta_2"], dtype),
        epsilon=tf.cast(hyper["epsilon"], dtype),
        step=tf.cast(step, dtype),
        weight_decay=weight_decay,
    )
    _store(variable, new.variable)
    _store(state.momentums[index], new.momentum)
    _store(state.velocities[index], new.velocity)
    if velocity_hat is not None:
        _store(velocity_hat, new.velocity_hat)


def update_variables_fused(gradients, indices, step, state, hyper, config):
    """`update_variable` of every variable `indices` names, as one call of
    the fused CPU kernel. Hyperparameters go in as one value per variable
    (weight decay 0 where `config.decays` says none)."""
    count = len(indices)
    vectors = {
        name: tf.fill([count], tf.cast(hyper[name], tf.float64))
        for name in ("learning_rate", "beta_1", "beta_2", "epsilon")
    }
    decays = tf.constant([float(config.decays[i]) for i in indices])
    vectors["weight_decay"] = tf.cast(decays, tf.float64) * tf.cast(
        hyper.get("weight_decay", 0.0), tf.float64
    )

    def pick(variables):
        return [variables[i] for i in indices] if config.amsgrad else []

    kernels.apply_adam(
        [state.variables[i] for i in indices],
        [state.momentums[i] for i in indices],
        [state.velocities[i] for i in indices],
        pick(state.velocity_hats),
        gradients,
        vectors,
        step,
    )


def update_moving_average(real_index, state, config):
    """Moves the EMA once per real step (the first real step copies) and
    overwrites the variables every `ema_overwrite_frequency` real steps."""
    for variable, average in zip(state.variables, state.averages):
        dtype = adam_math.compute_dtype(variable.dtype)
        momentum = tf.cast(tf.not_equal(real_index, 0), dtype) * (
            adam_math.as_scalar(config.ema_momentum, dtype)
        )
        _store(
            average,
            adam_math.ema_update(
                _read(average, dtype), _read(variable, dtype), momentum
            ),
        )
    frequency = config.ema_overwrite_frequency
    if frequency:
        tf.cond(
            tf.equal((real_index + 1) % frequency, 0),
            lambda: copy_averages(
                (), range(len(state.variables)), state, None, None
            ),
            lambda: None,
        )


def update_one(gradients, indices, state, hyper, config):
    """Applies the whole AdamW step to the one variable `indices[0]`
    (weight decay included), without clipping, EMA or counting the call."""
    (gradient,), (index,) = gradients, indices
    update_variable(
        gradient,
        index,
        real_iterations(state.iterations, config) + 1,
        state,
        hyper,
        config,
    )


def copy_averages(gradients, indices, state, hyper, config):
    """Sets the variables `indices` to their moving averages (`gradients`,
    `hyper` and `config` are unused)."""
    del gradients, hyper, config
    for index in indices:
        _store(
            state.variables[index], tf.convert_to_tensor(state.averages[index])
        )
