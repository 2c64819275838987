"""Per-variable rules: `variable_rules=[(pattern, overrides), ...]`.

A rule is a regular expression, searched in a variable's path (`v.path`,
e.g. `"dense_1/bias"`) and in its name, and a dict of overrides for the
variables it matches. Rules are tried in order; each setting comes from the
first matching rule that sets it, so a rule that only excludes biases from
weight decay does not hide a later rule's learning-rate multiplier for the
same layer.

Everything here is pure Python: `check_rules` validates rules (at
construction), `match` resolves one variable's `Settings` (at build), and
the step reads the `Settings` as constants (`step.StepConfig.settings`), so
rules cost nothing per step.
"""

import collections
import re

from keras_adamw import validation


def _number(**interval):
    def check(key, value):
        return validation.check_number(key, value, **interval)

    return check


def _choice(*choices):
    def check(key, value):
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(
            f"`{key}` must be one of {list(choices)}. Received: "
            f"{key}={value!r}"
        )

    return check


# The overrides a rule may give, each with the check of its value.
OVERRIDES = collections.OrderedDict(
    [
        ("learning_rate_multiplier", _number(low=0.0)),
        ("weight_decay", _number(low=0.0)),
        ("beta_1", _number(low=0.0, high=1.0, high_open=True)),
        ("beta_2", _number(low=0.0, high=1.0, high_open=True)),
        ("epsilon", _number(low=0.0)),
        # Decided when the slots are made (at build).
        ("moment_dtype", _choice("float32", "bfloat16")),
    ]
)

Settings = collections.namedtuple("Settings", list(OVERRIDES))
Settings.__doc__ = """One variable's settings after its rules.

`learning_rate_multiplier` scales the optimizer's learning rate (1.0 when
no rule sets it). The others are constants replacing the optimizer's value,
or `None` to use the optimizer's (a `weight_decay` of 0.0 excludes the
variable from weight decay; `moment_dtype` is the dtype of its momentum,
velocity and velocity_hat, fixed when the optimizer is built).
"""
DEFAULT = Settings(1.0, None, None, None, None, None)

Rule = collections.namedtuple("Rule", ["pattern", "overrides"])
Rule.__doc__ = """A checked rule: `pattern` (a string) and `overrides` (a
tuple of `(name, float)` pairs: immutable, so the optimizer can hold rules
without TensorFlow's object tracking wrapping them)."""


def _describe(index, rule):
    return f"variable_rules[{index}] {rule!r}"


def check_rule(index, rule):
    """Checks rule number `index`; returns it as a `Rule`.

    Raises:
        TypeError: A rule that is not a `(pattern, overrides)` pair, a
            pattern that is not a string or overrides that are not a dict.
        ValueError: A pattern that is not a valid regular expression, an
            unknown override or a value out of range; the message names
            the rule.

    Example:

    >>> check_rule(0, ("bias", {"weight_decay": 0}))
    Rule(pattern='bias', overrides=(('weight_decay', 0.0),))
    """
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
        raise TypeError(
            f"{_describe(index, rule)}: each rule must be a pair "
            "(pattern, overrides), e.g. ('bias', {'weight_decay': 0.0})."
        )
    pattern, overrides = rule
    if not isinstance(pattern, str):
        raise TypeError(
            f"{_describe(index, rule)}: the pattern must be a string (a "
            f"regular expression). Received: {pattern!r}"
        )
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"{_describe(index, rule)}: the pattern {pattern!r} is not a "
            f"valid regular expression ({error})."
        ) from None
    if isinstance(overrides, tuple):  # As `Rule` holds them: pairs.
        try:
            overrides = dict(overrides)
        except (TypeError, ValueError):
            pass
    if not isinstance(overrides, dict):
        raise TypeError(
            f"{_describe(index, rule)}: the overrides must be a dict. "
            f"Received: {overrides!r}"
        )
    checked = {}
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise ValueError(
                f"{_describe(index, rule)}: unknown override {key!r}. "
                f"Known: {', '.join(OVERRIDES)}."
            )
        try:
            checked[key] = OVERRIDES[key](key, value)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{_describe(index, rule)}: {error}") from None
    return Rule(pattern, tuple(checked.items()))


def check_rules(rules):
    """Checks `variable_rules`; returns them as a tuple of `Rule`s.

    Example:

    >>> check_rules([("bias", {"weight_decay": 0.0})])
    (Rule(pattern='bias', overrides=(('weight_decay', 0.0),)),)
    >>> check_rules(None)
    ()
    """
    if rules is None:
        return ()
    if isinstance(rules, (str, dict)) or not hasattr(rules, "__iter__"):
        raise TypeError(
            "Argument `variable_rules` must be a list of (pattern, "
            f"overrides) pairs. Received: variable_rules={rules!r}"
        )
    return tuple(check_rule(i, rule) for i, rule in enumerate(rules))


def variable_path(variable):
    """The path rules are searched in: `variable.path` (Keras), else the
    variable's name without its `:0` (a `tf.Variable`).

    Example:

    >>> variable_path(tf.Variable(1.0, name="scale"))
    'scale'
    """
    path = getattr(variable, "path", None)
    if path:
        return path
    name = getattr(variable, "name", "") or ""
    return name[: -len(":0")] if name.endswith(":0") else name


def _matches(rule, variable):
    names = {variable_path(variable), getattr(variable, "name", "") or ""}
    return any(re.search(rule.pattern, n) for n in names)


def match(rules, variable):
    """Resolves `variable`'s settings: for each override, the first
    matching rule that sets it. Returns `(settings, indices)` where
    `indices` are the rules that matched.

    Example:

    >>> rules = check_rules([("bias", {"weight_decay": 0.0}),
    ...                      ("dense", {"learning_rate_multiplier": 0.5})])
    >>> settings, indices = match(rules, keras.Variable(1.0, name="bias"))
    >>> settings.weight_decay, settings.learning_rate_multiplier, indices
    (0.0, 1.0, (0,))
    """
    values = DEFAULT._asdict()
    given = set()
    indices = []
    for index, rule in enumerate(rules):
        if not _matches(rule, variable):
            continue
        indices.append(index)
        for key, value in rule.overrides:
            if key not in given:
                values[key] = value
                given.add(key)
    return Settings(**values), tuple(indices)


def exclusion_rules(var_list=None, var_names=None):
    """The rules `exclude_from_weight_decay(var_list, var_names)` stands
    for: `weight_decay=0.0` for each name pattern, and for each variable of
    `var_list` by its exact path.

    Example:

    >>> exclusion_rules(var_names=["bias"])
    [('bias', {'weight_decay': 0.0})]
    """
    if isinstance(var_names, str):
        raise TypeError(
            "Argument `var_names` must be a list of strings. Received "
            f"the string var_names={var_names!r}; pass [{var_names!r}]."
        )
    var_names = list(var_names or [])
    for pattern in var_names:
        if not isinstance(pattern, str):
            raise TypeError(
                "Argument `var_names` must be a list of strings. "
                f"Received the element {pattern!r} in "
                f"var_names={var_names!r}"
            )
    patterns = var_names + [
        "^" + re.escape(variable_path(v)) + "$" for v in (var_list or [])
    ]
    return [(p, {"weight_decay": 0.0}) for p in patterns]


def to_config(rules):
    """`rules` as JSON-ready lists `[pattern, overrides]`.

    Example:

    >>> to_config(check_rules([("bias", {"weight_decay": 0})]))
    [['bias', {'weight_decay': 0.0}]]
    """
    return [[rule.pattern, dict(rule.overrides)] for rule in rules]
