"""Slot groups: the slots of many variables behind one handle.

A `tf.function` pays about 5 us per captured input on every call (measured
here, TensorFlow 2.21: 6000 captured variable handles cost 29 ms a call
against 3 ms for the same 6000 tensors made inside the graph). A step of
the fused kernel that took each variable's momentum and velocity as inputs
spent most of its time there for 2000 small variables. So the kernel takes
the variables and one `KerasAdamwSlotGroup` handle holding all their slots;
the slots stay ordinary per-variable `tf.Variable`s (checkpoints, `.keras`
files and `set_weights` see Keras' slots), and the group only references
their buffers.

A group is made once per list of slot variables (eagerly, on their
device) and forgotten when one of them is deleted.

Ordering: `tf.function` orders ops on a resource by the handles they take.
The kernel does not take its slots' handles, so `resolve_slot_writes`
(registered with TensorFlow's automatic control dependencies) tells it
that an op taking a group writes the group's slots: a read of a slot in
the same function as a step sees the step's value.
"""

import threading
import weakref

import tensorflow as tf

from keras_adamw import _tf_compat

_lock = threading.Lock()
# (id of each slot variable) -> the group's handle (an EagerTensor).
_groups = {}
# id(group handle) -> the slots' handles, for `resolve_slot_writes`.
_slot_handles = {}
# Per FuncGraph: id(captured EagerTensor) -> its placeholder, and back.
_captures = weakref.WeakKeyDictionary()


def _forget(key):
    with _lock:
        handle = _groups.pop(key, None)
        if handle is not None:
            _slot_handles.pop(id(handle), None)


def slot_group(module, slots):
    """The handle of the group of `slots` (made with `module`'s op on
    first use, eagerly).

    Args:
        module: The loaded op library (`keras_adamw.kernels.load()`).
        slots: The slot variables: momentums, then velocities, then (with
            amsgrad) velocity hats, aligned with the step's variables.
    """
    key = tuple(id(slot) for slot in slots)
    with _lock:
        handle = _groups.get(key)
    if handle is not None:
        return handle
    with tf.init_scope(), tf.device(slots[0].device):
        handles = [slot.handle for slot in slots]
        handle = module.keras_adamw_slot_group(handles)
    with _lock:
        _groups[key] = handle
        _slot_handles[id(handle)] = handles
    for slot in slots:
        weakref.finalize(slot, _forget, key)
    return handle


def _capture_maps(graph):
    """(external id -> internal, internal id -> external) of `graph`'s
    captures (a `FuncGraph`; none for another graph)."""
    captures = getattr(graph, "captures", None)
    if captures is None:
        return {}, {}
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
def resolve_slot_writes(op, reads, writes):
    """Adds the slots of every group `op` takes to the resources it writes
    (for `tf.function`'s automatic control dependencies)."""
    if not _slot_handles:
        return False
    to_internal, to_external = None, None
    added = []
    for resource in list(reads) + list(writes):
        if resource.op.type != "Placeholder":
            continue
        if to_internal is None:
            to_internal, to_external = _capture_maps(op.graph)
        external = to_external.get(id(resource))
        slots = None if external is None else _slot_handles.get(id(external))
        for slot in slots or ():
            internal = to_internal.get(id(slot))
            if internal is not None and internal not in writes:
                added.append(internal)
    writes.update(added)
    return bool(added)
