"""Moving the optimizer's state in and out: `set_weights`,
`save_own_variables` (what `.keras` files store) and `load_own_variables`.

A mixin of `keras_adamw.Adam`; values go through the optimizer's placement,
so a sharded `DVariable` is gathered when saved and keeps its layout when
loaded. Every entry is checked before any is written.
"""

import warnings

import numpy as np

from keras_adamw import validation


class StateIO:
    """`set_weights`, `save_own_variables`, `load_own_variables`."""

    def set_weights(self, weights):
        """Sets the optimizer's variables from a list of arrays.

        Overrides Keras to check every array before assigning any.

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
                "`optimizer.build(variables)` before `set_weights()`.")
        weights = list(weights)
        if len(weights) != len(self.variables):
            raise ValueError(
                f"Optimizer {self.name!r} has {len(self.variables)} variables "
                f"but `set_weights` received {len(weights)} arrays.")
        for variable, weight in zip(self.variables, weights):
            if tuple(variable.shape) != tuple(np.shape(weight)):
                raise ValueError(
                    "Optimizer variable "
                    f"{validation.variable_name(variable)!r} has shape "
                    f"{tuple(variable.shape)} but the array for it has shape "
                    f"{tuple(np.shape(weight))}.")
        for variable, weight in zip(self.variables, weights):
            self._placement.assign(variable, weight)

    def save_own_variables(self, store):
        """Writes the optimizer's variables to `store` (a dict-like) as
        arrays, keyed `"0"`, `"1"`, ... in the order of `variables`.

        Overrides Keras to gather sharded `DVariable`s first.

        Example:

        >>> opt = keras_adamw.Adam()
        >>> store = {}
        >>> opt.save_own_variables(store)
        >>> sorted(store)
        ['0', '1']
        """
        for i, variable in enumerate(self.variables):
            store[str(i)] = self._placement.numpy(variable)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` wrote. A count mismatch warns and
        loads nothing, as in Keras (an unbuilt optimizer has only two
        variables).

        Overrides Keras to keep each variable's layout on a mesh.

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
                stacklevel=2)
            return
        for i, variable in enumerate(self.variables):
            self._placement.assign(variable, store[str(i)])
