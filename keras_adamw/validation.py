"""Checks of constructor arguments and of gradients.

Each check raises `TypeError` (wrong kind of value) or `ValueError` (a value
out of range) naming the argument or variable and the value received. The
optimizer runs them before it changes any state.
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


def check_number(name, value, *, low=None, high=None, high_open=False,
                 allow_callable=False, allow_tensor=False):
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
    if allow_callable and callable(value) and not isinstance(
        value, (tf.Tensor, tf.Variable)
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
            or (high is not None and (number > high
                                      or (high_open and number == high)))
        ):
            raise ValueError(
                f"Argument `{name}` must be a finite number in {interval}. "
                f"Received: {name}={value}"
            )
    if is_tensor:
        return value
    return number


def check_tensor_in_range(name, value, *, low=None, high=None,
                          high_open=False):
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
        check_number(name, float(static), low=low, high=high,
                     high_open=high_open)
        return value
    message = f"`{name}` computed at run time is out of range"
    checks = [tf.debugging.assert_all_finite(value, message)]
    if low is not None:
        checks.append(tf.debugging.assert_greater_equal(
            value, tf.cast(low, value.dtype), message=message))
    if high is not None:
        compare = (tf.debugging.assert_less if high_open
                   else tf.debugging.assert_less_equal)
        checks.append(compare(value, tf.cast(high, value.dtype),
                              message=message))
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
                f"floating scalar. Received: learning_rate={value!r}")
        if tf.executing_eagerly():
            check_number("learning_rate", float(value.numpy()), low=0.0)
        return value
    value = check_number(
        "learning_rate", value, low=0.0, allow_callable=True,
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


def _is_variable(value):
    return isinstance(value, (tf.Variable, keras.Variable))


def check_variable(variable):
    """Checks that `variable` is a variable (`tf.Variable` or
    `keras.Variable`) with a floating dtype.

    Example:

    >>> check_variable(tf.Variable(1.0)) is None
    True
    >>> check_variable(tf.constant(1.0))
    Traceback (most recent call last):
    ...
    TypeError: An optimizer updates variables; received a tf.Tensor ...
    """
    if not _is_variable(variable):
        kind = ("tf.Tensor" if tf.is_tensor(variable)
                else type(variable).__name__)
        raise TypeError(
            f"An optimizer updates variables; received a {kind} in its "
            f"place: {variable!r:.200}. Pass `tf.Variable`s or "
            "`keras.Variable`s (a model's `trainable_variables`).")
    dtype = tf.as_dtype(variable.dtype)
    if not dtype.is_floating:
        raise TypeError(
            f"Variable {variable_name(variable)!r} has dtype {dtype.name}; "
            "an Adam optimizer can only update floating-point variables."
        )


def check_gradient(gradient, variable):
    """Checks that a non-`None` gradient matches its variable's shape and is
    a floating tensor or `tf.IndexedSlices`.

    Example:

    >>> check_gradient(tf.zeros([2]), tf.Variable([1.0, 2.0])) is None
    True
    """
    if isinstance(gradient, tf.IndexedSlices):
        shape = gradient.dense_shape
        static = tf.get_static_value(shape) if shape is not None else None
        grad_shape = (
            tf.TensorShape(static) if static is not None
            else tf.TensorShape([None]).concatenate(gradient.values.shape[1:])
        )
        dtype = gradient.values.dtype
    else:
        if not tf.is_tensor(gradient) and not isinstance(
            gradient, (np.ndarray, numbers.Number)
        ):
            raise TypeError(
                f"The gradient of variable {variable_name(variable)!r} must "
                f"be a tensor or tf.IndexedSlices. Received: {gradient!r}"
            )
        gradient = tf.convert_to_tensor(gradient)
        grad_shape = gradient.shape
        dtype = gradient.dtype
    if not tf.as_dtype(dtype).is_floating:
        raise TypeError(
            f"The gradient of variable {variable_name(variable)!r} has dtype "
            f"{tf.as_dtype(dtype).name}; it must be floating-point."
        )
    if not grad_shape.is_compatible_with(variable.shape):
        raise ValueError(
            f"The gradient of variable {variable_name(variable)!r} has shape "
            f"{grad_shape}, but the variable has shape "
            f"{tf.TensorShape(variable.shape)}."
        )


def check_pairs(gradients, variables, *, placement, is_known=None,
                optimizer_name=""):
    """Checks one call's gradients against its variables.

    Args:
        gradients: Gradients (or `None`), one per variable.
        variables: The variables.
        placement: The optimizer's `Placement` (it may refuse a variable).
        is_known: For a built optimizer, `is_known(variable)` says whether
            it was built with `variable`; `None` before build.
        optimizer_name: Named in the messages.

    Returns:
        `(present, missing)`: the `(gradient, variable)` pairs with a
        gradient, and the names of the variables without one.

    Example:

    >>> from keras_adamw.placement import LocalPlacement
    >>> w = tf.Variable([1.0])
    >>> check_pairs([None, tf.ones([1])], [tf.Variable(0.0, name="b"), w],
    ...             placement=LocalPlacement())[1]
    ['b:0']
    """
    present, missing, seen = [], [], set()
    for gradient, variable in zip(gradients, variables):
        if _is_variable(gradient) and not _is_variable(variable):
            raise TypeError(
                f"Received the variable {variable_name(gradient)!r} where a "
                "gradient belongs: pairs are (gradient, variable), in that "
                "order.")
        check_variable(variable)
        if id(tf_variable(variable)) in seen:
            raise ValueError(
                f"Variable {variable_name(variable)!r} appears twice in one "
                "call; pass each variable once (sum its gradients).")
        seen.add(id(tf_variable(variable)))
        placement.check_variable(variable)
        if is_known is not None and not is_known(variable):
            raise ValueError(
                f"Unknown variable {variable_name(variable)!r}: optimizer "
                f"{optimizer_name!r} was built on other variables. Create a "
                "new optimizer for a new set of variables.")
        if getattr(variable, "overwrite_with_gradient", False):
            raise NotImplementedError(
                "Variables with `overwrite_with_gradient=True` (float8 "
                "training) are not supported. Received: "
                f"{variable_name(variable)!r}")
        if gradient is None:
            missing.append(variable_name(variable))
        else:
            check_gradient(gradient, variable)
            present.append((check_sparse_indices(gradient, variable),
                            variable))
    if not present:
        raise ValueError(
            f"No gradients provided for any variable. Variables: {missing}")
    return present, missing


def check_sparse_indices(gradient, variable):
    """Checks that the indices of a `tf.IndexedSlices` gradient are rows of
    `variable` (`0 <= index < rows`): eagerly at once, inside a `tf.function`
    by an assertion that the step waits for. Other gradients pass as they
    are.

    Returns:
        The gradient (its indices behind the assertion in a graph).

    Example:

    >>> check_sparse_indices(tf.IndexedSlices(
    ...     tf.ones([1, 2]), tf.constant([-1]), tf.constant([3, 2])),
    ...     tf.Variable(tf.zeros([3, 2]), name="table"))
    Traceback (most recent call last):
    ...
    ValueError: The sparse gradient of variable 'table:0' has indices [-1] outside its rows [0, 3).
    """
    if not isinstance(gradient, tf.IndexedSlices):
        return gradient
    rows = variable.shape[0]
    indices = gradient.indices
    static = tf.get_static_value(indices)
    if static is not None:
        static = np.asarray(static)
        bad = static[(static < 0) | (static >= rows)]
        if bad.size:
            raise ValueError(
                f"The sparse gradient of variable {variable_name(variable)!r}"
                f" has indices {sorted(set(bad.tolist()))[:10]} outside its "
                f"rows [0, {rows}).")
        return gradient
    message = (f"The sparse gradient of variable {variable_name(variable)!r}"
               f" has indices outside its rows [0, {rows})")
    checks = [
        tf.debugging.assert_non_negative(indices, message=message),
        tf.debugging.assert_less(
            indices, tf.cast(rows, indices.dtype), message=message),
    ]
    with tf.control_dependencies(checks):
        indices = tf.identity(indices)
    return tf.IndexedSlices(gradient.values, indices, gradient.dense_shape)


def check_step_counter(iterations):
    """Refuses a step that would wrap the int64 call counter (whose last
    value would make the bias correction NaN). Returns the assertion to run
    before the step inside a `tf.function`, or `None`.

    Example:

    >>> check_step_counter(tf.Variable(2**63 - 1, dtype=tf.int64))
    Traceback (most recent call last):
    ...
    ValueError: The step counter is at its largest value (9223372036854775807); another step would wrap it. ...
    """
    largest = np.iinfo(tf.as_dtype(iterations.dtype).as_numpy_dtype).max
    message = (f"The step counter is at its largest value ({largest}); "
               "another step would wrap it. Reset `optimizer.iterations` or "
               "make a new optimizer.")
    if tf.executing_eagerly():
        if int(iterations.numpy()) >= largest:
            raise ValueError(message)
        return None
    return tf.debugging.assert_less(
        tf.convert_to_tensor(iterations),
        tf.constant(largest, iterations.dtype), message=message)


def check_created_in_strategy_scope(variables):
    """Under a `tf.distribute` strategy, `variables` (the model's and the
    optimizer's) must have been created in its scope, or copies would be
    updated twice.

    Example:

    >>> check_created_in_strategy_scope([tf.Variable(1.0)])
    """
    if not tf.distribute.has_strategy():
        return
    strategy = tf.distribute.get_strategy()
    for variable in variables:
        if not strategy.extended.variable_created_in_scope(
                tf_variable(variable)):
            raise ValueError(
                f"Variable {variable_name(variable)!r} was not created in the "
                f"scope of the current {type(strategy).__name__}: create the "
                "model and the optimizer under `strategy.scope()`.")
