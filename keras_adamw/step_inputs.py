"""What one step reads from the optimizer: its variables as a
`step.State`, its Python-level settings as a `step.StepConfig` and its
hyperparameters as scalar tensors.

A mixin of `keras_adamw.Adam`. The step itself (`keras_adamw.step`) never
touches the optimizer: these three values are all it gets.
"""

import functools

import keras
import tensorflow as tf

from keras_adamw import _keras_compat
from keras_adamw import hyperparams
from keras_adamw import step
from keras_adamw import validation


class StepInputs:
    """`_hyperparameters`, `_state` and `_step_config`."""

    def _hyperparameters(self, learning_rate=None):
        """The scalar tensors of this step (see `hyperparams.step_tensors`),
        evaluated in the caller's context, so that a schedule, callable or
        changed attribute is seen at every step."""
        values = {
            h.name: getattr(self, h.name)
            for h in hyperparams.TABLE.values()
            if h.in_step
        }
        weight_decay = values["weight_decay"]
        if isinstance(
            weight_decay, keras.optimizers.schedules.LearningRateSchedule
        ):
            # Evaluated as Keras evaluates a learning-rate schedule: at the
            # raw call counter, every step.
            values["weight_decay"] = functools.partial(
                weight_decay, _keras_compat.iterations_variable(self)
            )
        exact = self._exact_learning_rate.value
        if learning_rate is not None:
            values["learning_rate"] = learning_rate
        elif exact is not None:
            values["learning_rate"] = hyperparams.exact_rate(
                values["learning_rate"], exact
            )
        computed = not isinstance(
            _keras_compat.learning_rate_value(self),
            (keras.Variable, tf.Variable),
        )
        return hyperparams.step_tensors(values, computed)

    @tf.autograph.experimental.do_not_convert
    def _place_gradients(self, pairs):
        """The gradients of `(gradient, variable)` pairs where their
        variables live, dense, or with `sparse_updates="lazy"` (and no
        gradient accumulation, whose accumulators are dense) sparse ones
        as rows with unique indices."""
        lazy = self.sparse_updates == "lazy"
        keep_rows = lazy and not self.gradient_accumulation_steps
        return [
            self._placement.place_gradient(g, v, keep_rows) for g, v in pairs
        ]

    # Python over Python values: not for autograph (execution.not_converted).
    @tf.autograph.experimental.do_not_convert
    def _state(self):
        """The variables a step reads and writes, as a `step.State`."""

        def tf_variables(variables):
            return (
                None
                if variables is None
                else [validation.tf_variable(v) for v in variables]
            )

        return step.State(
            iterations=validation.tf_variable(
                _keras_compat.iterations_variable(self)
            ),
            variables=tf_variables(_keras_compat.built_variables(self)),
            momentums=tf_variables(self._momentums),
            velocities=tf_variables(self._velocities),
            velocity_hats=tf_variables(self._velocity_hats),
            averages=tf_variables(
                _keras_compat.moving_averages(self) if self.use_ema else None
            ),
            accumulators=tf_variables(
                _keras_compat.gradient_accumulators(self)
                if self.gradient_accumulation_steps
                else None
            ),
            compensations=tf_variables(self._compensations),
            skipped_steps=None
            if self.skipped_steps is None
            else validation.tf_variable(self.skipped_steps),
        )

    @tf.autograph.experimental.do_not_convert
    def _step_config(self):
        """The Python-level settings of a step, as a `step.StepConfig`."""
        variables = _keras_compat.built_variables(self)
        return step.StepConfig(
            amsgrad=self.amsgrad,
            clipnorm=self.clipnorm,
            clipvalue=self.clipvalue,
            global_clipnorm=self.global_clipnorm,
            loss_scale_factor=self.loss_scale_factor,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            use_ema=self.use_ema,
            ema_momentum=self.ema_momentum,
            ema_overwrite_frequency=self.ema_overwrite_frequency,
            settings=self._variable_settings(),
            weight_decay_mode=self.weight_decay_mode,
            constraints=tuple(
                getattr(v, "constraint", None) for v in variables
            ),
            kahan_summation=self.kahan_summation,
            skip_nonfinite=self.skip_nonfinite,
        )
