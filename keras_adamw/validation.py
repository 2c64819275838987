"""Checks of arguments and hyperparameter values, and how variables are
named in messages.

Each check raises `TypeError` (wrong kind of value) or `ValueError` (a value
out of range) naming the argument and the value received. The optimizer
runs them before it changes any state. The checks of one call's gradients
and variables are in `keras_adamw.call_checks`.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf


def _is_real_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _constant_value(name, value):
    """Returns `value` as a Python float if it is a number or an eager scalar
    tensor, `None` if it is a callable or symbolic tensor (checked later)."""
    if _is_real_number(value) or isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)):
        if len(value.shape) != 0:
            raise ValueError(
                f"Argument `{name}` must be a scalar. Received: {name}={value}"
            )
        if not tf.as_dtype(value.dtype).is_floating and not (
            tf.as_dtype(value.dtype).is_integer
        ):
            raise TypeError(
                f"Argument `{name}` must be a real number. Received: "
                f"{name}={value!r}"
            )
        if isinstance(value, tf.Tensor) and not tf.executing_eagerly():
            return None
        return float(np.asarray(value))
    return None


def check_number(
    name,
    value,
    *,
    low=None,
    high=None,
    high_open=False,
    allow_callable=False,
    allow_tensor=False,
):
    """Checks that `value` is a finite real number in `[low, high]`.

    Args:
        name: The argument's name, used in the message.
        value: The value received.
        low: Smallest allowed value, or `None`.
        high: Largest allowed value, or `None`.
        high_open: If true, `high` itself is not allowed.
        allow_callable: Accept a zero-argument callable (checked when used).
        allow_tensor: Accept a scalar tensor.

    Returns:
        `value` as a float, or unchanged when it is a callable or tensor.

    Example:

    >>> check_number("epsilon", 1e-7, low=0.0)
    1e-07
    """
    if (
        allow_callable
        and callable(value)
        and not isinstance(value, (tf.Tensor, tf.Variable))
    ):
        return value
    is_tensor = isinstance(value, (tf.Tensor, tf.Variable, np.ndarray))
    if is_tensor and not allow_tensor:
        raise TypeError(
            f"Argument `{name}` must be a float. Received: {name}={value!r}"
        )
    number = _constant_value(name, value)
    if number is None and not is_tensor:
        raise TypeError(
            f"Argument `{name}` must be a real number"
            + (", a tensor or a callable" if allow_callable else "")
            + f". Received: {name}={value!r} of type {type(value).__name__}"
        )
    if number is not None:
        interval = (
            f"[{low if low is not None else '-inf'}, "
            f"{high if high is not None else 'inf'}"
            + (")" if high_open else "]")
        )
        if (
            not math.isfinite(number)
            or (low is not None and number < low)
            or (
                high is not None
                and (number > high or (high_open and number == high))
            )
        ):
            raise ValueError(
                f"Argument `{name}` must be a finite number in {interval}. "
                f"Received: {name}={value}"
            )
    if is_tensor:
        return value
    return number


def check_tensor_in_range(
    name, value, *, low=None, high=None, high_open=False
):
    """Checks a hyperparameter computed at run time (by a callable or a
    schedule). A value known now (eager, or constant) raises `ValueError`
    at once; a symbolic one gets an assertion that fails when it runs,
    before the update it feeds.

    Returns:
        `value`, after the assertion when there is one.

    Example:

    >>> float(check_tensor_in_range("beta_1", tf.constant(0.9), low=0.0,
    ...                             high=1.0, high_open=True))
    0.9...
    """
    static = tf.get_static_value(value)
    if static is not None:
        check_number(
            name, float(static), low=low, high=high, high_open=high_open
        )
        return value
    message = f"`{name}` computed at run time is out of range"
    checks = [tf.debugging.assert_all_finite(value, message)]
    if low is not None:
        checks.append(
            tf.debugging.assert_greater_equal(
                value, tf.cast(low, value.dtype), message=message
            )
        )
    if high is not None:
        compare = (
            tf.debugging.assert_less
            if high_open
            else tf.debugging.assert_less_equal
        )
        checks.append(
            compare(value, tf.cast(high, value.dtype), message=message)
        )
    with tf.control_dependencies(checks):
        return tf.identity(value)


def check_learning_rate(value):
    """Checks a learning rate: a non-negative number, a scalar tensor, a
    `tf.Variable` (kept as it is), a `LearningRateSchedule` or a
    zero-argument callable.

    Example:

    >>> check_learning_rate(1e-3)
    0.001
    """
    import keras

    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, tf.Variable):
        # The optimizer uses the variable itself: a later `assign` counts.
        if value.shape.rank != 0 or not value.dtype.is_floating:
            raise TypeError(
                "Argument `learning_rate` given as a tf.Variable must be a "
                f"floating scalar. Received: learning_rate={value!r}"
            )
        if tf.executing_eagerly():
            check_number("learning_rate", float(value.numpy()), low=0.0)
        return value
    value = check_number(
        "learning_rate",
        value,
        low=0.0,
        allow_callable=True,
        allow_tensor=True,
    )
    if isinstance(value, (tf.Tensor, tf.Variable, np.ndarray)):
        number = _constant_value("learning_rate", value)
        if number is None:
            raise TypeError(
                "Argument `learning_rate` must be a number, a schedule or a "
                "callable, or an eager tensor. Received the symbolic tensor "
                f"learning_rate={value}"
            )
        return number
    return value


def check_positive_int_or_none(name, value, minimum):
    """Checks that `value` is `None` or an int (not a bool) >= `minimum`.

    Example:

    >>> check_positive_int_or_none("gradient_accumulation_steps", 4, 2)
    4
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(
        value, (numbers.Integral, np.integer)
    ):
        raise TypeError(
            f"Argument `{name}` must be an int >= {minimum} or None. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(
            f"Argument `{name}` must be an int >= {minimum} or None. "
            f"Received: {name}={value}"
        )
    return int(value)


def check_bool(name, value):
    """Checks that `value` is a bool.

    Example:

    >>> check_bool("amsgrad", False)
    False
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Argument `{name}` must be a bool. Received: {name}={value!r}"
        )
    return bool(value)


def tf_variable(variable):
    """The `tf.Variable` behind a `keras.Variable` (or the variable itself).

    Example:

    >>> tf_variable(keras.Variable(1.0)).__class__.__name__
    'ResourceVariable'
    """
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def variable_name(variable):
    """The most telling name of a variable: its Keras path, else its name."""
    return getattr(variable, "path", None) or variable.name
