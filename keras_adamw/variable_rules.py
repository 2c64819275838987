"""Per-variable settings on the optimizer: `variable_rules`,
`exclude_from_weight_decay` (sugar for rules) and `explain()`.

A mixin of `keras_adamw.Adam`. The rules themselves (checking, matching)
are in `keras_adamw.rules`; here they meet the optimizer's variables.
"""

import keras
import numpy as np

from keras_adamw import _keras_compat
from keras_adamw import explain as explain_lib
from keras_adamw import rules


def _scalar(value):
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


class VariableRules:
    """`exclude_from_weight_decay`, `explain` and the per-variable settings
    a step reads."""

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay.

        Sugar for rules: each name pattern, and each variable of `var_list`
        by its path, becomes a rule `(pattern, {"weight_decay": 0.0})` put
        before the other `variable_rules`, so it is saved by `get_config`
        (and `.keras` files) and still applies after a reload. It may be
        called at any time; it applies from the next step.

        Args:
            var_list: Variables to exclude (matched by their path).
            var_names: Regular expressions; a variable whose path or name
                contains a match is excluded (Keras 3 searches the name
                only).

        Raises:
            TypeError: If `var_names` is a single string or holds a
                non-string.

        Example:

        >>> opt = keras_adamw.AdamW(weight_decay=0.1)
        >>> opt.exclude_from_weight_decay(var_names=["bias", "norm"])
        >>> opt.get_config()["variable_rules"]
        [['bias', {'weight_decay': 0.0}], ['norm', {'weight_decay': 0.0}]]
        """
        new = rules.exclusion_rules(var_list, var_names)
        self.variable_rules = new + [tuple(r) for r in self.variable_rules]

    def _variable_settings(self):
        """A `rules.Settings` per built variable, matched once per set of
        rules (when the optimizer is built, or when the rules change)."""
        variables = _keras_compat.built_variables(self)
        key = (self.variable_rules, len(variables))
        cached = getattr(self, "_settings_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        settings = tuple(
            rules.match(self.variable_rules, v)[0] for v in variables
        )
        self._settings_cache = (key, settings)  # Immutable: not tracked.
        return settings

    def _moment_dtype(self, settings):
        """The dtype of a variable's moments, given its `settings`: its
        rules' `moment_dtype`, else the optimizer's (`None`: the variable's
        own)."""
        return settings.moment_dtype or self.moment_dtype

    def _current_weight_decay(self):
        """The optimizer's weight decay for the coming step, as a float (a
        schedule evaluated at the step counter); 0.0 for none."""
        weight_decay = self.weight_decay
        if weight_decay is None:
            return 0.0
        if isinstance(
            weight_decay, keras.optimizers.schedules.LearningRateSchedule
        ):
            return _scalar(
                weight_decay(_keras_compat.iterations_variable(self))
            )
        if callable(weight_decay):
            return _scalar(weight_decay())
        return float(weight_decay)

    def explain(self, var_list=None):
        """What the optimizer does to each variable, after its rules.

        Args:
            var_list: The variables to explain; defaults to those the
                optimizer was built with (required before build).

        Returns:
            A `keras_adamw.explain.Explanation`: a list with one
            `explain.Row` per variable (path, shape, dtype, the rules that
            matched, effective learning rate, weight decay, betas, epsilon,
            slot dtype, precision options and layout on a mesh);
            `print()` shows it as a table.

        Raises:
            ValueError: If `var_list` is omitted before the optimizer is
                built.

        Example:

        >>> opt = keras_adamw.AdamW(
        ...     learning_rate=0.01, weight_decay=0.1,
        ...     variable_rules=[("bias", {"weight_decay": 0.0})])
        >>> rows = opt.explain([keras.Variable([1.0], name="kernel"),
        ...                     keras.Variable([1.0], name="bias")])
        >>> [(r.path, r.weight_decay, r.decay_per_step) for r in rows]
        [('kernel', 0.1, 0.001), ('bias', 0.0, 0.0)]
        """
        if var_list is None:
            if not self.built:
                raise ValueError(
                    f"Optimizer {self.name!r} is not built; pass the "
                    "variables: "
                    "`optimizer.explain(model.trainable_variables)`."
                )
            var_list = _keras_compat.built_variables(self)
        learning_rate = _scalar(self.learning_rate)
        weight_decay = self._current_weight_decay()
        rows = explain_lib.Explanation()
        for variable in var_list:
            settings, indices = rules.match(self.variable_rules, variable)
            rows.append(
                self._explain_one(
                    variable, settings, indices, learning_rate, weight_decay
                )
            )
        return rows

    def _explain_one(
        self, variable, settings, indices, learning_rate, weight_decay
    ):
        rate = learning_rate * settings.learning_rate_multiplier
        decay = (
            settings.weight_decay
            if settings.weight_decay is not None
            else weight_decay
        )
        per_step = (
            decay
            if self.weight_decay_mode == "independent"
            else (decay * rate)
        )

        def value(name):
            given = getattr(settings, name)
            if given is not None:
                return given
            current = getattr(self, name)
            return _scalar(current() if callable(current) else current)

        return explain_lib.Row(
            path=rules.variable_path(variable),
            shape=tuple(variable.shape),
            dtype=keras.backend.standardize_dtype(variable.dtype),
            rules=tuple(self.variable_rules[i].pattern for i in indices),
            learning_rate_multiplier=settings.learning_rate_multiplier,
            learning_rate=rate,
            weight_decay=decay,
            decay_per_step=per_step,
            beta_1=value("beta_1"),
            beta_2=value("beta_2"),
            epsilon=value("epsilon"),
            slot_dtype=self._slot_dtype(variable),
            kahan_summation=self.kahan_summation,
            sparse_updates=self.sparse_updates,
            skip_nonfinite=self.skip_nonfinite,
            layout=self._placement.layout_of(variable),
        )

    def _slot_dtype(self, variable):
        """The dtype of `variable`'s momentum: the built slot's, else the
        one build would make."""
        if self.built and _keras_compat.is_built_variable(self, variable):
            index = _keras_compat.variable_index(self, variable)
            dtype = self._momentums[index].dtype
        else:
            settings, _ = rules.match(self.variable_rules, variable)
            dtype = self._moment_dtype(settings) or variable.dtype
        return keras.backend.standardize_dtype(dtype)
