"""The fused CPU kernel: `adamw_op.cc`, built on first use and loaded.

`adamw_op.cc` is a TensorFlow op doing the whole Adam/AdamW update of all
variables of a step in one pass per element on TensorFlow's CPU thread
pool (see its header; the formula over elements is `adamw_update.h`). It is
compiled against the TensorFlow that runs it:

- Why not at `pip install` time: pip builds a package in an isolated
  environment that holds only the build requirements (setuptools, wheel),
  not the target environment's TensorFlow, whose headers and
  `libtensorflow_framework.so` the op must be built against (the C++ ABI
  changes between TensorFlow releases). Declaring `tensorflow` as a build
  requirement would download and build against a second, possibly other,
  TensorFlow. So the wheel ships the source and the op is built lazily.
- When: the first time a step may use it (`keras_adamw.Adam(fused=None)`
  on CPU, the default), or ahead of time (say in a container image) with
  `python -c "from keras_adamw import kernels; kernels.load()"`.
  Building takes 12-20 s (g++ 12, 2 cores); the library is then reused
  from the cache.
- Where: `$KERAS_ADAMW_KERNEL_CACHE`, else `$XDG_CACHE_HOME/keras_adamw`,
  else `~/.cache/keras_adamw`, in a directory named by the TensorFlow
  version and a hash of the source, compiler flags and CPU (the build uses
  `-march=native`). A file lock makes concurrent processes build once.
- `$KERAS_ADAMW_KERNEL_LIBRARY` names a library built otherwise (Bazel's
  `//:adamw_op`), loaded as it is.
- Without a compiler (`$CXX`, else `g++`) or TensorFlow's headers, or with
  `KERAS_ADAMW_FUSED_KERNEL=0`, nothing is built: `load()` returns `None`,
  one log line says why, and the optimizers use the XLA path.

Example:

>>> reason = unavailable_reason()  # None once the kernel is built.
>>> reason is None or isinstance(reason, str)
True
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading

import tensorflow as tf

from keras_adamw.kernels import variable_group

try:
    import fcntl
except ImportError:  # Windows: no lock; the build is atomic anyway.
    fcntl = None

SOURCE = os.path.join(os.path.dirname(__file__), "adamw_op.cc")
# What the library is built from (SOURCE includes the header).
SOURCES = (SOURCE, os.path.join(os.path.dirname(__file__), "adamw_update.h"))
# -O3 and -fno-math-errno let GCC vectorise the loop (sqrt without errno);
# -ffp-contract=off keeps every multiply and add rounded separately, as the
# XLA path rounds them. AVX-512 FP16 is left out: Eigen's FP16 packet
# header that TensorFlow ships does not compile with GCC 12.
FLAGS = (
    "-shared",
    "-fPIC",
    "-O3",
    "-march=native",
    "-mno-avx512fp16",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-w",
)
_BUILD_TIMEOUT_S = 600

_logger = logging.getLogger("keras_adamw")
# The op's per-variable hyperparameter vectors, in its input order.
HYPERPARAMETERS = (
    "learning_rate_multiplier",
    "beta_1",
    "beta_2",
    "epsilon",
    "weight_decay",
)
_lock = threading.Lock()
_loaded = {}  # "module" or "reason", once tried in this process.


def _cpu_signature():
    """The CPU's feature flags (the build targets this CPU)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler():
    compiler = os.environ.get("CXX", "g++")
    return shutil.which(compiler), compiler


def cache_directory():
    """The directory holding the library built for this TensorFlow."""
    root = os.environ.get("KERAS_ADAMW_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME")
        or os.path.join(os.path.expanduser("~"), ".cache"),
        "keras_adamw",
    )
    digest = hashlib.sha256()
    for path in SOURCES:
        with open(path, "rb") as source:
            digest.update(source.read())
    for part in (
        FLAGS,
        tf.sysconfig.get_compile_flags(),
        tf.sysconfig.get_link_flags(),
        _compiler()[0],
        _cpu_signature(),
        sys.version,
    ):
        digest.update(repr(part).encode())
    return os.path.join(root, f"tf-{tf.__version__}-{digest.hexdigest()[:16]}")


def _build(library):
    """Compiles `SOURCE` into `library`; returns `None` or why not."""
    compiler, name = _compiler()
    if compiler is None:
        return f"no C++ compiler {name!r} found (set $CXX)"
    header = os.path.join(
        tf.sysconfig.get_include(), "tensorflow", "core", "framework", "op.h"
    )
    if not os.path.exists(header):
        return f"TensorFlow's C++ headers are missing ({header})"
    directory = os.path.dirname(library)
    # Once per TensorFlow version and machine: say why the first step
    # pauses.
    _logger.warning(
        "keras_adamw: building the fused CPU kernel for TensorFlow %s into "
        "%s (once; about 15 s).",
        tf.__version__,
        directory,
    )
    handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    command = [
        compiler,
        *FLAGS,
        *tf.sysconfig.get_compile_flags(),
        SOURCE,
        "-o",
        partial,
        *tf.sysconfig.get_link_flags(),
    ]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        os.unlink(partial)
        return f"{name} failed: {error}"
    if result.returncode != 0:
        os.unlink(partial)
        return f"{name} failed: {result.stderr.strip()[-2000:]}"
    os.replace(partial, library)  # Atomic: readers see all or nothing.
    return None


def _build_and_load():
    if os.environ.get("KERAS_ADAMW_FUSED_KERNEL", "1") == "0":
        return None, "disabled by KERAS_ADAMW_FUSED_KERNEL=0"
    try:
        prebuilt = os.environ.get("KERAS_ADAMW_KERNEL_LIBRARY")
        if prebuilt:  # Built elsewhere (Bazel's :adamw_op).
            return tf.load_op_library(os.path.abspath(prebuilt)), None
        directory = cache_directory()
        os.makedirs(directory, exist_ok=True)
        library = os.path.join(directory, "adamw_op.so")
        with open(os.path.join(directory, "lock"), "w") as lock:
            # One process builds; the others wait and load its library.
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(library):
                reason = _build(library)
                if reason is not None:
                    return None, reason
        return tf.load_op_library(library), None
    except Exception as error:  # Any failure leaves the XLA path working.
        return None, f"{type(error).__name__}: {error}"


def load():
    """The op module (building it first if needed), or `None` if it cannot
    be built here; then one log line says why (see `unavailable_reason`).
    """
    with _lock:
        if not _loaded:
            module, reason = _build_and_load()
            _loaded.update(module=module, reason=reason)
            if reason is not None:
                _logger.warning(
                    "keras_adamw: the fused CPU kernel is not available "
                    "(%s); the update runs on the XLA path.",
                    reason,
                )
    return _loaded["module"]


def unavailable_reason():
    """Why the kernel cannot be used here, or `None` if it can."""
    load()
    return _loaded["reason"]


def cast_source(tensor):
    """The tensor `tensor` was cast from, where it is a graph's `Cast` of a
    float16 or bfloat16 tensor (with no control inputs); else `tensor`.

    The kernel widens a half-precision gradient exactly as that cast does,
    so `apply_adam` takes the source: for bfloat16 this saves a float32
    copy of every gradient, a third of a step's memory traffic.
    `keras_adamw.execution` waits for the source too (a cast cannot fail),
    so a cast nothing else reads is pruned from the graph.

    Example:

    >>> with tf.Graph().as_default():
    ...     gradient = tf.zeros([2], tf.bfloat16)
    ...     cast_source(tf.cast(gradient, tf.float32)) is gradient
    True
    """
    op = getattr(tensor, "op", None)  # None for an EagerTensor.
    if (
        op is not None
        and op.type == "Cast"
        and not op.control_inputs
        and op.inputs[0].dtype in (tf.float16, tf.bfloat16)
    ):
        return op.inputs[0]
    return tensor


def apply_adam(
    variables,
    momentums,
    velocities,
    velocity_hats,
    gradients,
    learning_rate,
    hyper,
    step,
    independent_decay=False,
    compensations=(),
):
    """Calls the op: one Adam/AdamW update of every variable in the lists.

    Args:
        variables, momentums, velocities: Aligned lists of `tf.Variable`s
            (slots of one dtype: the variable's, float32 or bfloat16).
        velocity_hats: Aligned list with amsgrad, else `[]`.
        gradients: Dense gradients in each variable's compute dtype (or,
            for a half-precision variable, its own: see `cast_source`).
        learning_rate: The step's learning rate, a scalar.
        hyper: Dict of float64 vectors, one entry per variable (the
            names in `HYPERPARAMETERS`): `learning_rate_multiplier`,
            `beta_1`, `beta_2`, `epsilon` and `weight_decay` (0 for none).
        step: The 1-based step, an int64 scalar.
        independent_decay: `weight_decay_mode="independent"`: decay by
            `weight_decay` alone, not times the learning rate.
        compensations: With `kahan_summation`, each (half-precision)
            variable's compensation, aligned; else empty.
    """
    module = load()
    # The variables and slots go in as one group (see `variable_group`): a
    # step takes one input per variable (its gradient), not five.
    group = variable_group.variable_group(
        module,
        [*variables, *momentums, *velocities, *velocity_hats, *compensations],
    )
    sources = [cast_source(g) for g in gradients]
    return module.keras_adamw_apply_adam(
        group,
        [
            source if source.dtype == v.dtype else gradient
            for gradient, source, v in zip(gradients, sources, variables)
        ],
        tf.cast(learning_rate, tf.float64),
        *[tf.cast(hyper[name], tf.float64) for name in HYPERPARAMETERS],
        tf.cast(step, tf.int64),
        # Variables a function takes as arguments (the `state` of an eager
        # step's traced program): the op takes their handles, for ordering.
        variable_group.arguments([v.handle for v in variables]),
        independent_decay=independent_decay,
        kahan=bool(compensations),
    )
