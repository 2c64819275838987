"""Which variables get weight decay: `exclude_from_weight_decay`'s rules,
turned into one mask when the optimizer is built."""

import re

from keras_adamw import _keras_compat


class Exclusions:
    """Variables excluded from weight decay, by object or by name pattern.

    Args:
        keys: Keys (as the optimizer computes them) of excluded variables.
        var_names: Regular expressions; a variable whose name or path
            contains a match is excluded. Keras 3 matches the name only, so
            `"dense_1"` never matched `dense_1/kernel`.

    Example:

    >>> Exclusions(var_names=["bias"]).mask(
    ...     [keras.Variable(1.0, name="bias"), keras.Variable(1.0, name="k")],
    ...     key=id)
    (False, True)
    """

    def __init__(self, keys=(), var_names=()):
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
        self.keys = frozenset(keys)
        self.pattern = re.compile("|".join(var_names)) if var_names else None

    def excludes(self, variable, key):
        """Whether `variable` (with key `key`) is excluded."""
        if key in self.keys:
            return True
        if self.pattern is None:
            return False
        names = (variable.name, getattr(variable, "path", ""))
        return any(self.pattern.search(n or "") for n in names)

    def mask(self, variables, key):
        """One bool per variable: whether it gets weight decay.
        `key(variable)` computes the keys given to the constructor."""
        return tuple(not self.excludes(v, key(v)) for v in variables)


class WeightDecayExclusion:
    """`exclude_from_weight_decay`, and the mask it gives at build."""

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay. Call before `build`.

        Overrides Keras to match the variable's path too and to raise
        rather than ignore a call after build.

        Args:
            var_list: Variables to exclude.
            var_names: Strings (regular expressions); a variable whose name
                or path contains any of them is excluded. Keras 3 matches the
                name only, so `"dense_1"` never matched `dense_1/kernel`.

        Raises:
            ValueError: If the optimizer is already built (Keras 3 silently
                ignores the call then).
            TypeError: If `var_names` is a single string.

        Example:

        >>> opt = keras_adamw.AdamW(weight_decay=0.1)
        >>> opt.exclude_from_weight_decay(var_names=["bias", "norm"])
        """
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` must be called before the "
                f"optimizer is built; {self.name!r} is already built on "
                f"{len(_keras_compat.built_variables(self))} variables."
            )
        self._exclusions = Exclusions(
            keys=[
                _keras_compat.variable_key(self, v) for v in (var_list or [])
            ],
            var_names=var_names,
        )

    def _build_decay_mask(self, variables):
        """Whether each of `variables` gets weight decay; computed once, when
        the optimizer is built."""
        self._decay_mask = self._exclusions.mask(
            variables, key=lambda v: _keras_compat.variable_key(self, v)
        )
