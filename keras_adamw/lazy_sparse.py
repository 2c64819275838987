"""`sparse_updates="lazy"`: update only the rows a sparse gradient touches.

With a `tf.IndexedSlices` gradient (an `Embedding`, `tf.gather`), the
default (`"dense"`) update is the exact dense-equivalent one: every row's
moments decay and every row moves, as if the untouched rows had a zero
gradient. `"lazy"` (tfa's `LazyAdam`) reads and writes only the rows
present: their weight decay, moments and weights; the other rows keep
their moments and weights. The cost is proportional to the rows touched,
not to the table.

Duplicate indices are summed first (`unique_rows`), so the velocity sees
`(g1 + g2)**2`. The update of the gathered rows is the same
`adam_math.update_with` as everywhere (`keras_adamw.step` calls it on the
rows `gather` returns and writes them back with `scatter`).
"""

import tensorflow as tf


def unique_rows(gradient, dtype):
    """`gradient` (a `tf.IndexedSlices`) with each index once, the rows of a
    repeated index summed in `dtype`.

    Example:

    >>> g = unique_rows(tf.IndexedSlices(tf.ones([3, 2]),
    ...     tf.constant([4, 1, 4]), tf.constant([6, 2])), tf.float32)
    >>> g.indices.numpy().tolist(), g.values.numpy().tolist()
    ([4, 1], [[2.0, 2.0], [1.0, 1.0]])
    """
    indices, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(
        tf.cast(gradient.values, dtype), positions, tf.size(indices)
    )
    return tf.IndexedSlices(values, indices, gradient.dense_shape)


def is_sparse(gradient):
    """Whether `gradient` is a `tf.IndexedSlices` (to update lazily).

    Example:

    >>> is_sparse(tf.constant([1.0]))
    False
    """
    return isinstance(gradient, tf.IndexedSlices)


def map_values(function, gradient):
    """`function` applied to a dense gradient, or to a sparse gradient's
    values (its indices kept).

    Example:

    >>> map_values(lambda x: x * 2, tf.constant([1.0])).numpy().tolist()
    [2.0]
    """
    if is_sparse(gradient):
        return tf.IndexedSlices(
            function(gradient.values), gradient.indices, gradient.dense_shape
        )
    return function(gradient)


def gather(variable, indices):
    """The rows `indices` of `variable` (a `tf.Variable`), read without
    reading the whole variable (`ResourceGather`).

    Example:

    >>> gather(tf.Variable([[1.0], [2.0], [3.0]]), tf.constant([2, 0])
    ...        ).numpy().tolist()
    [[3.0], [1.0]]
    """
    return variable.sparse_read(indices)


def scatter(variable, indices, rows):
    """Writes `rows` (cast to the variable's dtype) to rows `indices` of
    `variable`, the other rows untouched (`ResourceScatterUpdate`).

    Example:

    >>> v = tf.Variable([[1.0], [2.0]])
    >>> scatter(v, tf.constant([1]), tf.constant([[5.0]]))
    >>> v.numpy().tolist()
    [[1.0], [5.0]]
    """
    variable.scatter_update(
        tf.IndexedSlices(tf.cast(rows, variable.dtype), indices)
    )


def clip_gradients(clip, gradients):
    """Applies `clip` (a function of a list of dense tensors, such as
    `adam_math.clip_gradients`) to `gradients`, using a sparse gradient's
    values: with unique indices their norm is the dense gradient's.

    Example:

    >>> g = tf.IndexedSlices(tf.constant([[3.0, 4.0]]), tf.constant([1]),
    ...                      tf.constant([2, 2]))
    >>> (clipped,) = clip_gradients(
    ...     lambda gs: [x / 5.0 for x in gs], [g])
    >>> clipped.values.numpy().tolist()
    [[0.6..., 0.8...]]
    """
    clipped = clip([g.values if is_sparse(g) else g for g in gradients])
    return [
        tf.IndexedSlices(c, g.indices, g.dense_shape) if is_sparse(g) else c
        for c, g in zip(clipped, gradients)
    ]
