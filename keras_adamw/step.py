"""One optimizer call, on explicitly passed variables.

`apply_step` is the program that `jit_compile=True` compiles with XLA: it
unscales the gradients, accumulates them or takes a real step (clip, update
each variable with `adam_math.update_with`, move the EMA), applies
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
from keras_adamw import lazy_sparse
from keras_adamw import precision

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
        "compensations",
        "skipped_steps",
    ],
    defaults=(None, None),
)
State.__doc__ = """The variables one step reads and writes.

`variables` and each slot list are aligned: entry `i` belongs to model
variable `i`. `velocity_hats`, `averages` and `accumulators` are `None`
when amsgrad, EMA or gradient accumulation is off; `compensations`
without `kahan_summation`, `skipped_steps` without `skip_nonfinite`.
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
        "settings",
        "weight_decay_mode",
        "constraints",
        "ema_first_step_copies",
        "kahan_summation",
        "skip_nonfinite",
        "fused",
    ],
    # Fields added later have defaults, so older callers keep working.
    defaults=(True, False, False, False),
)
StepConfig.__doc__ = """The Python-level settings of a step.

A namedtuple of plain values, so a `tf.function` retraces exactly when one
of them changes. `settings[i]` is variable `i`'s `rules.Settings` (its
learning-rate multiplier and the constants its rules give);
`constraints[i]` is its constraint or `None`. `ema_first_step_copies`:
the first real step sets each average to its variable (Keras 3); `False`
moves averages that start as copies made at build (tf_keras). `fused`:
update the variables with the fused CPU kernel (`keras_adamw.kernels`),
chosen by `keras_adamw.fused`.
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

    With `skip_nonfinite`, a call whose gradients (unscaled, before
    clipping) hold a NaN or Inf only counts itself in `skipped_steps`.

    Args:
        gradients: Dense gradients of the variables `indices` name (or,
            for `sparse_updates="lazy"`, `tf.IndexedSlices` with unique
            indices).
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
            lazy_sparse.map_values(
                lambda x: (
                    x / adam_math.as_scalar(config.loss_scale_factor, x.dtype)
                ),
                g,
            )
            for g in gradients
        ]
    if config.skip_nonfinite:
        precision.skip_if_nonfinite(
            gradients,
            state.skipped_steps,
            lambda: _update(gradients, indices, state, hyper, config),
        )
    else:
        _update(gradients, indices, state, hyper, config)


def _update(gradients, indices, state, hyper, config):
    """`apply_step` once the gradients are unscaled: accumulate or take a
    real step, apply constraints, count the call."""
    variables = [state.variables[i] for i in indices]
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
    gradients = lazy_sparse.clip_gradients(
        lambda dense: adam_math.clip_gradients(
            dense, config.clipnorm, config.clipvalue, config.global_clipnorm
        ),
        gradients,
    )
    real_index = real_iterations(state.iterations, config)
    if config.fused:
        update_variables_fused(
            gradients, indices, real_index + 1, state, hyper, config
        )
    else:
        cache = {}
        for gradient, index in zip(gradients, indices):
            update_variable(
                gradient, index, real_index + 1, state, hyper, config, cache
            )
    if config.use_ema:
        update_moving_average(real_index, state, config)


def _hyperparameter(name, settings, hyper, dtype):
    """A hyperparameter of one variable, in its compute dtype: the
    constant its rules give, else the step's value."""
    override = getattr(settings, name)
    if override is not None:
        return adam_math.as_scalar(override, dtype)
    return tf.cast(hyper[name], dtype)


def _learning_rate(settings, hyper, dtype):
    """The learning rate of one variable, in its compute dtype: the step's,
    times its rules' multiplier."""
    learning_rate = tf.cast(hyper["learning_rate"], dtype)
    if settings.learning_rate_multiplier != 1.0:
        learning_rate = learning_rate * adam_math.as_scalar(
            settings.learning_rate_multiplier, dtype
        )
    return learning_rate


def _weight_decay(settings, hyper, dtype):
    """The weight decay of one variable, or `None` for none: its rules'
    constant (0.0 excludes it), else the optimizer's value if it has one."""
    if settings.weight_decay is not None:
        if settings.weight_decay == 0:
            return None
        return adam_math.as_scalar(settings.weight_decay, dtype)
    if "weight_decay" in hyper:
        return tf.cast(hyper["weight_decay"], dtype)
    return None


def _coefficients(settings, hyper, dtype, step, cache):
    """The step's scalars (`adam_math.Coefficients`) for a variable of
    compute `dtype` whose rules give `settings`: built once per step for
    all variables that share them (`cache`), which keeps the graph of a
    step over thousands of variables small to trace and compile."""
    key = (dtype, settings)
    if key not in cache:
        cache[key] = adam_math.coefficients(
            learning_rate=_learning_rate(settings, hyper, dtype),
            beta_1=_hyperparameter("beta_1", settings, hyper, dtype),
            beta_2=_hyperparameter("beta_2", settings, hyper, dtype),
            epsilon=_hyperparameter("epsilon", settings, hyper, dtype),
            step=tf.cast(step, dtype),
            weight_decay=_weight_decay(settings, hyper, dtype),
        )
    return cache[key]


def update_variable(gradient, index, step, state, hyper, config, cache=None):
    """Applies the Adam/AdamW update (`adam_math.update_with`) to variable
    `index` and its slots, with the hyperparameters its rules give (only to
    the rows of a sparse `gradient`, see `lazy_sparse`), storing the weight
    with its compensation under `kahan_summation`. `cache`: a dict shared
    by the variables of one step (see `_coefficients`)."""
    variable = state.variables[index]
    dtype = adam_math.compute_dtype(variable.dtype)
    velocity_hat = state.velocity_hats[index] if config.amsgrad else None
    read, store = _read, _store
    if lazy_sparse.is_sparse(gradient):
        rows, gradient = gradient.indices, gradient.values

        def read(slot, dtype):
            return tf.cast(lazy_sparse.gather(slot, rows), dtype)

        def store(slot, value):
            lazy_sparse.scatter(slot, rows, value)

    value = read(variable, dtype)
    if config.kahan_summation:
        compensation = state.compensations[index]
        value = precision.compensated(value, read(compensation, dtype))
    new = adam_math.update_with(
        value,
        tf.cast(gradient, dtype),
        read(state.momentums[index], dtype),
        read(state.velocities[index], dtype),
        None if velocity_hat is None else read(velocity_hat, dtype),
        _coefficients(
            config.settings[index],
            hyper,
            dtype,
            step,
            {} if cache is None else cache,
        ),
        config.weight_decay_mode,
    )
    if config.kahan_summation:
        weight, rest = precision.split_compensated(
            new.variable, variable.dtype
        )
        store(compensation, rest)
        store(variable, weight)
    else:
        store(variable, new.variable)
    store(state.momentums[index], new.momentum)
    store(state.velocities[index], new.velocity)
    if velocity_hat is not None:
        store(velocity_hat, new.velocity_hat)


def update_variables_fused(gradients, indices, step, state, hyper, config):
    """`update_variable` of every variable `indices` names, as one call of
    the fused CPU kernel. Each hyperparameter goes in as one float64 vector
    (a few ops, however many variables): its rules' constant where one is
    given, else the step's value; the learning rate as the step's scalar
    and each variable's multiplier."""
    settings = [config.settings[i] for i in indices]

    def vector(name, default):
        overrides = [getattr(own, name) for own in settings]
        default = tf.cast(default, tf.float64)
        if all(value is None for value in overrides):
            return tf.fill([len(settings)], default)
        return tf.where(
            tf.constant([value is not None for value in overrides]),
            tf.constant(
                [0.0 if value is None else value for value in overrides],
                tf.float64,
            ),
            default,
        )

    vectors = {
        "learning_rate_multiplier": tf.constant(
            [own.learning_rate_multiplier for own in settings], tf.float64
        ),
        # A rule's 0.0 excludes a variable, as `_weight_decay` reads it.
        "weight_decay": vector("weight_decay", hyper.get("weight_decay", 0.0)),
    }
    for name in ("beta_1", "beta_2", "epsilon"):
        vectors[name] = vector(name, hyper[name])

    def pick(variables):
        return [variables[i] for i in indices] if config.amsgrad else []

    kernels.apply_adam(
        [state.variables[i] for i in indices],
        [state.momentums[i] for i in indices],
        [state.velocities[i] for i in indices],
        pick(state.velocity_hats),
        gradients,
        hyper["learning_rate"],
        vectors,
        step,
        independent_decay=config.weight_decay_mode == "independent",
        compensations=(
            [state.compensations[i] for i in indices]
            if config.kahan_summation
            else ()
        ),
    )


def update_moving_average(real_index, state, config):
    """Moves the EMA once per real step (the first real step copies, with
    `config.ema_first_step_copies`) and overwrites the variables every
    `ema_overwrite_frequency` real steps."""
    for variable, average in zip(state.variables, state.averages):
        dtype = adam_math.compute_dtype(variable.dtype)
        momentum = adam_math.as_scalar(config.ema_momentum, dtype)
        if config.ema_first_step_copies:
            momentum *= tf.cast(tf.not_equal(real_index, 0), dtype)
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
