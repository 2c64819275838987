"""Applying gradients: `apply`, `update_step` and
`finalize_variable_values`, the orchestration of a step.

A mixin of `keras_adamw.Adam`. A step (`apply`) goes:

1. check the gradients and variables (`call_checks`; nothing has changed
   yet if this raises);
2. sum them across replicas, evaluate the hyperparameters, build the slots
   on first use;
3. bring the gradients (densified, duplicate indices summed) and the
   hyperparameters to where the variables live (the placement);
4. hand the step to `execution`, which runs `step.apply_step` as one XLA
   program or op by op.
"""

import functools
import warnings

from keras_adamw import _keras_compat
from keras_adamw import call_checks
from keras_adamw import execution
from keras_adamw import step
from keras_adamw import validation


class ApplyGradients:
    """`apply`, `update_step`, `finalize_variable_values` and `_run`."""

    def apply(self, grads, trainable_variables=None):
        """Updates `trainable_variables` with `grads`.

        Overrides Keras to check everything before any change, sum gradients
        across replicas before clipping, and run one program per step.

        Args:
            grads: Gradients (tensors, `tf.IndexedSlices` or `None`), one per
                variable.
            trainable_variables: The variables; may be omitted once built, to
                update all variables the optimizer was built with.

        Raises:
            ValueError: If the numbers of gradients and variables differ, a
                shape differs, a variable is unknown, or every gradient is
                `None`. Nothing has changed then.
            TypeError: If a variable or gradient is not floating-point.

        Example:

        >>> w = keras.Variable([1.0, 2.0])
        >>> opt = keras_adamw.Adam(learning_rate=0.1)
        >>> opt.apply([tf.constant([1.0, -1.0])], [w])
        >>> w.numpy().round(4).tolist()
        [0.9, 2.1]
        """
        self._apply(grads, trainable_variables, aggregate=True)

    # Not converted by autograph, as Keras' own optimizers are not (it
    # skips the `keras` package): the step's Python runs over Python values.
    @execution.not_converted
    @execution.collector_paused()
    def _apply(self, grads, trainable_variables, aggregate):
        """`apply`, summing gradients across replicas first if `aggregate`.

        Order matters: every check runs before anything changes; gradients
        are summed before any clipping (which happens inside the step).
        """
        grads = list(grads)
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When `trainable_variables` is omitted the optimizer must "
                    "already be built; call `optimizer.build(variables)`."
                )
            trainable_variables = _keras_compat.built_variables(self)
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"Received {len(grads)} gradients for "
                f"{len(trainable_variables)} variables; they must pair one to "
                "one. Variables: "
                f"{[validation.variable_name(v) for v in trainable_variables]}"
            )
        if not grads:
            return
        call_checks.check_created_in_strategy_scope(
            [_keras_compat.iterations_variable(self)] + trainable_variables
        )
        present, missing = call_checks.check_pairs(
            grads,
            trainable_variables,
            placement=self._placement,
            is_known=functools.partial(_keras_compat.is_built_variable, self)
            if self.built
            else None,
            optimizer_name=self.name,
        )
        if aggregate:
            present = self.aggregate_gradients(present)
        hyper = self._hyperparameters()
        if not self.built:
            self._build_in_cross_replica_context(trainable_variables)
        if missing:
            warnings.warn(
                f"{self.name}: no gradient for variables {missing}; they are "
                "not updated in this step.",
                stacklevel=2,
            )
        indices = tuple(
            _keras_compat.variable_index(self, v) for _, v in present
        )
        call_checks.check_accumulation_window(
            trainable_variables,
            _keras_compat.built_variables(self),
            self.gradient_accumulation_steps,
            self.name,
        )
        gradients = self._place_gradients(present)
        counter = call_checks.check_step_counter(
            validation.tf_variable(_keras_compat.iterations_variable(self))
        )
        self._run(step.apply_step, gradients, indices, hyper, [counter])

    def update_step(self, gradient, variable, learning_rate):
        """Updates one variable: the single-variable path of the formula.

        Overrides Keras: unlike Keras, whose base class applies weight decay
        outside `update_step`, this applies the whole AdamW step (decay
        included) to `variable` and its slots. The step counter is not
        advanced.

        Args:
            gradient: Its gradient (tensor or `tf.IndexedSlices`).
            variable: A variable this optimizer was built with.
            learning_rate: The learning rate to use.

        Example:

        >>> w = keras.Variable([1.0])
        >>> opt = keras_adamw.Adam()
        >>> opt.build([w])
        >>> opt.update_step(tf.constant([1.0]), w, 0.5)
        >>> w.numpy().round(4).tolist()
        [0.5]
        """
        if not self.built:
            raise ValueError(
                f"Unknown variable {validation.variable_name(variable)!r}: "
                f"optimizer {self.name!r} is not built; call "
                "`optimizer.build(variables)` first."
            )
        # The same checks as a step's, for this one pair.
        ((gradient, variable),), _ = call_checks.check_pairs(
            [gradient],
            [variable],
            placement=self._placement,
            is_known=functools.partial(_keras_compat.is_built_variable, self),
            optimizer_name=self.name,
        )
        index = _keras_compat.variable_index(self, variable)
        self._run(
            step.update_one,
            self._place_gradients([(gradient, variable)]),
            (index,),
            self._hyperparameters(learning_rate),
        )

    def finalize_variable_values(self, var_list):
        """With `use_ema`, overwrites `var_list` with their moving averages.

        Overrides Keras to run through the same dispatch as a step.

        Args:
            var_list: Model variables this optimizer was built with.

        Example:

        >>> w = keras.Variable([1.0])
        >>> opt = keras_adamw.Adam(use_ema=True)
        >>> opt.apply([tf.constant([1.0])], [w])
        >>> opt.finalize_variable_values([w])
        """
        if self.use_ema and self.built:
            indices = tuple(
                _keras_compat.variable_index(self, v) for v in var_list
            )
            # A copy: nothing for XLA to fuse, and an eager XLA call cannot
            # reach a strategy's other replicas from the caller's device.
            self._run(step.copy_averages, [], indices, {}, jit_compile=False)

    def _run(
        self, function, gradients, indices, hyper, guards=(), jit_compile=None
    ):
        """Runs a step function on the optimizer's state (see
        `execution.Programs.run`), with XLA as `jit_compile` (default: the
        optimizer's) says. Shared with `keras_adamw.tf_keras` (which has no
        `fused` argument)."""
        self._programs.value.run(
            function,
            self.jit_compile if jit_compile is None else jit_compile,
            gradients,
            indices,
            self._state(),
            self._placement.place_scalars(hyper),
            self._step_config(),
            guards=guards,
            fused=getattr(self, "fused", False),
        )
