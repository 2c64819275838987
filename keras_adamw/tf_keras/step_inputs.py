"""What a step of `keras_adamw.tf_keras.Adam` reads, and its state I/O.

A mixin of `keras_adamw.tf_keras.Adam`: the slots on a mesh
(`add_variable_from_reference`), the step's inputs (`_hyperparameters`,
`_state`, `_step_config`: what `keras_adamw.step` gets) and the `.keras`
file I/O (`save_own_variables`, `load_own_variables`) through the
optimizer's placement.
"""

import warnings

import tensorflow as tf

from keras_adamw import hyperparams
from keras_adamw import rules
from keras_adamw import step
from keras_adamw.tf_keras import _compat


class StepInputs:
    """Slots on a mesh, the step's inputs, and state I/O."""

    def add_variable_from_reference(
        self, model_variable, variable_name, shape=None, initial_value=None
    ):
        """tf_keras' slot of `model_variable`; on a mesh a `DVariable` laid
        out like it (another `shape` is replicated)."""
        if self._placement.mesh is None:
            return super().add_variable_from_reference(
                model_variable, variable_name, shape, initial_value
            )
        placement = self._placement
        own_shape = tuple(model_variable.shape)
        shape = own_shape if shape is None else tuple(shape)
        if shape == own_shape:
            layout = placement.slot_layout(model_variable.layout, shape)
        else:
            layout = placement.replicated(len(shape))
        dtype = _compat.true_dtype(model_variable)
        if initial_value is None:
            initial_value = tf.zeros(shape, dtype)
        variable = placement.make_variable(
            tf.convert_to_tensor(initial_value),
            layout,
            name=f"{variable_name}/{_compat.shared_name(model_variable)}",
        )
        _compat.track_variable(self, variable)
        return variable

    def _hyperparameters(self):
        return hyperparams.step_tensors(
            {
                "learning_rate": self.learning_rate,
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "weight_decay": self.weight_decay,
            },
            False,
        )

    def _state(self):
        return step.State(
            iterations=self.iterations,
            variables=list(self._built_variables.value),
            momentums=list(self._momentums),
            velocities=list(self._velocities),
            velocity_hats=list(self._velocity_hats) if self.amsgrad else None,
            averages=(
                list(_compat.moving_averages(self)) if self.use_ema else None
            ),
            accumulators=None,
        )

    def _step_config(self):
        variables = self._built_variables.value
        return step.StepConfig(
            amsgrad=self.amsgrad,
            clipnorm=self.clipnorm,
            clipvalue=self.clipvalue,
            global_clipnorm=self.global_clipnorm,
            loss_scale_factor=None,
            gradient_accumulation_steps=None,
            use_ema=self.use_ema,
            ema_momentum=self.ema_momentum,
            ema_overwrite_frequency=self.ema_overwrite_frequency,
            # tf_keras' exclusions as rules' settings: weight decay 0.
            settings=tuple(
                rules.DEFAULT
                if _compat.uses_weight_decay(self, v)
                else rules.DEFAULT._replace(weight_decay=0.0)
                for v in variables
            ),
            weight_decay_mode="lr_scaled",
            constraints=tuple(
                getattr(v, "constraint", None) for v in variables
            ),
            ema_first_step_copies=False,
        )

    def save_own_variables(self, store):
        """Writes every optimizer variable's whole value (also sharded
        `DVariable`s, which `.numpy()` refuses)."""
        for i, variable in enumerate(self.variables):
            store[str(i)] = self._placement.numpy(variable)

    def load_own_variables(self, store):
        """Reads what `save_own_variables` wrote, keeping layouts. With
        another number of variables (a model saved before its first step)
        it warns and loads nothing, as tf_keras does."""
        if len(store.keys()) != len(self.variables):
            warnings.warn(
                f"Optimizer {self.name!r} has {len(self.variables)} "
                f"variables; the saved one has {len(store.keys())} (saved "
                "before it was built?). Its state is not loaded.",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(self.variables):
            self._placement.assign(variable, store[str(i)])
