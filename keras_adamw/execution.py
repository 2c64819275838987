"""Where and how a step runs: the one place that picks the execution path.

- `jit_compile=True`: `step.apply_step` compiled by XLA, one program for all
  variables of a step. `jit_compile=False`: the same function op by op.
- Without a `tf.distribute` strategy the program runs once on the
  variables. Under a strategy (after the gradients were summed across
  replicas) it runs once per local device, on that device's copies of the
  variables, from the cross-replica context: one program per device per
  step, rather than Keras' one update per variable.

Only public `tf.distribute` API is used (`merge_call`,
`experimental_local_results`, `extended.worker_devices`); TPUStrategy
implements all of it.
"""

import tensorflow as tf


def local_copies(strategy, structure, replica):
    """Maps each distributed value in `structure` to its copy on local
    replica `replica`; values that are not distributed stay as they are."""

    def local(value):
        if value is None:
            return None
        copies = strategy.experimental_local_results(value)
        return copies[replica] if len(copies) > 1 else copies[0]

    return tf.nest.map_structure(local, structure)


def in_strategy():
    """Whether a non-default `tf.distribute` strategy is in effect."""
    return tf.distribute.has_strategy()


def run(program, gradients, indices, state, hyper, config):
    """Runs `program(gradients, indices, state, hyper, config)` where the
    variables of `state` live: once, or once per local device of the current
    strategy (entered from the replica context through `merge_call`).

    Args:
        program: `step.apply_step` or its XLA-compiled `tf.function`.
        gradients: Dense gradients, already summed across replicas.
        indices: Positions of the gradients' variables in `state`.
        state: A `step.State` of (possibly distributed) `tf.Variable`s.
        hyper: Dict of scalar hyperparameter tensors.
        config: A `step.StepConfig`.
    """
    if not in_strategy():
        program(gradients, indices, state, hyper, config)
        return

    def per_device(strategy, gradients, hyper):
        for replica, device in enumerate(strategy.extended.worker_devices):
            with tf.device(device):
                program(
                    local_copies(strategy, gradients, replica),
                    indices,
                    local_copies(strategy, state, replica),
                    local_copies(strategy, hyper, replica),
                    config,
                )

    replica_context = tf.distribute.get_replica_context()
    if replica_context is None:  # Cross-replica context: already merged.
        per_device(tf.distribute.get_strategy(), gradients, hyper)
    else:
        replica_context.merge_call(per_device, args=(gradients, hyper))
