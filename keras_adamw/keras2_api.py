"""The Keras 2 (`tf_keras`) optimizer API on top of Keras 3's:
`compute_gradients`, `minimize`, `aggregate_gradients` and
`apply_gradients(..., skip_gradients_aggregation=)`.

A mixin of `keras_adamw.Adam`; it needs the optimizer's `_apply` (checks,
then one step) and Keras' `scale_loss`.
"""

import tensorflow as tf

from keras_adamw import _keras_compat


class Keras2API:
    """Keras 2's `compute_gradients`, `minimize`, `aggregate_gradients` and
    `apply_gradients` arguments."""

    def __repr__(self):
        """Names the class and, for tf_keras (Keras 2) models, the class to
        use instead: tf_keras' `model.compile` shows this in its "Could not
        interpret optimizer identifier" error, the one place a Keras 3
        optimizer given to a tf_keras model can say so.

        Example:

        >>> keras_adamw.AdamW(name="opt")  # doctest: +NORMALIZE_WHITESPACE
        <keras_adamw.AdamW 'opt': a Keras 3 optimizer; for a tf_keras
        (Keras 2) model use keras_adamw.tf_keras.AdamW>
        """
        package = type(self).__module__.rsplit(".optimizers", 1)[0]
        name = type(self).__name__
        return (
            f"<{package}.{name} {self.name!r}: a Keras 3 optimizer; for a "
            f"tf_keras (Keras 2) model use keras_adamw.tf_keras.{name}>"
        )

    __str__ = __repr__

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

        Overrides Keras to take Keras 2's `name` and
        `skip_gradients_aggregation` and return the step counter.

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
        return _keras_compat.iterations_variable(self)
