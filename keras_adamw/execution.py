"""Where and how a step runs: the one place that picks the execution path.

Every write to the optimizer's state goes through `Programs.run`: a whole
step (`step.apply_step`, from `apply`), one variable's update
(`step.update_one`, from `update_step`) and the EMA overwrite
(`step.copy_averages`, from `finalize_variable_values`).

- The fused CPU kernel when `keras_adamw.fused.use_kernel` says so (the
  optimizer's `fused` argument): the function without XLA, whose
  per-variable update is one kernel call; traced once as a graph when
  called eagerly, built into the caller's graph inside a `tf.function`.
- `jit_compile=True`: the function compiled by XLA, one program for all
  variables of a step. `jit_compile=False`: the same function op by op.
- Without a `tf.distribute` strategy the program runs once on the
  variables. Under a strategy (after the gradients were summed across
  replicas) it runs once per local device, on that device's copies of the
  variables, from the cross-replica context: one program per device per
  step, rather than Keras' one update per variable.

Strategies that keep variables on other devices than the computation
(`ParameterServerStrategy`, `CentralStorageStrategy`) cannot run an XLA
program on them ("Trying to access resource ... located in device
/job:ps"): there the step runs op by op, with one warning.

Only public `tf.distribute` API is used (`merge_call`,
`experimental_local_results`, `extended.worker_devices`); TPUStrategy
implements all of it.
"""

import contextlib
import gc
import warnings

import tensorflow as tf

from keras_adamw import fused as fused_lib
from keras_adamw import kernels


def not_converted(function):
    """`function`, called as it is by autograph rather than converted.

    The optimizer's Python control flow runs over Python values only (the
    step's own conditions are explicit `tf.cond`s), so converting it buys
    nothing, and it costs: autograph converts the per-variable checks anew
    for every variable, about 0.1 s each on a step's first call inside a
    `tf.function` (measured, 500 variables on the fused kernel's path: 53 s
    converted against 4.4 s not).
    """
    return tf.autograph.experimental.do_not_convert(function)


@contextlib.contextmanager
def collector_paused():
    """Holds off Python's cyclic garbage collector while a step is built
    and run (a context manager, or a decorator as `@collector_paused()`).

    Tracing a step over thousands of variables creates hundreds of
    thousands of Python objects that live as long as the graph; each
    automatic collection walks them all again, which was about a third of
    the time to trace (1000 small variables: 21.4 -> 13.7 s). The
    collector is enabled again afterwards (also when the step raises), and
    left alone if the caller had disabled it.

    Example:

    >>> with collector_paused():
    ...     gc.isenabled()
    False
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


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


def choose_program(function, xla_program, jit_compile):
    """Returns the XLA program, or `function` to run op by op."""
    if not jit_compile:
        return function
    strategy = tf.distribute.get_strategy()
    if fused_lib.variables_are_remote(strategy):
        warnings.warn(
            f"jit_compile=True cannot run under {type(strategy).__name__}, "
            "whose variables live on other devices than the computation; "
            "keras_adamw runs the update without XLA.",
            stacklevel=2,
        )
        return function
    return xla_program


class Programs:
    """An optimizer's XLA programs, one per step function, compiled on first
    use.

    Held by the optimizer out of sight of TensorFlow's object tracking: a
    `tf.function` stored on a trackable object would be exported by
    `tf.saved_model.save`.

    Example:

    >>> from keras_adamw import step
    >>> programs = Programs()
    >>> programs.run(step.copy_averages, False, [], (), None, {}, None)
    """

    def __init__(self):
        self._compiled = {}
        self._graphs = {}
        # What `fused.variables_reason` said of this optimizer's variables.
        self._kernel_reasons = {}

    def compiled(self, function):
        """`function` compiled with XLA (made once)."""
        if function not in self._compiled:
            self._compiled[function] = tf.function(
                function, jit_compile=True, autograph=False
            )
        return self._compiled[function]

    def traced(self, function):
        """`function` as a `tf.function` without XLA (made once)."""
        if function not in self._graphs:
            self._graphs[function] = tf.function(function, autograph=False)
        return self._graphs[function]

    @not_converted
    def run(self, function, jit_compile, *arguments, guards=(), fused=False):
        """Runs `function` (a step function of `keras_adamw.step`) on
        `arguments` (gradients, indices, state, hyper, config) with the
        fused kernel (as `fused` and `keras_adamw.fused` decide), with XLA
        or op by op, where the variables live; see `run`."""
        gradients, indices, state, hyper, config = arguments
        if fused_lib.use_kernel(
            fused, function, state, config, self._kernel_reasons, gradients
        ):
            # The kernel's graph takes the place of the XLA program: traced
            # once when called eagerly; inside a caller's `tf.function`,
            # built into the caller's graph, where a function of its own
            # would take every variable and slot as an input again.
            if tf.executing_eagerly():
                program, use_program = self.traced(function), True
            else:
                program, use_program = None, False
            config = config._replace(fused=True)
        else:
            program = self.compiled(function) if jit_compile else None
            use_program = jit_compile
        run(
            function,
            program,
            use_program,
            gradients,
            indices,
            state,
            hyper,
            config,
            guards=guards,
        )


def _after_inputs(program, guards):
    """`program`, made to start only once its gradients and hyperparameters
    (and so every check that guards them) and `guards` have run.

    An XLA program waits for its inputs anyway; op by op inside a
    `tf.function`, an update that does not read a checked value (a
    momentum does not read the learning rate) could otherwise be written
    before a failing check stops the function: the step must happen
    completely or not at all.
    """

    def guarded(gradients, indices, state, hyper, config):
        waits = [
            kernels.cast_source(t)
            for t in tf.nest.flatten((gradients, hyper))
            if tf.is_tensor(t)
        ] + [g for g in guards if g is not None]
        if waits and not tf.executing_eagerly():
            # One op waits for them all; each op of the step then waits for
            # it alone (not for every gradient: thousands of edges each).
            waits = [tf.group(*waits)]
        with tf.control_dependencies(waits):
            return program(gradients, indices, state, hyper, config)

    return guarded


def run(
    function,
    xla_program,
    jit_compile,
    gradients,
    indices,
    state,
    hyper,
    config,
    guards=(),
):
    """Runs a step function where the variables of `state` live: once, or
    once per local device of the current strategy (entered from the replica
    context through `merge_call`). Nothing is written before every check
    has passed (see `_after_inputs`).

    Args:
        function: A function of `keras_adamw.step` taking
            `(gradients, indices, state, hyper, config)`.
        xla_program: `function` compiled with XLA.
        jit_compile: Whether to use it (see `choose_program`).
        gradients: Dense gradients, already summed across replicas.
        indices: Positions of the gradients' variables in `state`.
        state: A `step.State` of (possibly distributed) `tf.Variable`s.
        hyper: Dict of scalar hyperparameter tensors.
        config: A `step.StepConfig`.
        guards: Checks (assertion ops, or `None`) to pass before any write.
    """
    program = _after_inputs(
        choose_program(function, xla_program, jit_compile), guards
    )
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
