"""An independent float64 NumPy reference of Adam/AdamW, written for the tests.

It shares no code with `keras_adamw`. It follows Keras 3's AdamW formula and
orchestration (clip, weight decay, update, EMA, accumulation), with the
corrections `keras_adamw` documents: duplicate sparse indices are summed
(the caller passes the dense gradient), EMA moves once per real step, and the
bias correction uses the same beta as the moment update.
"""

import ml_dtypes
import numpy as np

# The NumPy dtype of each floating dtype the optimizer supports, by name.
NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
}


class NumpyAdam:
    """Float64 Adam/AdamW on a list of NumPy arrays.

    `learning_rate` may be a float or a function of the raw step counter
    (the number of `step` calls before this one), as Keras' schedules are.
    `beta_1`/`beta_2` may be zero-argument callables. `weight_decay` may
    be a float or, like `learning_rate`, a function of the raw step counter;
    `weight_decay_mode` is `"lr_scaled"` (`w -= w * wd * lr`) or
    `"independent"` (`w -= w * wd`).

    `per_variable` (one dict or `None` per weight) gives a weight its own
    `learning_rate_multiplier`, `weight_decay` (0 for none), `beta_1`,
    `beta_2` and `epsilon`, as resolved by hand in the test.

    `dtype` (a NumPy dtype such as `np.float16` or `ml_dtypes.bfloat16`)
    models variables stored in that dtype: the initial weights are rounded
    to it, and every weight and optimizer variable is rounded each time a
    step stores it; within a step the arithmetic is float64 on the stored
    values (a new moment is used unrounded, as it is computed, and rounded
    only where it is stored). Gradients are taken as given (the caller
    passes values the dtype holds, or their exact sum).

    `moment_dtype` stores the moments in that dtype instead (rounded where
    stored). `kahan_summation` keeps a compensation per weight, rounded to
    `dtype`: a step updates `weight + compensation` and stores the rounded
    result and what the rounding lost. `skip_nonfinite` skips (and counts in
    `skipped_steps`) a call with a non-finite (unscaled) gradient. `lazy`:
    `step(grads, rows=...)` updates only the listed rows of a variable.
    """

    def __init__(
        self,
        weights,
        learning_rate=1e-3,
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
        decay_mask=None,
        dtype=None,
        weight_decay_mode="lr_scaled",
        per_variable=None,
        moment_dtype=None,
        kahan_summation=False,
        skip_nonfinite=False,
    ):
        self.dtype = dtype
        self.moment_dtype = moment_dtype or dtype
        self.kahan_summation = kahan_summation
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.rows = None
        self.weights = [
            self._store(np.array(w, dtype=np.float64)) for w in weights
        ]
        self.momentums = [np.zeros_like(w) for w in self.weights]
        self.velocities = [np.zeros_like(w) for w in self.weights]
        self.velocity_hats = [np.zeros_like(w) for w in self.weights]
        self.averages = [np.zeros_like(w) for w in self.weights]
        self.accumulators = [np.zeros_like(w) for w in self.weights]
        self.compensations = [np.zeros_like(w) for w in self.weights]
        self.learning_rate = learning_rate
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.amsgrad = amsgrad
        self.weight_decay = weight_decay
        self.clipnorm, self.clipvalue = clipnorm, clipvalue
        self.global_clipnorm = global_clipnorm
        self.use_ema, self.ema_momentum = use_ema, ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.accumulation = gradient_accumulation_steps
        self.decay_mask = decay_mask or [True] * len(self.weights)
        self.weight_decay_mode = weight_decay_mode
        self.per_variable = [p or {} for p in per_variable or []] or [
            {} for _ in self.weights
        ]
        self.calls = 0  # Keras' raw `_iterations`.
        self.real_steps = 0  # Keras' `iterations`.

    def _store(self, x, dtype="weights"):
        """`x` as a variable of `dtype` holds it (float64 without one)."""
        dtype = self.dtype if dtype == "weights" else dtype
        if dtype is None:
            return x
        return np.asarray(x, np.float64).astype(dtype).astype(np.float64)

    def _store_moment(self, i, old, new):
        """The new moment as stored (in `moment_dtype`), only in `rows[i]`
        when the call is lazy for variable `i`."""
        return self._rows_only(i, old, self._store(new, self.moment_dtype))

    def _rows_only(self, i, old, new):
        if self.rows is None or self.rows[i] is None:
            return new
        result = old.copy()
        rows = np.unique(self.rows[i])
        result[rows] = new[rows]
        return result

    @staticmethod
    def _value(x):
        return float(x()) if callable(x) else float(x)

    def _lr(self):
        lr = self.learning_rate
        return float(lr(self.calls)) if callable(lr) else float(lr)

    def _clip(self, grads):
        if self.clipnorm:
            return [
                g * min(1.0, self.clipnorm / np.sqrt(np.sum(g * g)))
                if np.sum(g * g) > 0
                else g
                for g in grads
            ]
        if self.global_clipnorm:
            norm = np.sqrt(sum(np.sum(g * g) for g in grads))
            scale = min(1.0, self.global_clipnorm / norm)
            return [g * scale for g in grads]
        if self.clipvalue:
            return [np.clip(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    def step(self, grads, rows=None):
        """One optimizer call with dense float64 gradients (None = absent);
        `rows[i]`, if given, lists the rows a lazy update of variable `i`
        touches (the indices of its sparse gradient)."""
        grads = [
            None if g is None else np.asarray(g, np.float64) for g in grads
        ]
        if self.loss_scale_factor:
            grads = [
                None if g is None else g / self.loss_scale_factor
                for g in grads
            ]
        if self.skip_nonfinite and not all(
            np.all(np.isfinite(g)) for g in grads if g is not None
        ):
            self.skipped_steps += 1
            return
        self.rows = rows
        present = [i for i, g in enumerate(grads) if g is not None]
        if self.accumulation:
            if (self.calls + 1) % self.accumulation == 0:
                mean = [
                    (grads[i] + self.accumulators[i]) / self.accumulation
                    for i in present
                ]
                self._real_step(present, mean)
                self.accumulators = [
                    np.zeros_like(a) for a in self.accumulators
                ]
            else:
                for i in present:
                    self.accumulators[i] = self._store(
                        self.accumulators[i] + grads[i]
                    )
        else:
            self._real_step(present, [grads[i] for i in present])
        self.calls += 1

    def _weight_decay(self, i):
        """Variable `i`'s weight decay this step, or None."""
        if "weight_decay" in self.per_variable[i]:
            return self.per_variable[i]["weight_decay"] or None
        if self.weight_decay is None or not self.decay_mask[i]:
            return None
        wd = self.weight_decay
        return float(wd(self.calls)) if callable(wd) else float(wd)

    def _real_step(self, present, grads):
        grads = self._clip(grads)
        t = self.real_steps + 1
        for i, g in zip(present, grads):
            own = self.per_variable[i]
            lr = self._lr() * own.get("learning_rate_multiplier", 1.0)
            b1 = self._value(own.get("beta_1", self.beta_1))
            b2 = self._value(own.get("beta_2", self.beta_2))
            epsilon = own.get("epsilon", self.epsilon)
            alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            w = self.weights[i]
            if self.kahan_summation:
                w = w + self.compensations[i]
            wd = self._weight_decay(i)
            if wd is not None:
                scale = 1.0 if self.weight_decay_mode == "independent" else lr
                w = w - w * wd * scale
            m = self.momentums[i] + (g - self.momentums[i]) * (1 - b1)
            v = self.velocities[i] + (g * g - self.velocities[i]) * (1 - b2)
            self.momentums[i] = self._store_moment(i, self.momentums[i], m)
            self.velocities[i] = self._store_moment(i, self.velocities[i], v)
            if self.amsgrad:
                v = np.maximum(self.velocity_hats[i], v)
                self.velocity_hats[i] = self._store_moment(
                    i, self.velocity_hats[i], v
                )
            exact = w - alpha * m / (np.sqrt(v) + epsilon)
            weight = self._rows_only(i, self.weights[i], self._store(exact))
            if self.kahan_summation:
                self.compensations[i] = self._rows_only(
                    i, self.compensations[i], self._store(exact - weight)
                )
            self.weights[i] = weight
        if self.use_ema:
            momentum = self.ema_momentum if self.real_steps > 0 else 0.0
            self.averages = [
                self._store(momentum * a + (1 - momentum) * w)
                for a, w in zip(self.averages, self.weights)
            ]
            freq = self.ema_overwrite_frequency
            if freq and (self.real_steps + 1) % freq == 0:
                self.weights = [a.copy() for a in self.averages]
        self.real_steps += 1


def dense_from_sparse(indices, values, num_rows):
    """The dense gradient of a gather: rows of repeated indices are summed."""
    dense = np.zeros((num_rows,) + np.shape(values)[1:], np.float64)
    for index, row in zip(indices, values):
        dense[index] += row
    return dense
