"""The optimizer's hyperparameters as one table.

Each row says a hyperparameter's name, what it accepts, its range and
default, whether the step reads it as a tensor (evaluated every step: a
schedule or callable is called afresh) and whether it fixes the optimizer's
structure (its slots) once built. The table drives everything else:

- `check(name, value)`: the constructor's checks and the checks when an
  attribute is assigned later (`optimizer.beta_1 = 1.5` raises);
- `step_tensors(values)`: the tensors one step reads, with values computed
  at run time range-checked before they are used;
- `EXTRA_CONFIG`: the keys `get_config` adds to Keras' base config.

Adding a hyperparameter is one row here, one constructor argument, and its
use in `keras_adamw.step`.
"""

import collections
import numbers

import keras
import tensorflow as tf

from keras_adamw import adam_math
from keras_adamw import rules
from keras_adamw import validation

Hyperparameter = collections.namedtuple(
    "Hyperparameter",
    [
        "name",
        "kind",
        "low",
        "high",
        "high_open",
        "default",
        "in_step",
        "structural",
        "in_base_config",
    ],
)
Hyperparameter.__doc__ = """One row of the table.

`kind` is one of:
- `"rate"`: a learning rate (number, eager scalar tensor, schedule or
  zero-argument callable), `>= low`;
- `"number"`: a finite float in `[low, high]` (`high` excluded when
  `high_open`); `"number_or_callable"` also accepts scalar tensors and
  zero-argument callables (range-checked when evaluated);
- `"positive_or_none"`: a number `> 0` or `None`;
- `"decay"`: `None`, a number `>= low`, a `LearningRateSchedule` (called
  with the step counter) or a zero-argument callable;
- `"int_or_none"`: an int `>= low` or `None`; `"bool"`; `"bool_or_none"`;
- `"choice"`: one of the values in `low`;
- `"rules"`: per-variable rules (see `keras_adamw.rules`).

`in_step`: the step reads it as a scalar tensor. `structural`: it decides
which slots exist, so it cannot change once the optimizer is built.
`in_base_config`: Keras' base `get_config` already writes it.
"""

# fmt: off
_ROWS = [
    # name, kind, low, high, high_open, default, in_step, structural, base
    ("learning_rate", "rate", 0.0, None, False, 0.001, True, False, True),
    ("beta_1", "number_or_callable", 0.0, 1.0, True, 0.9, True, False, False),
    ("beta_2", "number_or_callable", 0.0, 1.0, True, 0.999, True, False,
     False),
    ("epsilon", "number", 0.0, None, False, 1e-7, True, False, False),
    ("weight_decay", "decay", 0.0, None, False, None, True, False, True),
    ("amsgrad", "bool", None, None, False, False, False, True, False),
    ("clipnorm", "positive_or_none", 0.0, None, False, None, False, False,
     True),
    ("clipvalue", "positive_or_none", 0.0, None, False, None, False, False,
     True),
    ("global_clipnorm", "positive_or_none", 0.0, None, False, None, False,
     False, True),
    ("use_ema", "bool", None, None, False, False, False, True, True),
    ("ema_momentum", "number", 0.0, 1.0, False, 0.99, False, False, True),
    ("ema_overwrite_frequency", "int_or_none", 1, None, False, None, False,
     False, True),
    ("loss_scale_factor", "positive_or_none", 0.0, None, False, None, False,
     False, True),
    ("gradient_accumulation_steps", "int_or_none", 2, None, False, None,
     False, True, True),
    ("jit_compile", "bool", None, None, False, True, False, False, False),
    ("variable_rules", "rules", None, None, False, None, False, False, False),
    # For a "choice" row, `low` holds the accepted values.
    ("weight_decay_mode", "choice", adam_math.WEIGHT_DECAY_MODES, None, False,
     "lr_scaled", False, False, False),
    # Precision and robustness options (see keras_adamw.precision).
    ("moment_dtype", "choice", (None, "float32", "bfloat16"), None, False,
     None, False, True, False),
    ("kahan_summation", "bool", None, None, False, False, False, True, False),
    ("skip_nonfinite", "bool", None, None, False, False, False, True, False),
    ("sparse_updates", "choice", ("dense", "lazy"), None, False, "dense",
     False, False, False),
    # The fused CPU kernel (see keras_adamw.fused): None = auto.
    ("fused", "bool_or_none", None, None, False, None, False, False, False),
]
# fmt: on
TABLE = collections.OrderedDict(
    (row[0], Hyperparameter(*row)) for row in _ROWS
)

# Keys `get_config` adds to the base class' config.
EXTRA_CONFIG = tuple(h.name for h in TABLE.values() if not h.in_base_config)
# The clip options, of which at most one may be set.
CLIP_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm")


def _range_kwargs(row):
    return dict(low=row.low, high=row.high, high_open=row.high_open)


def check(name, value):
    """Checks `value` for hyperparameter `name`; returns it normalised
    (numbers as floats, ints as ints).

    Raises:
        TypeError: A value of the wrong kind, naming `name` and the value.
        ValueError: A value out of range, naming `name` and the value.

    Example:

    >>> check("beta_1", 0.5)
    0.5
    >>> check("beta_1", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: Argument `beta_1` must be a finite number in [0.0, 1.0).
    Received: beta_1=1.5
    """
    row = TABLE[name]
    kind = row.kind
    if kind == "rate":
        return validation.check_learning_rate(value)
    if kind == "bool":
        return validation.check_bool(name, value)
    if kind == "choice":
        if isinstance(value, str) or value is None:
            if value in row.low:
                return value
        raise ValueError(
            f"Argument `{name}` must be one of {list(row.low)}. "
            f"Received: {name}={value!r}"
        )
    if kind == "bool_or_none":
        return None if value is None else validation.check_bool(name, value)
    if kind == "int_or_none":
        return validation.check_positive_int_or_none(name, value, row.low)
    if kind == "rules":
        return rules.check_rules(value)
    if value is None and kind == "positive_or_none":
        return None
    if kind == "decay":
        if value is None or isinstance(value, _SCHEDULE):
            return value
        return validation.check_number(
            name, value, allow_callable=True, **_range_kwargs(row)
        )
    number = validation.check_number(
        name,
        value,
        allow_callable=kind == "number_or_callable",
        allow_tensor=kind == "number_or_callable",
        **_range_kwargs(row),
    )
    if kind == "positive_or_none" and number == 0:
        raise ValueError(
            f"Argument `{name}` must be > 0 or None. Received: {name}={value}"
        )
    return number


_SCHEDULE = keras.optimizers.schedules.LearningRateSchedule


def check_clip_options(values):
    """Checks that at most one clip option in `values` (a dict) is set.

    Example:

    >>> check_clip_options({"clipnorm": 1.0, "clipvalue": None})
    """
    given = {k: values[k] for k in CLIP_OPTIONS if values.get(k) is not None}
    if len(given) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can "
            "be set. Received: "
            + ", ".join(f"{k}={v}" for k, v in given.items())
        )


def check_arguments(values):
    """Checks a dict of constructor arguments (every key a row of the
    table); returns the normalised dict. Nothing is created before this.

    Example:

    >>> check_arguments({"amsgrad": True, "epsilon": 1e-8})
    {'epsilon': 1e-08, 'amsgrad': True}
    """
    checked = {}
    for name in TABLE:  # In the table's order: the first bad one raises.
        if name not in values:
            continue
        if name == CLIP_OPTIONS[0]:
            check_clip_options(values)
        checked[name] = check(name, values[name])
    return checked


def check_assignment(optimizer, name, value):
    """Checks `optimizer.<name> = value` after construction: the value as
    the constructor would, the clip options jointly, and no change to a
    structural hyperparameter once built.

    Example:

    >>> opt = keras_adamw.Adam()
    >>> opt.epsilon = -1.0
    Traceback (most recent call last):
    ...
    ValueError: Argument `epsilon` must be a finite number in [0.0, inf].
    Received: epsilon=-1.0
    """
    value = check(name, value)
    if name in CLIP_OPTIONS and value is not None:
        others = {k: getattr(optimizer, k, None) for k in CLIP_OPTIONS}
        others[name] = value
        check_clip_options(others)
    row = TABLE[name]
    if (
        row.structural
        and getattr(optimizer, "built", False)
        and value != getattr(optimizer, name)
    ):
        raise ValueError(
            f"`{name}` cannot change once optimizer {optimizer.name!r} is "
            f"built (it decides which slots exist). Received: {name}={value}; "
            f"it is {getattr(optimizer, name)!r}. Create a new optimizer."
        )
    return value


def _evaluate(value):
    """`value` as a tensor: a callable is called, a number kept in float64
    until the step casts it to each variable's compute dtype."""
    computed = callable(value) and not tf.is_tensor(value)
    if computed:
        value = value()
    return tf.convert_to_tensor(value, dtype_hint=tf.float64), computed


def step_tensors(values, computed_learning_rate):
    """The scalar tensors one step reads, from the current values of the
    `in_step` hyperparameters (`None` ones are left out).

    A value computed now (by a callable, or `learning_rate` from a
    schedule when `computed_learning_rate`) is range-checked: eagerly at
    once, inside a `tf.function` by an assertion that runs before the
    update.

    Example:

    >>> sorted(step_tensors({"learning_rate": 0.1, "beta_1": lambda: 0.9,
    ...                      "weight_decay": None}, False))
    ['beta_1', 'learning_rate']
    """
    tensors = {}
    for name, value in values.items():
        if value is None:
            continue
        value, computed = _evaluate(value)
        if computed or (name == "learning_rate" and computed_learning_rate):
            value = validation.check_tensor_in_range(
                name, value, **_range_kwargs(TABLE[name])
            )
        tensors[name] = value
    return tensors


def exact_rate(rate, exact):
    """The learning rate as the user set it, in float64.

    Keras holds a float learning rate in a float32 variable, so `lr=0.1`
    would reach a float64 variable's update as 0.10000000149. `exact` is a
    float64 copy of the value last set (kept beside Keras' variable): while
    Keras' variable still holds that value rounded, it is used; once the
    variable was changed otherwise (restored, assigned), the variable's
    value is.

    Example:

    >>> float(exact_rate(tf.Variable(0.1), tf.Variable(0.1, dtype=tf.float64)))
    0.1
    >>> float(exact_rate(tf.Variable(0.5), tf.Variable(0.1, dtype=tf.float64)))
    0.5
    """
    rate = tf.convert_to_tensor(rate)
    exact = tf.convert_to_tensor(exact)
    return tf.where(
        tf.equal(tf.cast(exact, rate.dtype), rate),
        exact,
        tf.cast(rate, exact.dtype),
    )


def is_number(value):
    """Whether `value` is a plain real number (not a bool or tensor).

    Example:

    >>> is_number(0.1), is_number(True), is_number(tf.constant(0.1))
    (True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class HyperparameterAttributes:
    """A mixin of `keras_adamw.Adam`: assigning a hyperparameter checks it
    (as the constructor does), and `get_config` writes every row."""

    def __setattr__(self, name, value):
        """Checks a hyperparameter assigned after construction as the
        constructor does (see `check_assignment`)."""
        if (
            name in TABLE
            and name != "learning_rate"
            and getattr(self, "_hyperparameters_checked", False)
        ):
            value = check_assignment(self, name, value)
        super().__setattr__(name, value)

    def get_config(self):
        """Returns the constructor arguments as a serializable dict: a
        `weight_decay` schedule serialized as Keras serializes learning-rate
        schedules, `variable_rules` as `[pattern, overrides]` lists.

        Raises:
            ValueError: If `weight_decay` is a callable that is not a
                `LearningRateSchedule` (it cannot be saved).

        Example:

        >>> keras_adamw.AdamW().get_config()["weight_decay"]
        0.004
        """
        config = super().get_config()
        config.update({name: getattr(self, name) for name in EXTRA_CONFIG})
        config["variable_rules"] = rules.to_config(self.variable_rules)
        config["weight_decay"] = serialize_decay(self.weight_decay)
        config.update(self._placement.get_config())
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates the optimizer from `get_config`'s dict (a serialized
        `weight_decay` schedule is deserialized).

        Example:

        >>> schedule = keras.optimizers.schedules.ExponentialDecay(
        ...     0.01, decay_steps=10, decay_rate=0.5)
        >>> config = keras_adamw.AdamW(weight_decay=schedule).get_config()
        >>> type(keras_adamw.AdamW.from_config(config).weight_decay).__name__
        'ExponentialDecay'
        """
        config = dict(config)
        if isinstance(config.get("weight_decay"), dict):
            config["weight_decay"] = keras.optimizers.schedules.deserialize(
                config["weight_decay"], custom_objects=custom_objects
            )
        return super().from_config(config, custom_objects=custom_objects)


def serialize_decay(weight_decay):
    """`weight_decay` as `get_config` writes it.

    Example:

    >>> serialize_decay(0.01)
    0.01
    >>> serialize_decay(lambda: 0.01)
    Traceback (most recent call last):
    ...
    ValueError: ...
    """
    if isinstance(weight_decay, _SCHEDULE):
        return keras.optimizers.schedules.serialize(weight_decay)
    if callable(weight_decay):
        raise ValueError(
            "`get_config` cannot save `weight_decay` given as the callable "
            f"{weight_decay!r}: a config holds no code. Use a "
            "`keras.optimizers.schedules.LearningRateSchedule` (registered "
            "with `keras.saving.register_keras_serializable` if it is your "
            "own) or a float."
        )
    return weight_decay
