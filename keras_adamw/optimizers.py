"""`keras_adamw.Adam` and `keras_adamw.AdamW`: the Keras-facing classes.

A step (`apply`) goes:

1. check the gradients and variables (`validation`; nothing has changed
   yet if this raises);
2. build the slots on first use (`slots`, made through the `placement`);
3. bring the gradients (densified, duplicate indices summed) and the
   hyperparameters (`hyperparams.step_tensors`) to where the variables live;
4. hand the step to `execution`, which runs `step.apply_step` as one XLA
   program or op by op.

The formula is in `adam_math`; state I/O in `state_io`; the Keras 2 API in
`keras2_api`; every private Keras name in `_keras_compat`.
"""

import functools
import warnings

import keras

from keras_adamw import _keras_compat
from keras_adamw import call_checks
from keras_adamw import execution
from keras_adamw import hyperparams
from keras_adamw import keras2_api
from keras_adamw import learning_rate as learning_rate_lib
from keras_adamw import placement as placement_lib
from keras_adamw import slots
from keras_adamw import state_io
from keras_adamw import step
from keras_adamw import step_inputs
from keras_adamw import validation
from keras_adamw import weight_decay as weight_decay_lib


@keras.saving.register_keras_serializable(package="keras_adamw")
class Adam(
    hyperparams.HyperparameterAttributes,
    keras2_api.Keras2API,
    state_io.StateIO,
    slots.Slots,
    weight_decay_lib.WeightDecayExclusion,
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
            the Adam step), or `None`. Defaults to `None`.
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
        mesh: A `tf.experimental.dtensor.Mesh` (or its string form) to run in
            DTensor mode (see `keras_adamw.dtensor`): slots are `DVariable`s
            laid out like their model variables, which must be `DVariable`s
            on this mesh.
        name: Name of the optimizer; defaults to `"adam"` (made unique as in
            Keras).
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
        mesh=None,
        name=None,
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
        self._exclusions = weight_decay_lib.Exclusions()
        self._decay_mask = None
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
        var_list = list(var_list)
        for variable in var_list:
            call_checks.check_variable(variable)
            self._placement.check_variable(variable)
        super().build(var_list)
        self._momentums, self._velocities, self._velocity_hats = (
            slots.adam_slots(self, var_list, self.amsgrad)
        )
        self._build_decay_mask(var_list)

    # ------------------------------------------------------------------
    # Applying gradients.

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
        gradients = [self._placement.place_gradient(g, v) for g, v in present]
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
            [self._placement.place_gradient(gradient, variable)],
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
        optimizer's) says."""
        self._programs.value.run(
            function,
            self.jit_compile if jit_compile is None else jit_compile,
            gradients,
            indices,
            self._state(),
            self._placement.place_scalars(hyper),
            self._step_config(),
            guards=guards,
            fused=self.fused,
        )

    # ------------------------------------------------------------------
    # Hyperparameters and configuration.


@keras.saving.register_keras_serializable(package="keras_adamw")
class AdamW(Adam):
    """AdamW, a drop-in for `keras.optimizers.AdamW`, fused and exact.

    Adam with decoupled weight decay (Loshchilov & Hutter, 2019): each step
    first shrinks every variable by `variable * weight_decay * lr`, then
    takes the Adam step. Arguments are `keras_adamw.Adam`'s, with
    `weight_decay` defaulting to `0.004` and required.

    Args:
        learning_rate: See `keras_adamw.Adam`. Defaults to `0.001`.
        weight_decay: Non-negative float. Defaults to `0.004`.
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
        mesh=None,
        name=None,
        fused=None,
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
