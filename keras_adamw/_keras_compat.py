"""Every private Keras name keras_adamw touches, each behind one function.

keras_adamw subclasses `keras.optimizers.Optimizer` and reuses its state
(step counter, learning rate, EMA averages, gradient accumulators, the
variable index). Keras keeps these in private attributes; this module is the
only place that names them, so a Keras release that renames one breaks one
function here, and `tests/test_architecture.py` checks that no other module
names a private Keras attribute.

Checked against the Keras versions in `CHECKED_KERAS_VERSIONS` (the oldest
and newest that `.ci/run` tests). Importing keras_adamw with a Keras outside
`SUPPORTED_KERAS` raises `ImportError` (older: an API we call is missing) or
warns (newer: not yet checked).
"""

import warnings

import keras

# The oldest Keras that works, and the newest checked. Where a private name
# appeared or changed inside this range, the function says so.
# Below 3.10, `Variable._initialize` copies a `tf.Variable` it is given (the
# DTensor mode loses its layouts), `add_optimizer_variables` and
# `add_variable(layout=)` are missing, and before 3.7 `aggregation="none"` is
# refused; Keras <= 3.4 has no `_iterations`.
SUPPORTED_KERAS = ("3.10.0", "3.15.1")
CHECKED_KERAS_VERSIONS = ("3.10.0", "3.15.1")


def _version_tuple(version):
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_keras_version(version=None):
    """Raises `ImportError` for a Keras older than `SUPPORTED_KERAS[0]` and
    warns once for one newer than `SUPPORTED_KERAS[1]`.

    Example:

    >>> check_keras_version("3.15.1")
    >>> check_keras_version("3.2.0")
    Traceback (most recent call last):
    ...
    ImportError: keras_adamw needs Keras >= 3.10.0 ... found Keras 3.2.0. ...
    """
    version = version or keras.__version__
    low, high = SUPPORTED_KERAS
    if _version_tuple(version) < _version_tuple(low):
        raise ImportError(
            f"keras_adamw needs Keras >= {low} (checked with {low} to "
            f"{high}); "
            f"found Keras {version}. Upgrade with `pip install -U keras`."
        )
    if _version_tuple(version)[:2] > _version_tuple(high)[:2]:
        warnings.warn(
            f"keras_adamw was checked with Keras {low} to {high}; found Keras "
            f"{version}. It reaches into Keras' optimizer internals "
            "(keras_adamw/_keras_compat.py): if something fails, pin "
            f"keras<={high} and report it.",
            stacklevel=2,
        )


# ----------------------------------------------------------------------
# keras.optimizers.Optimizer: state the base class keeps.


def iterations_variable(optimizer):
    """The raw call counter (`Optimizer._iterations`; the public
    `iterations` divides it under gradient accumulation)."""
    return optimizer._iterations


def learning_rate_value(optimizer):
    """What the optimizer holds as its learning rate: a `keras.Variable`, a
    schedule or a callable (`Optimizer._learning_rate`)."""
    return optimizer._learning_rate


def use_learning_rate_variable(optimizer, variable):
    """Makes the `keras.Variable` `variable` the optimizer's learning rate in
    place of the one the base class made (`Optimizer._learning_rate`,
    `_untrack_variable`, `_track_variable`), keeping its place second in
    `optimizer.variables`."""
    old = optimizer._learning_rate
    if isinstance(old, keras.Variable):
        optimizer._untrack_variable(old)
    optimizer._learning_rate = variable
    if not any(v is variable for v in optimizer.variables):
        optimizer._track_variable(variable)


def current_learning_rate(optimizer):
    """The learning rate of the coming step, a schedule evaluated at the
    raw call counter (`Optimizer._get_current_learning_rate`)."""
    return optimizer._get_current_learning_rate()


def built_variables(optimizer):
    """The model variables the optimizer was built with, in build order
    (`Optimizer._trainable_variables`)."""
    return optimizer._trainable_variables


def variable_index(optimizer, variable):
    """The position of `variable` among `built_variables` (raises
    `KeyError` for an unknown one) (`Optimizer._get_variable_index`)."""
    return optimizer._get_variable_index(variable)


def is_built_variable(optimizer, variable):
    """Whether the optimizer was built with `variable`
    (`Optimizer._var_key`, `Optimizer._trainable_variables_indices`)."""
    return (
        optimizer._var_key(variable) in optimizer._trainable_variables_indices
    )


def variable_key(optimizer, variable):
    """A key identifying `variable` as the base class does, also through a
    `tf.distribute` wrapper (`Optimizer._var_key`)."""
    return optimizer._var_key(variable)


def moving_averages(optimizer):
    """The EMA slots the base class' `build` made with `use_ema`
    (`Optimizer._model_variables_moving_average`)."""
    return optimizer._model_variables_moving_average


def gradient_accumulators(optimizer):
    """The gradient accumulators the base class' `build` made
    (`Optimizer._accumulated_gradients`)."""
    return optimizer._accumulated_gradients


def track_variable(optimizer, variable):
    """Adds `variable` to `optimizer.variables` (`Optimizer._track_variable`),
    for variables made without `Optimizer.add_variable` (on a mesh)."""
    optimizer._track_variable(variable)


def base_add_variable(
    optimizer, shape, initializer, dtype, aggregation, layout, name
):
    """Keras' own `Optimizer.add_variable` (public; `layout` exists since
    Keras 3.10 and is passed only when set)."""
    kwargs = {} if layout is None else {"layout": layout}
    return keras.optimizers.Optimizer.add_variable(
        optimizer,
        shape,
        initializer=initializer,
        dtype=dtype,
        aggregation=aggregation,
        name=name,
        **kwargs,
    )


# ----------------------------------------------------------------------
# keras.Variable.


def replace_backing_variable(variable, backing):
    """Makes the `keras.Variable` `variable` hold the `tf.Variable`
    `backing` (a `DVariable` on a mesh). Keras' TensorFlow `Variable.
    _initialize` keeps a `tf.Variable` it is given as it is (since 3.10;
    earlier releases copy it)."""
    variable._initialize(backing)
