"""Trains a small model with keras_adamw.AdamW and keras.optimizers.AdamW.

Both start from the same weights and see the same batches; the demo prints
the losses as training goes, how far apart the two runs' weights are at the
end and, as its last line, the verdict: they agree to float32 rounding (exit
status 0), or how they differ (exit status 1). Bad flags or arguments exit
with status 2 and a one-line message.

Usage:

    python -m keras_adamw.demo --epochs=5 --learning_rate=3e-3

TensorFlow's start-up log lines are hidden when the demo runs as a program
(see keras_adamw/__init__.py); importing this module changes no setting.
"""

import os
import sys

from absl import app
from absl import flags

PROGRAM = "python -m keras_adamw.demo"
# Weights of the two runs closer than this agree: float32 rounding of a few
# hundred steps on weights of order 1 (typically 1e-7 to 1e-5 here).
AGREEMENT = 1e-4

FLAGS = flags.FLAGS
flags.DEFINE_integer(
    "epochs", 5, "Epochs to train each optimizer.", lower_bound=1
)
flags.DEFINE_integer("batch_size", 64, "Examples per step.", lower_bound=1)
flags.DEFINE_integer(
    "examples", 2048, "Size of the synthetic data set.", lower_bound=1
)
flags.DEFINE_float(
    "learning_rate", 3e-3, "AdamW learning rate.", lower_bound=0.0
)
flags.DEFINE_float(
    "weight_decay", 0.004, "AdamW decoupled weight decay.", lower_bound=0.0
)
flags.DEFINE_boolean(
    "jit_compile",
    True,
    "Run keras_adamw's update as one XLA program per step.",
)
flags.DEFINE_integer("seed", 0, "Seed for data and initial weights.")
flags.DEFINE_integer(
    "verbose",
    2,
    "Keras fit verbosity: 0, 1 or 2.",
    lower_bound=0,
    upper_bound=2,
)


def make_data(examples, seed):
    """A synthetic regression task: y = sin(x @ a) + noise."""
    import numpy as np

    rng = np.random.RandomState(seed)
    x = rng.randn(examples, 16).astype("float32")
    a = rng.randn(16, 4).astype("float32") / 4.0
    y = np.sin(x @ a) + 0.01 * rng.randn(examples, 4).astype("float32")
    return x, y


def make_model(seed):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="gelu"),
            keras.layers.Dense(64, activation="gelu"),
            keras.layers.Dense(4),
        ]
    )


def train(optimizer, x, y):
    """Fits a fresh model with `optimizer`; returns (losses, weights)."""
    model = make_model(FLAGS.seed)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(
        x,
        y,
        batch_size=FLAGS.batch_size,
        epochs=FLAGS.epochs,
        shuffle=False,
        verbose=FLAGS.verbose,
    )
    return history.history["loss"], [v.numpy() for v in model.weights]


def verdict(our_losses, their_losses, difference):
    """The demo's last line and exit status: whether the runs agree (their
    largest weight difference at most AGREEMENT) and, if not, how."""
    both = "keras_adamw and keras.optimizers.AdamW"
    if difference <= AGREEMENT:
        return f"{both} agree to {difference:.2g}", 0
    first = abs(our_losses[0] - their_losses[0]) / max(
        abs(their_losses[0]), 1e-30
    )
    if first <= 1e-5:
        why = (
            "their first epochs agree and they drift apart later: "
            "float32 rounding grown by training (try a smaller "
            "--learning_rate or fewer --epochs)"
        )
    else:
        why = (
            f"their first-epoch losses already differ by {first:.2g} "
            "relative: not float32 rounding, please report it with "
            "this command line"
        )
    return (
        f"{both} differ by {difference:.2g}, more than float32 "
        f"rounding ({AGREEMENT:g}): {why}"
    ), 1


def main(argv):
    del argv  # Checked by _parse_flags.
    # keras_adamw first: it starts TensorFlow quietly for the demo.
    import keras_adamw

    # isort: split
    import keras
    import numpy as np

    x, y = make_data(FLAGS.examples, FLAGS.seed)
    kwargs = dict(
        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay
    )
    print(f"keras_adamw.AdamW (jit_compile={FLAGS.jit_compile}):")
    ours, our_weights = train(
        keras_adamw.AdamW(jit_compile=FLAGS.jit_compile, **kwargs), x, y
    )
    print("keras.optimizers.AdamW:")
    theirs, their_weights = train(keras.optimizers.AdamW(**kwargs), x, y)

    print("\nepoch  keras_adamw.AdamW  keras.optimizers.AdamW")
    for epoch, (a, b) in enumerate(zip(ours, theirs), 1):
        print(f"{epoch:5d}  {a:17.6f}  {b:22.6f}")
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(our_weights, their_weights)
    )
    scale = max(float(np.max(np.abs(b))) for b in their_weights)
    print(
        f"\nloss: {ours[0]:.4f} -> {ours[-1]:.4f} (keras_adamw), "
        f"{theirs[0]:.4f} -> {theirs[-1]:.4f} (keras)"
    )
    print(
        f"largest weight difference after training: {difference:.3g} "
        f"(largest weight {scale:.3g})"
    )
    line, status = verdict(ours, theirs, difference)
    print(line)
    return status


def _usage_error(message):
    """A bad command line: one line on stderr, exit status 2."""
    sys.stderr.write(f"{PROGRAM}: {message} (--help lists the flags)\n")
    sys.exit(2)


def _parse_flags(argv):
    """Parses flags; a bad flag or any positional argument is a usage
    error (`_usage_error`). `--help` prints every flag and exits 0."""
    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        _usage_error(str(error).replace("\n", " "))
    if len(rest) > 1:
        _usage_error(
            "takes no positional arguments, got "
            + " ".join(repr(arg) for arg in rest[1:])
        )
    return rest


def run():
    # Quieter C++ logs where TensorFlow is not imported yet (a run as a
    # script); keras_adamw/__init__.py also hides the lines TensorFlow
    # prints before it reads this setting.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
