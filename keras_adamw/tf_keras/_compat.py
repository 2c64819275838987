"""Every private tf_keras name `keras_adamw.tf_keras` touches, each behind
one function.

`keras_adamw.tf_keras` subclasses tf_keras' (Keras 2's) optimizer base
class and keeps its state where that class keeps it (step counter, learning
rate, EMA averages, the variable index), so that checkpoints are
interchangeable with `tf_keras.optimizers.AdamW`. tf_keras keeps these in
private attributes; this module is the only place that names them
(`tests/test_architecture.py` checks), so a tf_keras release that renames
one breaks one function here.

Checked: tf_keras 2.21.0 (run by the tests); 2.16.0's
`tf_keras/src/optimizers/optimizer.py` read (the same names). Importing with
an older tf_keras raises `ImportError`; a newer one warns.
"""

import warnings

try:
    import tf_keras
except ImportError as error:  # pragma: no cover - tested in a subprocess.
    raise ImportError(
        "keras_adamw.tf_keras needs tf_keras (Keras 2): "
        "`pip install keras_adamw[tf-keras]` (or `pip install tf-keras` "
        "matching your TensorFlow version). For Keras 3 models use "
        f"keras_adamw.Adam / keras_adamw.AdamW. ({error})"
    ) from error

SUPPORTED_TF_KERAS = ("2.16.0", "2.21.0")


def _version_tuple(version):
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_tf_keras_version(version=None):
    """Raises `ImportError` below `SUPPORTED_TF_KERAS[0]`; warns above
    `SUPPORTED_TF_KERAS[1]` (minor version).

    Example:

    >>> check_tf_keras_version("2.21.0")
    >>> check_tf_keras_version("2.10.0")
    Traceback (most recent call last):
    ...
    ImportError: keras_adamw.tf_keras needs tf_keras >= 2.16.0 ...
    """
    version = version or tf_keras.__version__
    low, high = SUPPORTED_TF_KERAS
    if _version_tuple(version) < _version_tuple(low):
        raise ImportError(
            f"keras_adamw.tf_keras needs tf_keras >= {low} (checked with "
            f"{low} to {high}); found tf_keras {version}. "
            "`pip install keras_adamw[tf-keras]`."
        )
    if _version_tuple(version)[:2] > _version_tuple(high)[:2]:
        warnings.warn(
            f"keras_adamw.tf_keras was checked with tf_keras {low} to {high}; "
            f"found tf_keras {version}.",
            stacklevel=2,
        )


check_tf_keras_version()


def build_learning_rate(optimizer, learning_rate):
    """Makes the learning-rate state as tf_keras' subclasses do
    (`_build_learning_rate`: a variable, or a schedule plus a variable with
    the current rate; on the mesh when there is one)."""
    optimizer._learning_rate = optimizer._build_learning_rate(learning_rate)


def learning_rate_state(optimizer):
    """The `learning_rate` argument as stored: a variable or a schedule."""
    return optimizer._learning_rate


def update_current_learning_rate(optimizer):
    """With a schedule, sets the current-rate variable from the step counter
    (what tf_keras' `apply_gradients` does first)."""
    optimizer._compute_current_learning_rate()


def serialize_hyperparameter(optimizer, value):
    """tf_keras' config form of a hyperparameter."""
    return optimizer._serialize_hyperparameter(value)


def is_built(optimizer):
    """Whether `build` has made the slots (tf_keras' `_built` flag)."""
    return getattr(optimizer, "_built", False)


def mark_built(optimizer):
    optimizer._built = True


def mesh(optimizer):
    """The DTensor mesh tf_keras' base class was given, or None."""
    return optimizer._mesh


def variable_index(optimizer, variable):
    """Position of model variable `variable` in the list `build` got, or
    None if unknown."""
    return optimizer._index_dict.get(optimizer._var_key(variable))


def uses_weight_decay(optimizer, variable):
    """tf_keras' exclusion rule (`exclude_from_weight_decay`)."""
    return optimizer._use_weight_decay(variable)


def moving_averages(optimizer):
    """The EMA averages the base class' `build` made (one per variable)."""
    return optimizer._model_variables_moving_average


def track_variable(optimizer, variable):
    """Adds `variable` to `optimizer.variables` (checkpoint order)."""
    optimizer._variables.append(variable)


def shared_name(variable):
    """The variable's name without `:0`, which tf_keras uses in slot names
    (`m/dense/kernel`)."""
    return variable._shared_name


def true_dtype(variable):
    """The stored dtype (a mixed-precision `AutoCastVariable` reports its
    cast dtype as `dtype`)."""
    return getattr(variable, "true_dtype", variable.dtype)


def schedule_class():
    return tf_keras.optimizers.schedules.LearningRateSchedule


__all__ = [
    "SUPPORTED_TF_KERAS",
    "build_learning_rate",
    "check_tf_keras_version",
    "is_built",
    "learning_rate_state",
    "mark_built",
    "mesh",
    "moving_averages",
    "serialize_hyperparameter",
    "shared_name",
    "track_variable",
    "true_dtype",
    "update_current_learning_rate",
    "uses_weight_decay",
    "variable_index",
]
