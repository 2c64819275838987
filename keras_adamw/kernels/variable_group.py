"""Variable groups: a step's variables and slots behind one handle.

A `tf.function` pays about 5 us per captured input on every call (measured
here, TensorFlow 2.21: 6000 captured variable handles cost 29 ms a call
against 3 ms for the same 6000 tensors made inside the graph), and
TensorFlow's graph optimizations on a function's first call grow faster
than linearly with an op's inputs (one op taking 2000 handles: 1.8 s;
4000: 4.2 s). So the kernel takes one `KerasAdamwVariableGroup` handle
holding the step's variables and all their slots, and the gradients. The
variables and slots stay ordinary per-variable `tf.Variable`s (checkpoints,
`.keras` files and `set_weights` see Keras' slots); the group only
references their buffers.

A group is made once per list of variables (eagerly, on their device) and
forgotten when one of them is deleted.

Ordering: `tf.function` orders ops on a resource by the handles they take.
The kernel does not take its variables' handles, so `resolve_group_writes`
(registered with TensorFlow's automatic control dependencies) tells it that
an op taking a group writes the group's variables: a read of a variable or
slot in the same function as a step (a forward pass before it, an EMA after
it, also inside `tf.cond` branches) is ordered as if the kernel took the
variable's handle. That sees variables the function captures; those it
takes as arguments (`arguments`) the kernel op takes itself.
"""

import threading
import weakref

import tensorflow as tf

from keras_adamw import _tf_compat

_lock = threading.Lock()
# (id of each variable) -> the group's handle (an EagerTensor).
_groups = {}
# id(group handle) -> the variables' handles, for `resolve_group_writes`.
_member_handles = {}
# Per FuncGraph: id(captured EagerTensor) -> its placeholder, and back.
_captures = weakref.WeakKeyDictionary()


def _forget(key):
    with _lock:
        handle = _groups.pop(key, None)
        if handle is not None:
            _member_handles.pop(id(handle), None)


def variable_group(module, variables):
    """The handle of the group of `variables` (made with `module`'s op on
    first use, eagerly).

    Args:
        module: The loaded op library (`keras_adamw.kernels.load()`).
        variables: The step's variables, then their momentums, velocities
            and (with amsgrad) velocity hats and (with kahan_summation)
            compensations, each list aligned with the variables.
    """
    key = tuple(id(variable) for variable in variables)
    with _lock:
        handle = _groups.get(key)
    if handle is not None:
        return handle
    with tf.init_scope(), tf.device(variables[0].device):
        handles = [variable.handle for variable in variables]
        handle = module.keras_adamw_variable_group(handles)
    with _lock:
        _groups[key] = handle
        _member_handles[id(handle)] = handles
    for variable in variables:
        weakref.finalize(variable, _forget, key)
    return handle


def arguments(handles):
    """The handles among `handles` of variables that the function being
    traced, or one around it, takes as arguments (`tf.function` maps such a
    handle to an input, not a capture: `resolve_group_writes` cannot see
    it, so the kernel op takes these handles itself, for ordering only)."""
    inputs = set()
    graph = tf.compat.v1.get_default_graph()
    while hasattr(graph, "inputs"):  # A FuncGraph; a tf.Graph has none.
        inputs.update(id(tensor) for tensor in graph.inputs)
        graph = getattr(graph, "outer_graph", None)
    return [handle for handle in handles if id(handle) in inputs]


def _capture_maps(graph):
    """(external id -> internal, internal id -> external) of `graph`'s
    captures (a `FuncGraph`, also a `tf.cond` branch: TensorFlow captures
    an EagerTensor into a nested graph directly)."""
    captures = graph.captures
    maps = _captures.get(graph)
    if maps is None or maps[2] != len(captures):
        maps = (
            {id(external): internal for external, internal in captures},
            {id(internal): external for external, internal in captures},
            len(captures),
        )
        _captures[graph] = maps
    return maps[0], maps[1]


@_tf_compat.register_resource_resolver
def resolve_group_writes(op, reads, writes):
    """Adds the variables of every group `op` takes to the resources it
    writes (for `tf.function`'s automatic control dependencies)."""
    if not _member_handles or getattr(op.graph, "captures", None) is None:
        return False
    to_internal, to_external = None, None
    added = []
    for resource in list(reads) + list(writes):
        if resource.op.type != "Placeholder":
            continue
        if to_internal is None:
            to_internal, to_external = _capture_maps(op.graph)
        external = to_external.get(id(resource))
        for member in _member_handles.get(id(external), ()):
            internal = to_internal.get(id(member))
            if internal is not None and internal not in writes:
                added.append(internal)
    writes.update(added)
    return bool(added)
