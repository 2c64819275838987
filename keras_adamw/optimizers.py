"""`keras_adamw.Adam` and `keras_adamw.AdamW`: the Keras-facing classes,
their constructor and `build`.

Each concept is a mixin in its own module: a step's orchestration in
`applying`, hyperparameter checks and `get_config` in `hyperparams`,
per-variable rules and `explain()` in `variable_rules`, state I/O in
`state_io`, the Keras 2 API in `keras2_api`, what a step reads in
`step_inputs`, the learning rate in `learning_rate`; the formula is in
`adam_math`; every private Keras name in `_keras_compat`.
"""

import warnings

import keras

from keras_adamw import _keras_compat
from keras_adamw import applying
from keras_adamw import call_checks
from keras_adamw import execution
from keras_adamw import hyperparams
from keras_adamw import keras2_api
from keras_adamw import learning_rate as learning_rate_lib
from keras_adamw import placement as placement_lib
from keras_adamw import slot_paths
from keras_adamw import slots
from keras_adamw import state_io
from keras_adamw import step_inputs
from keras_adamw import variable_rules


@keras.saving.register_keras_serializable(package="keras_adamw")
class Adam(
    applying.ApplyGradients,
    hyperparams.HyperparameterAttributes,
    keras2_api.Keras2API,
    state_io.StateIO,
    slot_paths.SlotPaths,
    slots.Slots,
    variable_rules.VariableRules,
    step_inputs.StepInputs,
    learning_rate_lib.LearningRate,
    keras.optimizers.Optimizer,
):
    """Adam, a drop-in for `keras.optimizers.Adam`, fused and exact.

    Same arguments, defaults and numbers as `keras.optimizers.Adam` (Keras 3),
    except where Keras is wrong (see the README): duplicate sparse indices
    are summed before use, half-precision variables are updated in float32,
    EMA moves once per real step under gradient accumulation, and bad input
    raises. With `jit_compile=True` (the default) the update of all variables
    of a step is one XLA program, also on CPU where Keras turns XLA off.

    Args:
        learning_rate: A non-negative float, a scalar eager tensor, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a callable
            taking no arguments and returning the rate. Defaults to `0.001`.
        beta_1: Decay of the first moment: a float in `[0, 1)`, a scalar
            tensor or a zero-argument callable. Defaults to `0.9`.
        beta_2: Decay of the second moment, as `beta_1`. Defaults to `0.999`.
        epsilon: Non-negative constant added to `sqrt(velocity)` ("epsilon
            hat" in Kingma & Ba). Defaults to `1e-7`.
        amsgrad: Whether to divide by the running maximum of the velocity
            (Reddi et al., 2018). Defaults to `False`.
        weight_decay: Decoupled weight decay (`var -= var * wd * lr` before
            the Adam step), or `None`: a non-negative float, a
            `LearningRateSchedule` (evaluated at the step counter, as a
            learning-rate schedule is) or a zero-argument callable (not
            saved by `get_config`). Defaults to `None`.
        clipnorm: Clip each gradient to this L2 norm. At most one of the
            three clip options may be set.
        clipvalue: Clip each gradient element to `[-clipvalue, clipvalue]`.
        global_clipnorm: Clip all gradients jointly to this global L2 norm.
        use_ema: Keep an exponential moving average of the model variables.
        ema_momentum: EMA momentum in `[0, 1]`. Defaults to `0.99`.
        ema_overwrite_frequency: Overwrite the model variables with their
            average every this many (real) steps; `None` for never.
        loss_scale_factor: Multiply the loss by this before differentiating
            (`scale_loss`) and divide the gradients by it before the update.
        gradient_accumulation_steps: An int >= 2: apply the mean gradient of
            this many calls once, every this many calls.
        jit_compile: Run the update of all variables of a step as one XLA
            program. Defaults to `True`.
        variable_rules: Per-variable settings: a list of `(pattern,
            overrides)` where `pattern` is a regular expression searched in
            the variable's path (`"dense_1/bias"`) and name, and `overrides`
            a dict with any of `learning_rate_multiplier`, `weight_decay`
            (0.0 excludes), `beta_1`, `beta_2`, `epsilon`, `moment_dtype`.
            Each setting comes from the first matching rule that sets it.
            See `keras_adamw.rules` and `explain()`.
        weight_decay_mode: `"lr_scaled"` (default; Keras, torch, optax:
            `var -= var * wd * lr`) or `"independent"` (`var -= var * wd`,
            Loshchilov & Hutter's decoupled form: put the schedule on
            `weight_decay`).
        mesh: A `tf.experimental.dtensor.Mesh` (or its string form) to run in
            DTensor mode (see `keras_adamw.dtensor`): slots are `DVariable`s
            laid out like their model variables, which must be `DVariable`s
            on this mesh.
        name: Name of the optimizer; defaults to `"adam"` (made unique as in
            Keras).
        moment_dtype, kahan_summation, skip_nonfinite, sparse_updates:
            Precision and robustness options; see `keras_adamw.precision`,
            `keras_adamw.lazy_sparse` and the README.
        fused: Whether a step runs on the fused CPU kernel
            (`keras_adamw.kernels`): `None` (the default) where it is
            built and supported (CPU devices), else as `jit_compile` says;
            `True` always (a `ValueError` says why it cannot); `False`
            never. See `keras_adamw.fused`.

    Hyperparameters may be changed after construction (`opt.beta_1 = 0.8`);
    the new value is checked as the constructor checks it (see
    `keras_adamw.hyperparams`).

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_adamw.Adam(1e-3), loss="mse")
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
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        jit_compile=True,
        variable_rules=None,
        weight_decay_mode="lr_scaled",
        mesh=None,
        name=None,
        moment_dtype=None,
        kahan_summation=False,
        skip_nonfinite=False,
        sparse_updates="dense",
        fused=None,
        **kwargs,
    ):
        # Every check runs before the base class creates any variable.
        # Keras 2's `decay` is ignored with Keras 3's warning; any other
        # unknown argument raises Keras 3's error, with ours after it.
        if kwargs.pop("decay", None) is not None:
            warnings.warn(
                "Argument `decay` is no longer supported and will be ignored.",
                stacklevel=2,
            )
        if kwargs:
            raise ValueError(
                f"Argument(s) not recognized: {kwargs}. "
                f"{type(self).__name__} got unknown argument(s): "
                f"{sorted(kwargs)}."
            )
        # The hyperparameter arguments, checked as the table says.
        values = hyperparams.check_arguments(
            {k: v for k, v in locals().items() if k in hyperparams.TABLE}
        )
        placement = placement_lib.placement_for(mesh)
        base_names = [
            h.name for h in hyperparams.TABLE.values() if h.in_base_config
        ]
        user_rate = values["learning_rate"]
        values["learning_rate"] = learning_rate_lib.base_class_rate(
            user_rate, placement
        )
        super().__init__(name=name, **{k: values[k] for k in base_names})
        for name_ in hyperparams.EXTRA_CONFIG:
            setattr(self, name_, values[name_])
        self._placement = placement
        self.mesh = placement.mesh
        self._programs = learning_rate_lib.Hidden(execution.Programs())
        scalars = [_keras_compat.iterations_variable(self)]
        scalars += self._init_learning_rate(user_rate)
        placement.adopt_scalars(scalars)
        self._hyperparameters_checked = True

    # ------------------------------------------------------------------
    # Variables.

    def build(self, var_list):
        """Creates the slots: `momentum` and `velocity` per variable, and
        `velocity_hat` with amsgrad (plus the base class' EMA averages and
        gradient accumulators). Names and order are Keras', so `.keras` files
        and checkpoints are interchangeable with `keras.optimizers.Adam`.

        Args:
            var_list: The model variables this optimizer will update.

        Raises:
            TypeError: If a variable is not floating-point.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> opt.build([keras.Variable([1.0, 2.0], name="w")])
        >>> [v.name for v in opt.variables][2:]
        ['w_momentum', 'w_velocity']
        """
        if self.built:
            return
        var_list = slot_paths.prepare_build(self, list(var_list))
        for variable in var_list:
            call_checks.check_variable(variable)
            self._placement.check_variable(variable)
        self._check_option_variables(var_list)
        super().build(var_list)
        self._momentums, self._velocities, self._velocity_hats = (
            slots.adam_slots(
                self,
                var_list,
                self.amsgrad,
                # Each variable matched to its rules, once.
                [self._moment_dtype(s) for s in self._variable_settings()],
            )
        )
        self._build_option_slots(var_list)
        slot_paths.check_restored_before_build(self)


@keras.saving.register_keras_serializable(package="keras_adamw")
class AdamW(Adam):
    """AdamW, a drop-in for `keras.optimizers.AdamW`, fused and exact.

    Adam with decoupled weight decay (Loshchilov & Hutter, 2019): each step
    first shrinks every variable by `variable * weight_decay * lr`, then
    takes the Adam step. Arguments are `keras_adamw.Adam`'s, with
    `weight_decay` defaulting to `0.004` and required.

    Args:
        learning_rate: See `keras_adamw.Adam`. Defaults to `0.001`.
        weight_decay: Non-negative float, `LearningRateSchedule` or
            zero-argument callable. Defaults to `0.004`.
        **kwargs: The other arguments of `keras_adamw.Adam`.

    Example:

    >>> opt = keras_adamw.AdamW(learning_rate=1e-3, weight_decay=0.01)
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
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        jit_compile=True,
        variable_rules=None,
        weight_decay_mode="lr_scaled",
        mesh=None,
        name=None,
        **kwargs,
    ):
        if weight_decay is None:
            raise ValueError(
                "Argument `weight_decay` must be a float. Received: "
                "weight_decay=None. AdamW needs a non-negative weight "
                "decay; use keras_adamw.Adam for none."
            )
        # Every named argument, as given, to Adam (the same names).
        arguments = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "kwargs", "__class__")
        }
        super().__init__(**arguments, **kwargs)
