"""Checks of one optimizer call: its variables, gradients and pairs.

Each raises `TypeError` or `ValueError` naming the variable and the value,
before any state changes; a check that can only run inside a `tf.function`
(sparse indices known at run time, the step counter) is an assertion that
the step waits for (`keras_adamw.execution`).
"""

import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_adamw.validation import tf_variable
from keras_adamw.validation import variable_name


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
        kind = (
            "tf.Tensor" if tf.is_tensor(variable) else type(variable).__name__
        )
        raise TypeError(
            f"An optimizer updates variables; received a {kind} in its "
            f"place: {variable!r:.200}. Pass `tf.Variable`s or "
            "`keras.Variable`s (a model's `trainable_variables`)."
        )
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
            tf.TensorShape(static)
            if static is not None
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


# Python checks over Python values: autograph would convert them anew for
# every variable on a step's first call (see execution.not_converted).
@tf.autograph.experimental.do_not_convert
def check_pairs(
    gradients, variables, *, placement, is_known=None, optimizer_name=""
):
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
                "order."
            )
        check_variable(variable)
        if id(tf_variable(variable)) in seen:
            raise ValueError(
                f"Variable {variable_name(variable)!r} appears twice in one "
                "call; pass each variable once (sum its gradients)."
            )
        seen.add(id(tf_variable(variable)))
        placement.check_variable(variable)
        if is_known is not None and not is_known(variable):
            raise ValueError(
                f"Unknown variable {variable_name(variable)!r}: optimizer "
                f"{optimizer_name!r} was built on other variables. Create a "
                "new optimizer for a new set of variables."
            )
        if getattr(variable, "overwrite_with_gradient", False):
            raise NotImplementedError(
                "Variables with `overwrite_with_gradient=True` (float8 "
                "training) are not supported. Received: "
                f"{variable_name(variable)!r}"
            )
        if gradient is None:
            missing.append(variable_name(variable))
        else:
            check_gradient(gradient, variable)
            present.append(
                (check_sparse_indices(gradient, variable), variable)
            )
    if not present:
        raise ValueError(
            f"No gradients provided for any variable. Variables: {missing}"
        )
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
    ValueError: The sparse gradient of variable 'table:0' has indices [-1]
    outside its rows [0, 3).
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
                f"rows [0, {rows})."
            )
        return gradient
    message = (
        f"The sparse gradient of variable {variable_name(variable)!r}"
        f" has indices outside its rows [0, {rows})"
    )
    checks = [
        tf.debugging.assert_non_negative(indices, message=message),
        tf.debugging.assert_less(
            indices, tf.cast(rows, indices.dtype), message=message
        ),
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
    ValueError: The step counter is at its largest value ... would wrap it. ...
    """
    largest = np.iinfo(tf.as_dtype(iterations.dtype).as_numpy_dtype).max
    message = (
        f"The step counter is at its largest value ({largest}); "
        "another step would wrap it. Reset `optimizer.iterations` or "
        "make a new optimizer."
    )
    if tf.executing_eagerly():
        if int(iterations.numpy()) >= largest:
            raise ValueError(message)
        return None
    return tf.debugging.assert_less(
        tf.convert_to_tensor(iterations),
        tf.constant(largest, iterations.dtype),
        message=message,
    )


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
            tf_variable(variable)
        ):
            raise ValueError(
                f"Variable {variable_name(variable)!r} was not created in the "
                f"scope of the current {type(strategy).__name__}: create the "
                "model and the optimizer under `strategy.scope()`."
            )


def check_accumulation_window(variables, built, steps, optimizer_name):
    """With gradient accumulation (`steps`), every call must pass every
    variable the optimizer was `built` with (gradients may be `None`): the
    window is shared, and a call for another model's variables would reset
    this one's accumulators.

    Example:

    >>> a, b = tf.Variable(1.0, name="a"), tf.Variable(1.0, name="b")
    >>> check_accumulation_window([a], [a, b], 2, "adam")
    Traceback (most recent call last):
    ...
    ValueError: Optimizer 'adam' accumulates gradients over 2 calls ...
    this call leaves out ['b:0']. ...
    """
    if not steps or len(variables) == len(built):
        return
    passed = {id(tf_variable(v)) for v in variables}
    left_out = [
        variable_name(v) for v in built if id(tf_variable(v)) not in passed
    ]
    raise ValueError(
        f"Optimizer {optimizer_name!r} accumulates gradients over {steps} "
        f"calls for all {len(built)} variables it was built with, but this "
        f"call leaves out {left_out[:5]}{'...' if len(left_out) > 5 else ''}."
        " Pass every variable (with a `None` gradient where there is none), "
        "or use one optimizer per model."
    )
