"""Every private TensorFlow name keras_adamw uses, each behind a named
function (as `_keras_compat` does for Keras).

Checked against TensorFlow 2.21.0 (the version CI runs); a test
(`tests/test_architecture.py`) keeps `tensorflow.python` and
`tensorflow.dtensor.python` imports out of every other module.
"""


def in_xla_context():
    """Whether the graph being built is inside a function compiled by XLA
    (`control_flow_util.GraphOrParentsInXlaContext`); there is no public
    equivalent.

    Example:

    >>> in_xla_context()
    False
    """
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(
        ops.get_default_graph()
    )


def dtensor_device_started():
    """Whether this process' DTensor device exists
    (`dtensor.python.api._dtensor_singleton`; it starts at the first DTensor
    operation, not at `create_mesh`)."""
    from tensorflow.dtensor.python import api

    return getattr(api, "_dtensor_singleton", None) is not None


def register_resource_resolver(resolver):
    """Registers `resolver(op, reads, writes)` with `tf.function`'s
    automatic control dependencies
    (`auto_control_deps.register_acd_resource_resolver`): it may add
    resources an op reads or writes without taking them as inputs, so that
    other ops on them are ordered around it. Returns `resolver`."""
    from tensorflow.python.framework import auto_control_deps

    return auto_control_deps.register_acd_resource_resolver(resolver)
