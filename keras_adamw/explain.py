"""`optimizer.explain()`'s result: one row per model variable, printable as
a table."""

import collections

Row = collections.namedtuple(
    "Row",
    [
        "path",
        "shape",
        "dtype",
        "rules",
        "learning_rate_multiplier",
        "learning_rate",
        "weight_decay",
        "decay_per_step",
        "beta_1",
        "beta_2",
        "epsilon",
        "slot_dtype",
        "kahan_summation",
        "sparse_updates",
        "skip_nonfinite",
        "layout",
    ],
)
Row.__doc__ = """What the optimizer does to one variable.

- `rules`: the patterns of the rules that matched, in order;
- `learning_rate_multiplier` and `learning_rate` (the optimizer's current
  learning rate times the multiplier);
- `weight_decay`: the value applied to this variable (0.0 when excluded);
- `decay_per_step`: the fraction the variable shrinks by in the coming
  step (`weight_decay * learning_rate`, or `weight_decay` with
  `weight_decay_mode="independent"`);
- `beta_1`, `beta_2`, `epsilon`: the values the update uses;
- `slot_dtype`: the dtype of its momentum and velocity;
- `kahan_summation`, `sparse_updates`, `skip_nonfinite`: the precision
  and robustness options as they apply to it;
- `layout`: its layout on a DTensor mesh, else `None`.
"""

_HEADERS = {
    "learning_rate_multiplier": "lr x",
    "learning_rate": "lr",
    "decay_per_step": "decay/step",
    "kahan_summation": "kahan",
    "sparse_updates": "sparse",
    "skip_nonfinite": "skip nonfinite",
}


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ", ".join(repr(v) for v in value) or "-"
    return str(value)


class Explanation(list):
    """A list of `Row`s; `str()` gives an aligned text table.

    Example:

    >>> print(keras_adamw.AdamW(weight_decay=0.1).explain(
    ...     [keras.Variable([1.0], name="bias")]))  # doctest: +ELLIPSIS
    path  shape  dtype    rules  lr x  lr     weight_decay  decay/step ...
    bias  (1,)   float32  -      1     0.001  0.1           0.0001 ...
    """

    def __str__(self):
        names = list(Row._fields)
        table = [[_HEADERS.get(n, n) for n in names]]
        table += [[_cell(getattr(row, n)) for n in names] for row in self]
        widths = [
            max(len(line[i]) for line in table) for i in range(len(names))
        ]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
            for line in table
        )
