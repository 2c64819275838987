"""Callbacks that show what the optimizer is doing during `fit`."""

import keras
import numpy as np


class OptimizerLogger(keras.callbacks.Callback):
    """Adds the current learning rate and effective weight decay to `fit`'s
    logs, so they appear in the progress bar, in `History` and in
    `keras.callbacks.TensorBoard` (put this callback before it).

    - `learning_rate`: the rate of the next step (a schedule evaluated at
      the optimizer's step counter).
    - `weight_decay`: the optimizer's weight decay of the next step (a
      schedule evaluated at the step counter; 0 without weight decay);
    - `effective_weight_decay`: the fraction each decayed variable without
      a rule of its own shrinks by in that step: `learning_rate *
      weight_decay`, or `weight_decay` with
      `weight_decay_mode="independent"` (`explain()` gives it per
      variable);
    - `skipped_steps`: with `skip_nonfinite=True`, the number of steps
      skipped so far for non-finite gradients.

    Args:
        every_batch: Also log per batch (for `TensorBoard(update_freq=...)`
            and the progress bar), not only per epoch.

    Example:

    >>> import tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_adamw.AdamW(learning_rate=0.01),
    ...               loss="mse")
    >>> history = model.fit(
    ...     np.ones((8, 3)), np.ones((8, 1)), epochs=2, verbose=0,
    ...     callbacks=[keras_adamw.OptimizerLogger(),
    ...                keras.callbacks.TensorBoard(tempfile.mkdtemp())])
    >>> [round(lr, 6) for lr in history.history["learning_rate"]]
    [0.01, 0.01]
    """

    def __init__(self, every_batch=False):
        super().__init__()
        self.every_batch = every_batch

    def _values(self):
        optimizer = self.model.optimizer
        # LossScaleOptimizer (mixed precision) wraps the real optimizer.
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        learning_rate = float(
            np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate))
        )
        current = getattr(optimizer, "_current_weight_decay", None)
        if current is not None:  # keras_adamw: schedules evaluated.
            weight_decay = current()
        else:
            weight_decay = float(getattr(optimizer, "weight_decay", 0) or 0)
        independent = (
            getattr(optimizer, "weight_decay_mode", None) == "independent"
        )
        values = {
            "learning_rate": learning_rate,
            "weight_decay": weight_decay,
            "effective_weight_decay": weight_decay
            * (1.0 if independent else learning_rate),
        }
        skipped_steps = getattr(optimizer, "skipped_steps", None)
        if skipped_steps is not None:
            values["skipped_steps"] = int(np.asarray(skipped_steps.numpy()))
        return values

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batch and logs is not None:
            logs.update(self._values())

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._values())
