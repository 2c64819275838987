"""How the optimizer holds its learning rate.

Keras' base class holds a float learning rate in a float32 variable (saved
in checkpoints, settable), or a schedule, or a callable. keras_adamw adds:

- a `tf.Variable` given as the learning rate is used itself (wrapped in a
  `keras.Variable`), so that `variable.assign(...)` changes the next step;
- beside Keras' float32 variable, a float64 copy of the float last set
  (made by the placement, not checkpointed), so a float64 model's update
  sees `0.1`, not `0.10000000149` (`hyperparams.exact_rate`);
- setting it checks the value as the constructor does.

A mixin of `keras_adamw.Adam`.
"""

import keras
import tensorflow as tf

from keras_adamw import _keras_compat
from keras_adamw import hyperparams


class Hidden:
    """Holds an object out of sight of TensorFlow's object tracking (a
    `tf.function` or variable on a trackable would be exported by
    SavedModel and checkpoints)."""

    def __init__(self, value):
        self.value = value


def base_class_rate(rate, placement):
    """What to give Keras' base class for the checked `rate`: a float in
    place of a `tf.Variable` (which `LearningRate._init_learning_rate` puts
    back), the rest as it is."""
    if isinstance(rate, tf.Variable):
        placement.check_variable(rate)
        return float(rate.numpy())
    return rate


class LearningRate:
    """The `learning_rate` property, and the variables behind it."""

    def _init_learning_rate(self, rate):
        """Called once the base class is constructed with
        `base_class_rate(rate)`. Returns the scalar variables the placement
        should adopt (Keras' float32 learning-rate variable, if used)."""
        self._exact_learning_rate = Hidden(None)
        if isinstance(rate, tf.Variable):
            self._use_learning_rate_variable(rate)
            return []
        if hyperparams.is_number(rate):
            self._exact_learning_rate = Hidden(
                self._placement.make_scalar(
                    rate, tf.float64, name="learning_rate_as_set"
                )
            )
        held = _keras_compat.learning_rate_value(self)
        return [held] if isinstance(held, keras.Variable) else []

    def _use_learning_rate_variable(self, variable):
        """Uses the user's `tf.Variable` as the learning rate (wrapped, not
        copied)."""
        with keras.name_scope(self.name, caller=self):
            wrapper = keras.Variable(
                variable,
                dtype=variable.dtype.name,
                trainable=False,
                name="learning_rate",
            )
        _keras_compat.use_learning_rate_variable(self, wrapper)
        self._exact_learning_rate = Hidden(None)

    @property
    def learning_rate(self):
        """The learning rate of the current step (a schedule is evaluated).

        Setting it checks the value as the constructor does; a `tf.Variable`
        is used itself.

        Example:

        >>> opt = keras_adamw.Adam(learning_rate=0.1)
        >>> opt.learning_rate = 0.05
        >>> round(float(opt.learning_rate), 6)
        0.05
        """
        return _keras_compat.current_learning_rate(self)

    @learning_rate.setter
    def learning_rate(self, value):
        value = hyperparams.check("learning_rate", value)
        if isinstance(value, tf.Variable):
            self._placement.check_variable(value)
            self._use_learning_rate_variable(value)
            return
        keras.optimizers.Optimizer.learning_rate.fset(self, value)
        exact = self._exact_learning_rate.value
        if exact is not None and hyperparams.is_number(value):
            self._placement.assign(exact, value)
        elif exact is not None:  # A schedule or callable from now on.
            self._exact_learning_rate = Hidden(None)
