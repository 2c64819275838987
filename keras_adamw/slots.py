"""The optimizer's slots: which exist, their names and their order.

Per model variable: `momentum` and `velocity`, `velocity_hat` with amsgrad,
and (made by the Keras base class) the EMA `average` and the
`gradient_accumulator`. Names are Keras' (`{variable path}_{slot}`) and the
order is Keras' (slots interleaved per variable, in build order), so
`.keras` files and checkpoints move between `keras_adamw` and
`keras.optimizers.Adam`/`AdamW`. Where a slot lives is the placement's
business (`keras_adamw.placement`).
"""

import keras
import tensorflow as tf

from keras_adamw import precision
from keras_adamw import validation

ADAM_SLOTS = ("momentum", "velocity")
AMSGRAD_SLOT = "velocity_hat"


def add_slots(optimizer, variables, names, dtype=None):
    """Adds slots `names` for each of `variables`, interleaved per variable
    as Keras' `add_optimizer_variables` does, of `dtype` (default: each
    variable's own; a list gives each variable its own, `None` entries
    meaning the variable's).

    Returns:
        One list of slots per name, aligned with `variables`.

    Example:

    >>> opt = keras_adamw.Adam()
    >>> w = keras.Variable([1.0], name="w")
    >>> momentums, velocities = add_slots(opt, [w], ["momentum", "velocity"])
    >>> velocities[0].name
    'w_velocity'
    """
    slots = tuple([] for _ in names)
    dtypes = dtype if isinstance(dtype, list) else [dtype] * len(variables)
    for variable, variable_dtype in zip(variables, dtypes):
        for slot_list, name in zip(slots, names):
            slot_list.append(
                optimizer.add_variable_from_reference(
                    variable, name=name, dtype=variable_dtype
                )
            )
    return slots


def adam_slots(optimizer, variables, amsgrad, moment_dtype=None):
    """Momentums, velocities and (amsgrad only, else `None`) velocity_hats,
    of `moment_dtype` (default: each variable's own dtype, as Keras; a list
    gives each variable its own).

    Example:

    >>> opt = keras_adamw.Adam()
    >>> m, v, v_hat = adam_slots(opt, [keras.Variable([1.0])], amsgrad=False)
    >>> len(m), v_hat
    (1, None)
    """
    momentums, velocities = add_slots(
        optimizer, variables, ADAM_SLOTS, moment_dtype
    )
    velocity_hats = None
    if amsgrad:
        (velocity_hats,) = add_slots(
            optimizer, variables, [AMSGRAD_SLOT], moment_dtype
        )
    return momentums, velocities, velocity_hats


class Slots:
    """The optimizer's variable-making methods, through its placement."""

    # Made by `build` with kahan_summation / skip_nonfinite only, so that
    # the default layout of `variables` stays Keras'.
    _compensations = None
    skipped_steps = None

    def _check_option_variables(self, variables):
        """Raises (before `build` changes anything) if an option does not
        apply to one of `variables`."""
        if self.kahan_summation:
            precision.check_kahan_variables(
                variables, validation.variable_name
            )

    def _build_option_slots(self, variables):
        """Makes the `compensation` slot of each variable (after all Adam
        slots) with kahan_summation, and the `skipped_steps` counter (last)
        with skip_nonfinite."""
        if self.kahan_summation:
            (self._compensations,) = add_slots(
                self, variables, [precision.COMPENSATION_SLOT]
            )
        if self.skip_nonfinite:
            # Counted like `iterations`: each replica counts the same.
            self.skipped_steps = self.add_variable(
                shape=(),
                dtype="int",
                aggregation="only_first_replica",
                name=precision.SKIPPED_STEPS,
            )

    def add_variable_from_reference(
        self,
        reference_variable,
        name=None,
        initializer="zeros",
        shape=None,
        dtype=None,
    ):
        """Adds an optimizer variable shaped like `reference_variable`.

        Overrides Keras to accept `shape` (Keras 2) and to make the slot
        through the optimizer's placement.

        Args:
            reference_variable: The model variable it belongs to.
            name: Suffix of the new variable's name (Keras 2 called this
                `variable_name`); the name is `{path}_{name}`.
            initializer: Keras initializer or its name. Defaults to zeros.
            shape: Optional shape, for a slot not shaped like the variable.
            dtype: Optional dtype; defaults to the variable's.

        Returns:
            The new `keras.Variable`, colocated with `reference_variable`.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> w = keras.Variable([1.0, 2.0], name="w")
        >>> tuple(opt.add_variable_from_reference(w, "norm", shape=()).shape)
        ()
        """
        return self._placement.add_slot(
            self,
            reference_variable,
            None if shape is None else tuple(shape),
            initializer,
            name,
            dtype=dtype,
        )

    def add_variable(
        self,
        shape,
        initializer="zeros",
        dtype=None,
        aggregation="none",
        layout=None,
        name=None,
    ):
        """Adds an optimizer variable.

        Overrides Keras to make it through the optimizer's placement (a
        replicated `DVariable` on a mesh unless `layout` says otherwise).

        Args:
            shape: Its shape.
            initializer: Keras initializer or its name. Defaults to zeros.
            dtype: Its dtype; defaults to `keras.backend.floatx()`.
            aggregation: How `tf.distribute` aggregates it.
            layout: Optional layout (a `dtensor.Layout` on a mesh).
            name: Its name.

        Returns:
            The new variable.

        Example:

        >>> tuple(keras_adamw.Adam().add_variable((2,), name="scratch").shape)
        (2,)
        """
        return self._placement.add_variable(
            self, shape, initializer, dtype, aggregation, layout, name
        )

    def _build_in_cross_replica_context(self, variables):
        """Builds on first use, also from a replica context inside a
        `tf.function` (where Keras 3 fails): slots are made once, eagerly,
        in the strategy's scope."""

        def build(*_):
            with tf.init_scope(), keras.name_scope(self.name, caller=self):
                self.build(variables)

        replica_context = tf.distribute.get_replica_context()
        if tf.distribute.has_strategy() and replica_context is not None:
            replica_context.merge_call(build)
        else:
            build()
