"""Precision and robustness options of a step, as small pure functions.

- `moment_dtype`: the dtype momentum, velocity and velocity_hat are stored
  in. The math stays in the variable's compute dtype
  (`adam_math.compute_dtype`: float32, float64 for float64 variables); only
  the store rounds (round to nearest), once per step.
- `kahan_summation`: a bfloat16/float16 variable keeps a compensation slot
  of its own dtype holding what rounding the new weight to that dtype lost;
  the next step adds it back before updating, so updates smaller than half
  an ulp of the weight add up instead of vanishing (AnyPrecisionAdamW's
  scheme, with the sum done in float32).
- `skip_nonfinite`: a step whose gradients (summed across replicas and
  unscaled, before clipping) hold a NaN or Inf changes nothing but the
  `skipped_steps` counter.

Nothing here touches the optimizer; `keras_adamw.step` calls these.
"""

import tensorflow as tf

_LOW_PRECISION = (tf.float16, tf.bfloat16)
SKIPPED_STEPS = "skipped_steps"
COMPENSATION_SLOT = "compensation"


def check_kahan_variables(variables, describe):
    """Raises unless every variable is bfloat16 or float16: a float32 or
    float64 weight loses nothing worth compensating, and a compensation slot
    would double its memory for nothing.

    Args:
        variables: The model variables.
        describe: Function giving a variable's name for the message.

    Example:

    >>> check_kahan_variables([tf.Variable(1.0, name="w")], lambda v: v.name)
    Traceback (most recent call last):
    ...
    ValueError: kahan_summation=True applies to bfloat16 and float16
    variables only; variable 'w:0' is float32. ...
    """
    for variable in variables:
        dtype = tf.as_dtype(variable.dtype)
        if dtype not in _LOW_PRECISION:
            raise ValueError(
                "kahan_summation=True applies to bfloat16 and float16 "
                f"variables only; variable {describe(variable)!r} is "
                f"{dtype.name}. Use kahan_summation=False for an optimizer "
                "of float32/float64 variables."
            )


def compensated(value, compensation):
    """The high-precision value of a compensated weight: `value` plus its
    `compensation`, both already in the compute dtype.

    Example:

    >>> float(compensated(tf.constant(1.0), tf.constant(0.25)))
    1.25
    """
    return value + compensation


def split_compensated(exact, dtype):
    """Splits `exact` (the updated weight in the compute dtype) into the
    weight stored in `dtype` and the compensation: what that rounding lost,
    also in `dtype`.

    Returns:
        `(weight, compensation)`, both of `dtype`.

    Example:

    >>> w, c = split_compensated(tf.constant(1.0 + 2.0**-10), tf.bfloat16)
    >>> float(w), float(c)
    (1.0, 0.0009765625)
    """
    weight = tf.cast(exact, dtype)
    compensation = tf.cast(exact - tf.cast(weight, exact.dtype), dtype)
    return weight, compensation


def all_finite(gradients):
    """A scalar bool tensor: whether every element of every gradient
    (tensors or `tf.IndexedSlices`) is finite.

    Example:

    >>> bool(all_finite([tf.constant([1.0, 2.0]), tf.constant([3.0])]))
    True
    >>> bool(all_finite([tf.constant([1.0, float("nan")])]))
    False
    """
    checks = [tf.reduce_all(tf.math.is_finite(_values(g))) for g in gradients]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def _values(gradient):
    if isinstance(gradient, tf.IndexedSlices):
        return gradient.values
    return gradient


def skip_if_nonfinite(gradients, skipped_steps, update):
    """Runs `update()` when every gradient is finite, else only adds one to
    the `skipped_steps` variable. The decision is one `tf.cond` inside the
    step's program; under a strategy every replica decides on the same
    summed gradients, so all take the same branch.

    Example:

    >>> skipped = tf.Variable(0, dtype=tf.int64)
    >>> skip_if_nonfinite([tf.constant(float("inf"))], skipped, lambda: None)
    >>> int(skipped.numpy())
    1
    """

    def skip():
        skipped_steps.assign_add(tf.ones([], skipped_steps.dtype))

    tf.cond(all_finite(gradients), update, skip)
