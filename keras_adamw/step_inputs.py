"""What one step reads from the optimizer: its variables as a
`step.State`, its Python-level settings as a `step.StepConfig` and its
hyperparameters as scalar tensors.

A mixin of `keras_adamw.Adam`. The step itself (`keras_adamw.step`) never
touches the optimizer: these three values are all it gets.
"""

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
        )

    @tf.autograph.experimental.do_not_convert
    def _step_config(self):
        """The Python-level settings of a step, as a `step.StepConfig`."""
        variables = _keras_compat.built_variables(self)
        decays = self._decay_mask
        if self.weight_decay is None:
            decays = (False,) * len(variables)
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
            decays=decays,
            constraints=tuple(
                getattr(v, "constraint", None) for v in variables
            ),
        )
