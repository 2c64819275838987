"""`keras_adamw.Adam` and `keras_adamw.AdamW`.

The classes orchestrate one optimizer step; the formula itself lives in
`keras_adamw.adam_math`. A step (`apply`) goes:

1. check the gradients and variables (nothing has changed yet if this raises);
2. build the slots on first use;
3. densify `tf.IndexedSlices` (summing duplicate indices);
4. evaluate the learning rate and callable hyperparameters in the caller's
   context, so a schedule or callable is read afresh every step;
5. run `_step`, either as one XLA program for all variables
   (`jit_compile=True`) or op by op (`jit_compile=False`). `_run_step` is
   the one place that chooses.

`_step` unscales, accumulates (when `gradient_accumulation_steps` is set),
clips, updates every variable with `adam_math.adam_update`, updates the EMA
once per real step, applies constraints and counts the step.

Keras version checked: 3.15.1. We override Keras' public `apply`,
`apply_gradients`, `build`, `update_step`, `exclude_from_weight_decay`,
`finalize_variable_values` and `set_weights`, and call
the base class' private `_get_variable_index`, `_var_key` and
`_trainable_variables`, all of them present in every Keras 3 release.
"""

import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_adamw import adam_math
from keras_adamw import execution
from keras_adamw import step
from keras_adamw import validation


class _Program:
    """Holds a `tf.function` out of sight of TensorFlow's object tracking.

    A `tf.function` stored directly on a trackable object is exported by
    `tf.saved_model.save`, which would try to serialize our step program.
    """

    def __init__(self, function):
        self.function = function


@keras.saving.register_keras_serializable(package="keras_adamw")
class Adam(keras.optimizers.Optimizer):
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
        mesh: A `tf.experimental.dtensor.Mesh` to run in DTensor mode (see
            `keras_adamw.dtensor`): slots are `DVariable`s laid out like their
            model variables, which must be `DVariable`s on this mesh.
        name: Name of the optimizer; defaults to `"adam"` (made unique as in
            Keras).

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
        **kwargs,
    ):
        # Every check runs before the base class creates any variable.
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} got unknown argument(s): "
                f"{sorted(kwargs)} (values {kwargs})."
            )
        learning_rate = validation.check_learning_rate(learning_rate)
        beta_1 = validation.check_number(
            "beta_1", beta_1, low=0.0, high=1.0, high_open=True,
            allow_callable=True, allow_tensor=True,
        )
        beta_2 = validation.check_number(
            "beta_2", beta_2, low=0.0, high=1.0, high_open=True,
            allow_callable=True, allow_tensor=True,
        )
        epsilon = validation.check_number("epsilon", epsilon, low=0.0)
        if weight_decay is not None:
            weight_decay = validation.check_number(
                "weight_decay", weight_decay, low=0.0
            )
        amsgrad = validation.check_bool("amsgrad", amsgrad)
        clipnorm, clipvalue, global_clipnorm = validation.check_clip_options(
            clipnorm, clipvalue, global_clipnorm
        )
        use_ema = validation.check_bool("use_ema", use_ema)
        ema_momentum = validation.check_number(
            "ema_momentum", ema_momentum, low=0.0, high=1.0
        )
        ema_overwrite_frequency = validation.check_positive_int_or_none(
            "ema_overwrite_frequency", ema_overwrite_frequency, 1
        )
        if loss_scale_factor is not None:
            loss_scale_factor = validation.check_number(
                "loss_scale_factor", loss_scale_factor, low=0.0
            )
            if loss_scale_factor == 0:
                raise ValueError(
                    "Argument `loss_scale_factor` must be > 0 or None. "
                    f"Received: loss_scale_factor={loss_scale_factor}"
                )
        gradient_accumulation_steps = validation.check_positive_int_or_none(
            "gradient_accumulation_steps", gradient_accumulation_steps, 2
        )
        jit_compile = validation.check_bool("jit_compile", jit_compile)
        placement = None
        if mesh is not None:
            from keras_adamw.dtensor.placement import MeshPlacement

            placement = (mesh if isinstance(mesh, MeshPlacement)
                         else MeshPlacement(mesh))

        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.jit_compile = jit_compile
        self.mesh = None
        self._placement = None
        self._excluded_variable_keys = set()
        self._excluded_name_pattern = None
        self._xla_program = _Program(
            tf.function(step.apply_step, jit_compile=True, autograph=False)
        )
        if placement is not None:
            self._use_mesh(placement)

    def _use_mesh(self, placement):
        """Switches to DTensor mode: the one place it is entered.

        Optimizer variables stay `keras.Variable`s, each holding a
        `DVariable` (`keras.Variable(dvariable)` wraps it as it is). The base
        class has already made the step counter and a float learning rate;
        they are moved onto the mesh as replicated scalars by re-initializing
        them with a `DVariable`: Keras' private `Variable._initialize` (checked
        with Keras 3.15.1) keeps a `tf.Variable` it is given.
        """
        self._placement = placement
        self.mesh = placement.mesh
        scalars = [self._iterations]
        if isinstance(self._learning_rate, keras.Variable):
            scalars.append(self._learning_rate)
        for variable in scalars:
            variable._initialize(placement.make_variable(
                tf.convert_to_tensor(variable.value), placement.replicated(0),
                name=variable.path))

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
            validation.check_variable(variable)
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(
                var_list, "velocity_hat"
            )

    def add_variable_from_reference(
        self, reference_variable, name=None, initializer="zeros", shape=None
    ):
        """Adds an optimizer variable shaped like `reference_variable`.

        Args:
            reference_variable: The model variable it belongs to.
            name: Suffix of the new variable's name (Keras 2 called this
                `variable_name`); the name is `{path}_{name}`.
            initializer: Keras initializer or its name. Defaults to zeros.
            shape: Optional shape, for a slot not shaped like the variable.

        Returns:
            The new `keras.Variable`, colocated with `reference_variable`.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> w = keras.Variable([1.0, 2.0], name="w")
        >>> opt.add_variable_from_reference(w, "norm", shape=()).shape
        ()
        """
        if self._placement is not None:
            return self._add_mesh_slot(
                reference_variable, name, initializer, shape)
        if shape is None:
            return super().add_variable_from_reference(
                reference_variable, name=name, initializer=initializer
            )
        prefix = validation.variable_name(reference_variable)
        prefix = prefix.replace("/", "_").replace(":", "_")
        return self.add_variable(
            shape=shape,
            initializer=initializer,
            dtype=reference_variable.dtype,
            name=f"{prefix}_{name or 'var'}",
        )

    def add_variable(self, shape, initializer="zeros", dtype=None,
                     aggregation="none", layout=None, name=None):
        """Adds an optimizer variable (a `DVariable` in DTensor mode,
        replicated unless `layout` says otherwise).

        Args:
            shape: Its shape.
            initializer: Keras initializer or its name. Defaults to zeros.
            dtype: Its dtype; defaults to `keras.backend.floatx()`.
            aggregation: How `tf.distribute` aggregates it.
            layout: Optional layout (a `dtensor.Layout` in DTensor mode).
            name: Its name.

        Returns:
            The new variable.

        Example:

        >>> keras_adamw.Adam().add_variable((2,), name="scratch").shape
        (2,)
        """
        if self._placement is None:
            return super().add_variable(
                shape, initializer=initializer, dtype=dtype,
                aggregation=aggregation, layout=layout, name=name)
        shape = tuple(shape)
        layout = layout or self._placement.replicated(len(shape))
        return self._add_mesh_variable(
            shape, initializer, dtype, layout, name)

    def _add_mesh_variable(self, shape, initializer, dtype, layout, name):
        dtype = dtype or keras.backend.floatx()
        value = keras.initializers.get(initializer)(shape, dtype=dtype)
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                self._placement.make_variable(value, layout, name=name),
                dtype=dtype, trainable=False, name=name)
        self._track_variable(variable)
        return variable

    def _add_mesh_slot(self, reference_variable, name, initializer, shape):
        """A slot `DVariable` laid out like its model variable (see
        `MeshPlacement.slot_layout`)."""
        self._placement.check_variable(reference_variable,
                                       validation.variable_name)
        prefix = validation.variable_name(reference_variable)
        prefix = prefix.replace("/", "_").replace(":", "_")
        if shape is None:
            shape = tuple(reference_variable.shape)
            layout = self._placement.slot_layout(
                validation.tf_variable(reference_variable).layout, shape)
        else:
            shape = tuple(shape)
            layout = self._placement.replicated(len(shape))
        return self._add_mesh_variable(
            shape, initializer, reference_variable.dtype, layout,
            f"{prefix}_{name or 'var'}")

    # ------------------------------------------------------------------
    # Weight decay.

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay. Call before `build`.

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
                f"{len(self._trainable_variables)} variables."
            )
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
        self._excluded_variable_keys = set(
            self._var_key(variable) for variable in (var_list or [])
        )
        self._excluded_name_pattern = (
            re.compile("|".join(var_names)) if var_names else None
        )

    def _decays(self, variable):
        """Whether weight decay applies to `variable`."""
        if self.weight_decay is None:
            return False
        if self._var_key(variable) in self._excluded_variable_keys:
            return False
        pattern = self._excluded_name_pattern
        if pattern is None:
            return True
        names = (variable.name, getattr(variable, "path", ""))
        return not any(pattern.search(n or "") for n in names)

    # ------------------------------------------------------------------
    # Applying gradients.

    def compute_gradients(self, loss, var_list, tape=None):
        """Computes the gradients of `loss` (scaled by `loss_scale_factor`).

        Args:
            loss: A tensor computed under `tape`, or a zero-argument callable
                returning the loss.
            var_list: Variables, or a zero-argument callable returning them
                (called after `loss`, so a model may build inside it).
            tape: The `tf.GradientTape` that recorded a tensor `loss`.

        Returns:
            A list of `(gradient, variable)` pairs.

        Example:

        >>> w = tf.Variable(2.0)
        >>> opt = keras_adamw.Adam()
        >>> float(opt.compute_gradients(lambda: w * w, [w])[0][0])
        4.0
        """
        if not callable(loss) and tape is None:
            raise ValueError(
                "`tape` is required when `loss` is a tensor rather than a "
                f"callable. Received: loss={loss!r}, tape=None"
            )
        tape = tape if tape is not None else tf.GradientTape()
        with tape:
            if callable(loss):
                loss = loss()
            if callable(var_list):
                var_list = var_list()
            var_list = list(var_list)
            if self.loss_scale_factor is not None:
                loss = self.scale_loss(loss)
        gradients = tape.gradient(loss, var_list)
        return list(zip(gradients, var_list))

    def minimize(self, loss, var_list, tape=None):
        """Computes gradients of `loss` and applies them.

        Args: as `compute_gradients`.

        Returns:
            The iteration counter variable.

        Example:

        >>> w = tf.Variable(2.0)
        >>> opt = keras_adamw.Adam(learning_rate=0.1)
        >>> _ = opt.minimize(lambda: w * w, [w])
        >>> round(float(w.numpy()), 4)
        1.9
        """
        grads_and_vars = self.compute_gradients(loss, var_list, tape=tape)
        return self.apply_gradients(grads_and_vars)

    def aggregate_gradients(self, grads_and_vars):
        """Sums gradients across replicas when called in a replica context of
        a `tf.distribute` strategy; returns them unchanged otherwise.

        Args:
            grads_and_vars: `(gradient, variable)` pairs.

        Returns:
            A list of `(gradient, variable)` pairs.

        Example:

        >>> w = tf.Variable(1.0)
        >>> keras_adamw.Adam().aggregate_gradients([(tf.constant(2.0), w)])
        [(<tf.Tensor: shape=(), dtype=float32, numpy=2.0>, <tf.Variable ...>)]
        """
        grads_and_vars = list(grads_and_vars)
        context = tf.distribute.get_replica_context()
        if context is None or not tf.distribute.has_strategy():
            return grads_and_vars
        present = [g for g, _ in grads_and_vars if g is not None]
        if not present:
            return grads_and_vars
        reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
        return [
            (None if g is None else next(reduced), v)
            for g, v in grads_and_vars
        ]

    def apply_gradients(
        self, grads_and_vars, name=None, skip_gradients_aggregation=False
    ):
        """Applies `(gradient, variable)` pairs.

        Args:
            grads_and_vars: Iterable of `(gradient, variable)` pairs.
            name: Ignored; kept for Keras 2 compatibility.
            skip_gradients_aggregation: If true, the gradients are taken as
                already summed across replicas.

        Returns:
            The iteration counter variable.

        Example:

        >>> w = tf.Variable([1.0, 2.0])
        >>> opt = keras_adamw.AdamW(learning_rate=0.1)
        >>> _ = opt.apply_gradients([(tf.constant([1.0, -1.0]), w)])
        >>> int(opt.iterations)
        1
        """
        del name
        grads_and_vars = list(grads_and_vars)
        self._apply(
            [g for g, _ in grads_and_vars],
            [v for _, v in grads_and_vars],
            aggregate=not skip_gradients_aggregation,
        )
        return self._iterations

    def apply(self, grads, trainable_variables=None):
        """Updates `trainable_variables` with `grads`.

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
            trainable_variables = self._trainable_variables
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
        self._check_distribution(trainable_variables)
        present, missing = self._check_pairs(grads, trainable_variables)
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
        indices = tuple(self._get_variable_index(v) for _, v in present)
        if self._placement is not None:
            gradients = [self._placement.place_gradient(g, v)
                         for g, v in present]
            hyper = self._placement.place_scalars(hyper)
        else:
            gradients = [adam_math.densify(g) for g, _ in present]
        self._run_step(gradients, indices, hyper)

    @property
    def learning_rate(self):
        """The learning rate of the current step (a schedule is evaluated).

        Setting it checks the value as the constructor does.
        """
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        value = validation.check_learning_rate(value)
        keras.optimizers.Optimizer.learning_rate.fset(self, value)

    def _check_pairs(self, grads, variables):
        """Checks gradients against variables; returns the pairs with a
        gradient and the names of the variables without one."""
        known = None
        if self.built:
            known = self._trainable_variables_indices
        present, missing = [], []
        for gradient, variable in zip(grads, variables):
            validation.check_variable(variable)
            if self._placement is not None:
                self._placement.check_variable(
                    variable, validation.variable_name)
            if known is not None and self._var_key(variable) not in known:
                raise ValueError(
                    f"Unknown variable {validation.variable_name(variable)!r}:"
                    f" optimizer {self.name!r} was built on other variables. "
                    "Create a new optimizer for a new set of variables."
                )
            if getattr(variable, "overwrite_with_gradient", False):
                raise NotImplementedError(
                    "Variables with `overwrite_with_gradient=True` (float8 "
                    "training) are not supported. Received: "
                    f"{validation.variable_name(variable)!r}"
                )
            if gradient is None:
                missing.append(validation.variable_name(variable))
            else:
                validation.check_gradient(gradient, variable)
                present.append((gradient, variable))
        if not present:
            raise ValueError(
                "No gradients provided for any variable. Variables: "
                f"{missing}"
            )
        return present, missing

    def _check_distribution(self, variables):
        """Under a strategy, the optimizer and the model variables must have
        been created in its scope, or copies would be updated twice."""
        if not execution.in_strategy():
            return
        extended = tf.distribute.get_strategy().extended
        for variable in [self._iterations] + list(variables):
            if not extended.variable_created_in_scope(
                    validation.tf_variable(variable)):
                raise ValueError(
                    f"Variable {validation.variable_name(variable)!r} was not "
                    "created in the scope of the current "
                    f"{type(tf.distribute.get_strategy()).__name__}: create "
                    "the model and the optimizer under `strategy.scope()`."
                )

    def _build_in_cross_replica_context(self, variables):
        """Builds on first use, also from a replica context inside a
        `tf.function` (where Keras 3 fails): slots are made once, eagerly,
        in the strategy's scope."""

        def build(*_):
            with tf.init_scope(), keras.name_scope(self.name, caller=self):
                self.build(variables)

        replica_context = tf.distribute.get_replica_context()
        if execution.in_strategy() and replica_context is not None:
            replica_context.merge_call(build)
        else:
            build()

    def _hyperparameters(self, learning_rate=None):
        """Evaluates the hyperparameters in the caller's context, so that a
        schedule, callable or changed attribute is seen at every step. A
        value computed now (by a schedule or callable) is range-checked."""
        if learning_rate is None:
            learning_rate = self.learning_rate
        ranges = {
            "learning_rate": dict(low=0.0),
            "beta_1": dict(low=0.0, high=1.0, high_open=True),
            "beta_2": dict(low=0.0, high=1.0, high_open=True),
            "epsilon": dict(low=0.0),
            "weight_decay": dict(low=0.0),
        }
        values = {
            "learning_rate": learning_rate,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "weight_decay": self.weight_decay,
        }
        computed = {"learning_rate": not isinstance(
            self._learning_rate, (keras.Variable, tf.Variable))}
        hyper = {}
        for name, value in values.items():
            if value is None:
                continue
            if callable(value) and not tf.is_tensor(value):
                value = value()
                computed[name] = True
            value = tf.convert_to_tensor(value, dtype_hint=tf.float64)
            if computed.get(name):
                value = validation.check_tensor_in_range(
                    name, value, **ranges[name])
            hyper[name] = value
        return hyper

    def _state(self):
        """The variables a step reads and writes, as a `step.State`."""

        def tf_variables(variables):
            return None if variables is None else [
                validation.tf_variable(v) for v in variables]

        return step.State(
            iterations=validation.tf_variable(self._iterations),
            variables=tf_variables(self._trainable_variables),
            momentums=tf_variables(self._momentums),
            velocities=tf_variables(self._velocities),
            velocity_hats=tf_variables(
                self._velocity_hats if self.amsgrad else None),
            averages=tf_variables(
                self._model_variables_moving_average if self.use_ema
                else None),
            accumulators=tf_variables(
                self._accumulated_gradients
                if self.gradient_accumulation_steps else None),
        )

    def _step_config(self):
        """The Python-level settings of a step, as a `step.StepConfig`."""
        variables = self._trainable_variables
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
            decays=tuple(self._decays(v) for v in variables),
            constraints=tuple(
                getattr(v, "constraint", None) for v in variables),
        )

    def _run_step(self, gradients, indices, hyper):
        """Runs one step: the XLA program or op by op (see `execution`)."""
        execution.run(self._xla_program.function, self.jit_compile,
                      gradients, indices, self._state(), hyper,
                      self._step_config())

    def update_step(self, gradient, variable, learning_rate):
        """Updates one variable: the single-variable path of the formula.

        Unlike Keras, whose base class applies weight decay outside
        `update_step`, this applies the whole AdamW step (decay included) to
        `variable` and its slots. The step counter is not advanced.

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
        index = self._get_variable_index(variable)
        state = self._state()
        config = self._step_config()
        hyper = self._hyperparameters(learning_rate)
        if self._placement is not None:
            gradient = self._placement.place_gradient(gradient, variable)
            hyper = self._placement.place_scalars(hyper)
        step.update_variable(
            adam_math.densify(gradient),
            index,
            step.real_iterations(state.iterations, config) + 1,
            state,
            hyper,
            config,
        )

    # ------------------------------------------------------------------
    # EMA, state and configuration.

    def finalize_variable_values(self, var_list):
        """With `use_ema`, overwrites `var_list` with their moving averages.

        Args:
            var_list: Model variables this optimizer was built with.

        Example:

        >>> w = keras.Variable([1.0])
        >>> opt = keras_adamw.Adam(use_ema=True)
        >>> opt.apply([tf.constant([1.0])], [w])
        >>> opt.finalize_variable_values([w])
        """
        if self.use_ema and self.built:
            indices = [self._get_variable_index(v) for v in var_list]
            step.copy_averages(self._state(), indices)

    def set_weights(self, weights):
        """Sets the optimizer's variables from a list of arrays.

        Args:
            weights: Arrays in the order of `optimizer.variables`.

        Raises:
            ValueError: If unbuilt, or the count or a shape differs. Nothing
                is assigned then.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> opt.build([keras.Variable([1.0])])
        >>> opt.set_weights([v.numpy() for v in opt.variables])
        """
        if not self.built:
            raise ValueError(
                f"Optimizer {self.name!r} is not built; call "
                "`optimizer.build(variables)` before `set_weights()`."
            )
        weights = list(weights)
        if len(weights) != len(self.variables):
            raise ValueError(
                f"Optimizer {self.name!r} has {len(self.variables)} variables "
                f"but `set_weights` received {len(weights)} arrays."
            )
        for variable, weight in zip(self.variables, weights):
            if tuple(variable.shape) != tuple(np.shape(weight)):
                raise ValueError(
                    "Optimizer variable "
                    f"{validation.variable_name(variable)!r} has shape "
                    f"{tuple(variable.shape)} but the array for it has shape "
                    f"{tuple(np.shape(weight))}."
                )
        for variable, weight in zip(self.variables, weights):
            self._assign_array(variable, weight)

    def _assign_array(self, variable, value):
        if self._placement is not None:
            self._placement.assign(variable, value)
        else:
            variable.assign(value)

    def save_own_variables(self, store):
        """Writes the optimizer's variables to `store` (a dict-like) as
        arrays, keyed `"0"`, `"1"`, ... in the order of `variables`. Sharded
        `DVariable`s are gathered first.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> store = {}
        >>> opt.save_own_variables(store)
        >>> sorted(store)
        ['0', '1']
        """
        for i, variable in enumerate(self.variables):
            store[str(i)] = (self._placement.numpy(variable)
                             if self._placement is not None
                             else np.asarray(variable.numpy()))

    def load_own_variables(self, store):
        """Loads what `save_own_variables` wrote, keeping each variable's
        layout in DTensor mode. A count mismatch warns and loads nothing,
        as in Keras (an unbuilt optimizer has only two variables).

        Example:

        >>> opt = keras_adamw.Adam()
        >>> opt.load_own_variables({"0": 0, "1": 0.5})
        >>> float(opt.learning_rate)
        0.5
        """
        if len(store.keys()) != len(self.variables):
            warnings.warn(
                f"Skipping variable loading for optimizer {self.name!r}: it "
                f"has {len(self.variables)} variables but the store has "
                f"{len(store.keys())}.",
                stacklevel=2,
            )
            return
        for i, variable in enumerate(self.variables):
            self._assign_array(variable, store[str(i)])

    def get_config(self):
        """Returns the constructor arguments as a serializable dict.

        Example:

        >>> keras_adamw.AdamW().get_config()["weight_decay"]
        0.004
        """
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "jit_compile": self.jit_compile,
            }
        )
        return config


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
        **kwargs,
    ):
        if weight_decay is None:
            raise ValueError(
                "Argument `weight_decay` of AdamW must be a non-negative "
                "float. Received: weight_decay=None (use keras_adamw.Adam "
                "for no weight decay)."
            )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            jit_compile=jit_compile,
            mesh=mesh,
            name=name,
            **kwargs,
        )
