"""keras_adamw: exact, fused Adam and AdamW for Keras 3 on TensorFlow.

Example:

>>> import keras_adamw
>>> optimizer = keras_adamw.AdamW(learning_rate=1e-3, weight_decay=0.004)
"""

import os
import re
import sys
import tempfile

# TensorFlow's C++ code logs while `import tensorflow` runs and the runtime
# starts (oneDNN, CUDA stubs, cuInit); the first lines come before absl's
# logging is set up and ignore TF_CPP_MIN_LOG_LEVEL.
_CPP_LOG_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
)


def _running_demo():
    """Whether this process runs the demo: `python -m keras_adamw.demo`
    (Python imports this package first, with sys.argv[0] "-m") or
    keras_adamw/demo.py as a script (Bazel's py_binary)."""
    if sys.argv[:1] == ["-m"]:
        argv = getattr(sys, "orig_argv", [])
        return "-mkeras_adamw.demo" in argv or any(
            a == "-m" and b == "keras_adamw.demo"
            for a, b in zip(argv, argv[1:])
        )
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return bool(main) and os.path.realpath(main) == os.path.realpath(
        os.path.join(os.path.dirname(__file__), "demo.py")
    )


def _start_tensorflow_quietly():
    """For the demo only: imports TensorFlow and starts its runtime with
    TF_CPP_MIN_LOG_LEVEL=2 (unless set) and without the C++ log lines
    written to stderr meanwhile; any other output is kept. Importing
    keras_adamw anywhere else changes no process-wide setting."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_logical_devices()  # cuInit and the like
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            sys.stderr.write(
                "".join(
                    line
                    for line in text.splitlines(keepends=True)
                    if not _CPP_LOG_LINE.match(line)
                )
            )
            sys.stderr.flush()


if _running_demo():
    _start_tensorflow_quietly()

from keras_adamw import _keras_compat  # noqa: E402

_keras_compat.check_keras_version()

from keras_adamw import adam_math  # noqa: E402
from keras_adamw import dtensor  # noqa: E402
from keras_adamw import explain  # noqa: E402
from keras_adamw import rules  # noqa: E402
from keras_adamw.callbacks import OptimizerLogger  # noqa: E402
from keras_adamw.layerwise import layerwise_lr_decay  # noqa: E402
from keras_adamw.optimizers import Adam  # noqa: E402
from keras_adamw.optimizers import AdamW  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Adam",
    "AdamW",
    "OptimizerLogger",
    "adam_math",
    "dtensor",
    "explain",
    "layerwise_lr_decay",
    "rules",
]
