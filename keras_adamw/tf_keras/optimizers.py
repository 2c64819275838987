"""`keras_adamw.tf_keras.Adam` and `AdamW`: the Keras 2 (tf_keras) shell.

Subclasses of `tf_keras.optimizers.Optimizer` that keep tf_keras' state
layout (slots `m`, `v`, `vhat` made by `add_variable_from_reference`, the
base class' step counter, learning rate and EMA averages), so checkpoints
and `.keras` files are interchangeable with `tf_keras.optimizers.Adam` and
`AdamW`. Only this shell differs from `keras_adamw.Adam`: the update is
`keras_adamw.step.apply_step`, run by `keras_adamw.execution` (one XLA
program per step and device), with its variables placed by
`keras_adamw.placement` or, with `mesh`, `keras_adamw.dtensor`'s
`MeshPlacement`.
"""

import warnings

import numpy as np
import tensorflow as tf
import tf_keras

from keras_adamw import applying
from keras_adamw import call_checks
from keras_adamw import execution
from keras_adamw import hyperparams
from keras_adamw import placement as placement_lib
from keras_adamw import step
from keras_adamw.dtensor import placement as mesh_placement
from keras_adamw.learning_rate import Hidden
from keras_adamw.tf_keras import _compat
from keras_adamw.tf_keras import step_inputs

# The hyperparameters tf_keras' optimizers take (keras_adamw's table rows).
_ARGUMENTS = (
    "beta_1",
    "beta_2",
    "epsilon",
    "weight_decay",
    "amsgrad",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "jit_compile",
)


def _check_learning_rate(value):
    if isinstance(value, _compat.schedule_class()):
        return value
    return hyperparams.check("learning_rate", value)


def _placement(mesh, state_sharding_axis):
    if mesh is None:
        if state_sharding_axis is not None:
            raise ValueError(
                "Argument `state_sharding_axis` needs `mesh`. Received: "
                f"state_sharding_axis={state_sharding_axis!r}, mesh=None"
            )
        return placement_lib.LocalPlacement()
    return mesh_placement.MeshPlacement(mesh, state_sharding_axis)


@tf_keras.saving.register_keras_serializable(package="keras_adamw")
class Adam(step_inputs.StepInputs, tf_keras.optimizers.Optimizer):
    """Adam for tf_keras (Keras 2) models, fused and exact.

    Same arguments, defaults, slot names and checkpoint layout as
    `tf_keras.optimizers.Adam`, with keras_adamw's corrections: duplicate
    sparse indices are summed before use, half-precision variables are
    updated in float32, gradients are clipped after the cross-replica sum,
    the EMA moves also on a mesh, and with `jit_compile=True` (also on CPU)
    the update of all variables of a step is one XLA program per device.

    Args:
        learning_rate: A float, a `tf_keras` `LearningRateSchedule` or a
            zero-argument callable. Defaults to `0.001`.
        beta_1: Decay of the first moment. Defaults to `0.9`.
        beta_2: Decay of the second moment. Defaults to `0.999`.
        epsilon: Added to `sqrt(velocity)`. Defaults to `1e-7`.
        amsgrad: Whether to use AMSGrad. Defaults to `False`.
        weight_decay: Decoupled weight decay, or `None`.
        clipnorm: Clip each gradient to this norm.
        clipvalue: Clip each gradient element to `[-clipvalue, clipvalue]`.
        global_clipnorm: Clip all gradients jointly to this norm.
        use_ema: Keep an exponential moving average of the variables.
        ema_momentum: EMA momentum in `[0, 1]`. Defaults to `0.99`.
        ema_overwrite_frequency: Overwrite the variables with their average
            every this many steps; `None` for never.
        jit_compile: One XLA program per step. Defaults to `True`.
        mesh: A `tf.experimental.dtensor.Mesh` (or its string form): the
            model variables are `DVariable`s on it, and every slot is laid
            out like its variable.
        state_sharding_axis: With `mesh`, a mesh dimension along which to
            shard the slots of variables replicated along it (ZeRO-1).
        name: Defaults to `"Adam"`.
        **kwargs: tf_keras' legacy keyword arguments.

    Example:

    >>> import tf_keras
    >>> import keras_adamw.tf_keras
    >>> model = tf_keras.Sequential([tf_keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_adamw.tf_keras.Adam(), loss="mse")
    >>> model.fit(np.ones((8, 3)), np.ones((8, 1)), verbose=0).history.keys()
    dict_keys(['loss'])
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        jit_compile=True,
        mesh=None,
        state_sharding_axis=None,
        name="Adam",
        **kwargs,
    ):
        # Every check before the base class makes a variable.
        arguments = locals()
        values = hyperparams.check_arguments(
            {k: arguments[k] for k in _ARGUMENTS}
        )
        learning_rate = _check_learning_rate(learning_rate)
        placement = _placement(mesh, state_sharding_axis)
        super().__init__(
            name=name,
            weight_decay=values["weight_decay"],
            clipnorm=values["clipnorm"],
            clipvalue=values["clipvalue"],
            global_clipnorm=values["global_clipnorm"],
            use_ema=values["use_ema"],
            ema_momentum=values["ema_momentum"],
            ema_overwrite_frequency=values["ema_overwrite_frequency"],
            mesh=placement.mesh,
            **kwargs,
        )
        # tf_keras turns XLA off without a GPU; one program for all
        # variables is faster than none on CPU too.
        self.jit_compile = values["jit_compile"]
        self._placement = placement
        self._programs = Hidden(execution.Programs())
        self._built_variables = Hidden([])
        _compat.build_learning_rate(self, learning_rate)
        for name_ in ("beta_1", "beta_2", "epsilon", "amsgrad"):
            setattr(self, name_, values[name_])

    def __repr__(self):
        return (
            f"<keras_adamw.tf_keras.{type(self).__name__} {self.name!r}: a "
            "tf_keras (Keras 2) optimizer; for a Keras 3 model use "
            f"keras_adamw.{type(self).__name__}>"
        )

    __str__ = __repr__

    # ------------------------------------------------------------------
    # Variables, as tf_keras makes them.

    def build(self, var_list):
        """Makes the slots `m`, `v` (and `vhat` with amsgrad) of each
        variable, in tf_keras' order and names, after the base class' EMA
        averages.

        Args:
            var_list: The model variables this optimizer will update.

        Example:

        >>> import keras_adamw.tf_keras
        >>> opt = keras_adamw.tf_keras.Adam()
        >>> opt.build([tf.Variable([1.0], name="w")])
        >>> [v.name for v in opt.variables]
        ['iteration:0', 'm/w:0', 'v/w:0']
        """
        if _compat.is_built(self):
            return
        var_list = list(var_list)
        for variable in var_list:
            call_checks.check_variable(variable)
            self._placement.check_variable(variable)
        super().build(var_list)
        _compat.mark_built(self)
        self._built_variables = Hidden(var_list)
        # Interleaved as in tf_keras: m0, v0, m1, v1, ...
        self._momentums, self._velocities = [], []
        for variable in var_list:
            self._momentums.append(
                self.add_variable_from_reference(variable, "m")
            )
            self._velocities.append(
                self.add_variable_from_reference(variable, "v")
            )
        if self.amsgrad:
            self._velocity_hats = [
                self.add_variable_from_reference(variable, "vhat")
                for variable in var_list
            ]

    # ------------------------------------------------------------------
    # Applying gradients.

    # Not converted by autograph (as tf_keras' own optimizers are not).
    @execution.not_converted
    @execution.collector_paused()
    def apply_gradients(
        self,
        grads_and_vars,
        name=None,
        skip_gradients_aggregation=False,
        **kwargs,
    ):
        """Applies `(gradient, variable)` pairs: checks everything, sums the
        gradients across replicas (unless `skip_gradients_aggregation`),
        then runs one step program, which clips the summed gradients.

        Returns:
            The step counter variable.
        """
        aggregate = kwargs.pop("experimental_aggregate_gradients", True)
        if kwargs:
            raise TypeError(f"Unknown keyword arguments: {sorted(kwargs)}")
        aggregate = aggregate and not skip_gradients_aggregation
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        grads, variables = zip(*grads_and_vars)
        known = None
        if _compat.is_built(self):

            def known(v):
                return _compat.variable_index(self, v) is not None

        present, missing = call_checks.check_pairs(
            grads,
            variables,
            placement=self._placement,
            is_known=known,
            optimizer_name=self.name,
        )
        with tf.name_scope(name or self.name or "optimizer"):
            with tf.init_scope():
                self.build(variables)
            if missing:
                warnings.warn(
                    f"{self.name}: no gradient for variables {missing}; "
                    "they are not updated in this step.",
                    stacklevel=2,
                )
            if aggregate and self._placement.mesh is None:
                present = self.aggregate_gradients(present)
            _compat.update_current_learning_rate(self)
            gradients = [
                self._placement.place_gradient(g, v) for g, v in present
            ]
            indices = tuple(
                _compat.variable_index(self, v) for _, v in present
            )
            counter = call_checks.check_step_counter(self.iterations)
            self._run(
                step.apply_step,
                gradients,
                indices,
                self._hyperparameters(),
                [counter],
            )
        return self.iterations

    def update_step(self, gradient, variable):
        """Updates one built variable and its slots (weight decay included;
        no clipping, EMA or step count)."""
        index = _compat.variable_index(self, variable)
        if index is None:
            raise ValueError(
                f"Unknown variable {variable.name!r}: optimizer "
                f"{self.name!r} was not built with it."
            )
        self._run(
            step.update_one,
            [self._placement.place_gradient(gradient, variable)],
            (index,),
            self._hyperparameters(),
        )

    def finalize_variable_values(self, var_list):
        """With `use_ema`, sets `var_list` to their moving averages."""
        if self.use_ema and _compat.is_built(self):
            indices = tuple(_compat.variable_index(self, v) for v in var_list)
            self._run(step.copy_averages, [], indices, {}, jit_compile=False)

    _run = applying.ApplyGradients._run

    # ------------------------------------------------------------------
    # Configuration (state I/O: `step_inputs`).

    def get_config(self):
        """tf_keras' config, plus the mesh (string form) when there is one.

        Example:

        >>> import keras_adamw.tf_keras
        >>> keras_adamw.tf_keras.AdamW().get_config()["weight_decay"]
        0.004
        """
        config = super().get_config()
        learning_rate = _compat.serialize_hyperparameter(
            self, _compat.learning_rate_state(self)
        )
        if isinstance(learning_rate, np.generic):  # JSON, as Python floats.
            learning_rate = learning_rate.item()
        config.update(
            learning_rate=learning_rate,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            amsgrad=self.amsgrad,
        )
        if self._placement.mesh is not None:
            config.update(self._placement.get_config())
            config["state_sharding_axis"] = self._placement.state_sharding_axis
        return config


@tf_keras.saving.register_keras_serializable(package="keras_adamw")
class AdamW(Adam):
    """AdamW for tf_keras (Keras 2) models: `keras_adamw.tf_keras.Adam` with
    `weight_decay` defaulting to `0.004` and required.

    Args:
        learning_rate: See `keras_adamw.tf_keras.Adam`.
        weight_decay: Non-negative float. Defaults to `0.004`.
        **kwargs: The other arguments of `keras_adamw.tf_keras.Adam`.

    Example:

    >>> import keras_adamw.tf_keras
    >>> opt = keras_adamw.tf_keras.AdamW(weight_decay=0.01)
    >>> opt.exclude_from_weight_decay(var_names=["bias"])
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.004,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        jit_compile=True,
        mesh=None,
        state_sharding_axis=None,
        name="AdamW",
        **kwargs,
    ):
        if weight_decay is None:
            raise ValueError(
                "Argument `weight_decay` must be a float. Received: "
                "weight_decay=None. Use keras_adamw.tf_keras.Adam for none."
            )
        arguments = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "kwargs", "__class__")
        }
        super().__init__(**arguments, **kwargs)


__all__ = ["Adam", "AdamW"]
