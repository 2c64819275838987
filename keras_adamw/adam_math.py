"""The Adam/AdamW update as small pure tensor functions.

Every execution path of `keras_adamw` (the single-variable `update_step`, the
per-variable loop, the fused XLA program and the DTensor variant) calls these
functions, so the formula lives here and nowhere else. None of them touches a
variable: each takes tensors and returns tensors; the caller assigns.

The formula is Keras 3's (`keras.optimizers.AdamW`), with `t = iterations + 1`:

    alpha    = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    variable = variable - variable * weight_decay * lr        (AdamW only;
               or variable - variable * weight_decay with
               weight_decay_mode="independent")
    momentum = momentum + (gradient - momentum) * (1 - beta_1)
    velocity = velocity + (gradient^2 - velocity) * (1 - beta_2)
    velocity_hat = max(velocity_hat, velocity)                (amsgrad only)
    variable = variable - alpha * momentum / (sqrt(velocity[_hat]) + epsilon)

The operations are written in Keras' order so that float32 results agree
with Keras to rounding.
"""

import collections

import tensorflow as tf

AdamState = collections.namedtuple(
    "AdamState", ["variable", "momentum", "velocity", "velocity_hat"]
)
AdamState.__doc__ = """Values of one model variable and its slots after a step.

`velocity_hat` is `None` unless amsgrad is on.
"""

_LOW_PRECISION = (tf.float16, tf.bfloat16)

# How weight decay is scaled: by the learning rate (Keras, torch, optax) or
# not (Loshchilov & Hutter's decoupled form, tfa).
WEIGHT_DECAY_MODES = ("lr_scaled", "independent")


def as_scalar(value, dtype):
    """Returns `value` (a Python number or tensor) as a scalar of `dtype`.

    `tf.cast(0.9, tf.float64)` would round 0.9 to float32 first; this does not.

    Example:

    >>> float(as_scalar(0.9, tf.float64))
    0.9
    """
    if tf.is_tensor(value):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def compute_dtype(dtype):
    """Returns the dtype the update of a variable of `dtype` is computed in.

    Half-precision variables are updated in float32 and the result is rounded
    once when stored: computing `1 - beta_2` or `gradient**2` in bfloat16
    loses most of the update.

    Example:

    >>> compute_dtype(tf.bfloat16)
    tf.float32
    """
    dtype = tf.as_dtype(dtype)
    return tf.float32 if dtype in _LOW_PRECISION else dtype


def densify(gradient, dtype=None):
    """Returns `gradient` as a dense tensor, summing duplicate sparse indices.

    `tf.IndexedSlices` from `tf.gather` or an `Embedding` repeat an index
    once per occurrence; the dense gradient is their sum. Adam's velocity must
    see `(g1 + g2)**2`, not `g1**2 + g2**2`, so duplicates are summed before
    any other use of the gradient.

    Args:
        gradient: A `tf.Tensor` or `tf.IndexedSlices`.
        dtype: Optional dtype to cast to. Sparse values are cast before they
            are summed, so that a bfloat16 row repeated 1000 times sums to
            1000 in float32 rather than stopping at 256 in bfloat16.

    Example:

    >>> g = tf.IndexedSlices(tf.ones([3, 2]), tf.constant([1, 1, 0]),
    ...                      tf.constant([3, 2]))
    >>> densify(g).numpy().tolist()
    [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]
    """
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values
        if dtype is not None:
            values = tf.cast(values, dtype)
        # convert_to_tensor of IndexedSlices is an unsorted segment sum, which
        # adds the rows of repeated indices.
        gradient = tf.convert_to_tensor(
            tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
        )
    if dtype is not None:
        gradient = tf.cast(gradient, dtype)
    return gradient


def step_size(learning_rate, beta_1, beta_2, step):
    """Returns Adam's bias-corrected step size `alpha`.

    Args:
        learning_rate, beta_1, beta_2: Scalar tensors in the compute dtype.
        step: The 1-based step `t`, a scalar tensor in the compute dtype.

    Example:

    >>> round(float(step_size(1.0, 0.9, 0.999, 1.0)), 5)  # sqrt(0.001) / 0.1
    0.31623
    """
    beta_1_power = tf.pow(beta_1, step)
    beta_2_power = tf.pow(beta_2, step)
    return learning_rate * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)


def decay_weights(variable, learning_rate, weight_decay, mode="lr_scaled"):
    """Returns `variable` after decoupled weight decay: `var -= var*wd*lr`
    (`mode="lr_scaled"`) or `var -= var*wd` (`mode="independent"`).

    Example:

    >>> float(decay_weights(tf.constant(2.0), 0.5, 0.1))
    1.9
    >>> float(decay_weights(tf.constant(2.0), 0.5, 0.1, "independent"))
    1.8
    """
    if mode == "independent":
        return variable - variable * weight_decay
    return variable - variable * weight_decay * learning_rate


def move_toward(average, target, rate):
    """Returns `average + (target - average) * rate`: a moment's step.

    Example:

    >>> float(move_toward(tf.constant(0.0), tf.constant(1.0), 0.1))
    0.1...
    """
    return average + (target - average) * rate


def adam_delta(momentum, velocity, alpha, epsilon):
    """Returns the amount Adam subtracts from a variable.

    Example:

    >>> float(adam_delta(tf.constant(1.0), tf.constant(4.0), 0.5, 0.0))
    0.25
    """
    return (momentum * alpha) / (tf.sqrt(velocity) + epsilon)


Coefficients = collections.namedtuple(
    "Coefficients",
    [
        "learning_rate",
        "alpha",
        "momentum_rate",
        "velocity_rate",
        "epsilon",
        "weight_decay",
    ],
)
Coefficients.__doc__ = """The scalars of one step, shared by every variable
with the same hyperparameters and dtype (see `coefficients`).

`alpha` is `step_size`; `momentum_rate` is `1 - beta_1`, `velocity_rate`
`1 - beta_2`; `weight_decay` is `None` for none.
"""


def coefficients(
    *, learning_rate, beta_1, beta_2, epsilon, step, weight_decay=None
):
    """The scalars of one step (a `Coefficients`), computed once for all
    variables that share them: a step of many variables then builds the
    bias correction once, not once per variable.

    Args: as `adam_update`.

    Example:

    >>> c = coefficients(learning_rate=1.0, beta_1=0.9, beta_2=0.999,
    ...                  epsilon=1e-7, step=1.0)
    >>> round(float(c.alpha), 5), round(float(c.momentum_rate), 5)
    (0.31623, 0.1)
    """
    return Coefficients(
        learning_rate=learning_rate,
        alpha=step_size(learning_rate, beta_1, beta_2, step),
        momentum_rate=1 - beta_1,
        velocity_rate=1 - beta_2,
        epsilon=epsilon,
        weight_decay=weight_decay,
    )


def adam_update(
    variable,
    gradient,
    momentum,
    velocity,
    velocity_hat,
    *,
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    step,
    weight_decay=None,
    weight_decay_mode="lr_scaled",
):
    """One Adam (or AdamW when `weight_decay` is given) step of one variable.

    All tensors must share one floating dtype (see `compute_dtype`); the
    hyperparameters are scalars of that dtype.

    Args:
        variable: Current value of the model variable.
        gradient: Its dense gradient (see `densify`).
        momentum: Current first moment.
        velocity: Current second moment.
        velocity_hat: Running maximum of `velocity` for amsgrad, else `None`.
        learning_rate: The learning rate of this step.
        beta_1: Decay of the first moment.
        beta_2: Decay of the second moment.
        epsilon: Added to `sqrt(velocity)`.
        step: The 1-based step number `t`.
        weight_decay: Decoupled weight decay, or `None` for none.
        weight_decay_mode: `"lr_scaled"` or `"independent"` (see
            `decay_weights`).

    Returns:
        An `AdamState` with the new values.

    Example:

    >>> state = adam_update(tf.constant(1.0), tf.constant(0.5),
    ...                     tf.constant(0.0), tf.constant(0.0), None,
    ...                     learning_rate=0.1, beta_1=0.9, beta_2=0.999,
    ...                     epsilon=0.0, step=1.0)
    >>> round(float(state.variable), 6)  # The first step moves by lr.
    0.9
    """
    return update_with(
        variable,
        gradient,
        momentum,
        velocity,
        velocity_hat,
        coefficients(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            step=step,
            weight_decay=weight_decay,
        ),
        weight_decay_mode,
    )


def update_with(
    variable,
    gradient,
    momentum,
    velocity,
    velocity_hat,
    coefficients,
    weight_decay_mode="lr_scaled",
):
    """`adam_update` with the step's scalars already computed (a
    `Coefficients`); the same operations in the same order.

    Example:

    >>> c = coefficients(learning_rate=0.1, beta_1=0.9, beta_2=0.999,
    ...                  epsilon=0.0, step=1.0)
    >>> state = update_with(tf.constant(1.0), tf.constant(0.5),
    ...                     tf.constant(0.0), tf.constant(0.0), None, c)
    >>> round(float(state.variable), 6)
    0.9
    """
    if coefficients.weight_decay is not None:
        variable = decay_weights(
            variable,
            coefficients.learning_rate,
            coefficients.weight_decay,
            weight_decay_mode,
        )
    momentum = move_toward(momentum, gradient, coefficients.momentum_rate)
    velocity = move_toward(
        velocity, tf.square(gradient), coefficients.velocity_rate
    )
    denominator_velocity = velocity
    if velocity_hat is not None:
        velocity_hat = tf.maximum(velocity_hat, velocity)
        denominator_velocity = velocity_hat
    delta = adam_delta(
        momentum,
        denominator_velocity,
        coefficients.alpha,
        coefficients.epsilon,
    )
    return AdamState(variable - delta, momentum, velocity, velocity_hat)


def clip_by_norm(gradient, clipnorm):
    """Scales `gradient` so that its L2 norm is at most `clipnorm`.

    Example:

    >>> clip_by_norm(tf.constant([3.0, 4.0]), 1.0).numpy().tolist()
    [0.6..., 0.8...]
    """
    return tf.clip_by_norm(gradient, as_scalar(clipnorm, gradient.dtype))


def clip_by_global_norm(gradients, clipnorm):
    """Scales all `gradients` by one factor so that their joint norm is at most
    `clipnorm`. A non-finite norm makes every gradient NaN, as in Keras.

    Example:

    >>> [g.numpy().tolist() for g in clip_by_global_norm(
    ...     [tf.constant([3.0]), tf.constant([4.0])], 1.0)]
    [[0.6...], [0.8...]]
    """
    # Variables of mixed precision: square and sum in the widest dtype among
    # them, so a float64 variable's clip is float64-exact.
    dtype = max((g.dtype for g in gradients), key=lambda d: d.size)
    norm = tf.sqrt(
        tf.add_n(
            [tf.reduce_sum(tf.square(tf.cast(g, dtype))) for g in gradients]
        )
    )
    clipnorm = as_scalar(clipnorm, norm.dtype)
    scale = clipnorm * tf.minimum(1.0 / norm, 1.0 / clipnorm)
    scale = scale + (norm - norm)  # NaN for an infinite or NaN norm.
    return [g * tf.cast(scale, g.dtype) for g in gradients]


def clip_by_value(gradient, clipvalue):
    """Clips each element of `gradient` to `[-clipvalue, clipvalue]`.

    Example:

    >>> clip_by_value(tf.constant([-3.0, 0.5]), 1.0).numpy().tolist()
    [-1.0, 0.5]
    """
    clipvalue = as_scalar(clipvalue, gradient.dtype)
    return tf.clip_by_value(gradient, -clipvalue, clipvalue)


def clip_gradients(
    gradients, clipnorm=None, clipvalue=None, global_clipnorm=None
):
    """Applies the one clip option that is set (if any) to dense `gradients`.

    Example:

    >>> clip_gradients([tf.constant([3.0, 4.0])], clipvalue=1.0)[0].numpy()
    array([1., 1.], dtype=float32)
    """
    if clipnorm:
        return [clip_by_norm(g, clipnorm) for g in gradients]
    if global_clipnorm:
        return clip_by_global_norm(gradients, global_clipnorm)
    if clipvalue:
        return [clip_by_value(g, clipvalue) for g in gradients]
    return list(gradients)


def ema_update(average, variable, momentum):
    """Returns the moving average after one step:
    `momentum * average + (1 - momentum) * variable`.

    Example:

    >>> float(ema_update(tf.constant(1.0), tf.constant(3.0), 0.5))
    2.0
    """
    return momentum * average + (1 - momentum) * variable
