"""Times `model.fit` epochs of a small transformer and a ResNet-like model
with keras_adamw.AdamW and keras.optimizers.AdamW, on one device and under
MirroredStrategy.

The transformer: token and position embeddings, --blocks blocks of
(LayerNormalization, causal MultiHeadAttention, residual; LayerNormalization,
Dense MLP with gelu, residual), a final LayerNormalization and a Dense
projection to the vocabulary, trained for next-token prediction on
synthetic token sequences. The ResNet-like model: a 3x3 convolution stem,
three stages of --resnet_blocks residual blocks (Conv2D, BatchNormalization,
ReLU, twice; a strided 1x1 projection where the width changes), global
average pooling and a Dense classifier, on synthetic 32x32 images whose
class is the brightest of 10 fixed patterns. Both optimizers start from the
same weights and see the same batches; `compile` keeps Keras' defaults
(jit_compile="auto", which turns XLA off for the model on CPU).
keras_adamw.AdamW() runs its default: the fused C++ kernel on CPU devices
(`--optimizers=keras_adamw_xla` adds its XLA path, `fused=False`).

Each (configuration, optimizer) pair runs in its own process: the mirrored
configuration splits the CPU into 2 logical devices before TensorFlow does
anything else, and two MirroredStrategy objects of different sizes in one
process can fail with collective group errors.

Usage:

    python benchmarks/fit_epoch.py
    python benchmarks/fit_epoch.py --models=resnet --configs=single --epochs=5
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models",
    ["transformer", "resnet"],
    "transformer: the small transformer; resnet: the ResNet-like model.",
)
flags.DEFINE_list(
    "configs",
    ["single", "mirrored"],
    "single: one CPU device. mirrored: MirroredStrategy over 2 "
    "logical CPU devices (the 2 cores are split in two).",
)
flags.DEFINE_list(
    "optimizers",
    ["keras_adamw", "keras"],
    "keras_adamw: keras_adamw.AdamW(); keras: keras.optimizers.AdamW(); "
    "keras_adamw_xla: keras_adamw.AdamW(fused=False).",
)
flags.DEFINE_integer(
    "epochs",
    4,
    "Epochs per run; the first (tracing and "
    "compilation) is reported separately.",
    lower_bound=2,
)
flags.DEFINE_integer(
    "examples", 768, "Synthetic sequences per epoch.", lower_bound=1
)
flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.", lower_bound=2)
flags.DEFINE_integer("vocab", 4000, "Vocabulary size.", lower_bound=2)
flags.DEFINE_integer("d_model", 128, "Model width.", lower_bound=1)
flags.DEFINE_integer("heads", 4, "Attention heads.", lower_bound=1)
flags.DEFINE_integer("ff", 512, "MLP hidden width.", lower_bound=1)
flags.DEFINE_integer("blocks", 2, "Transformer blocks.", lower_bound=1)
flags.DEFINE_integer(
    "resnet_blocks", 2, "Residual blocks per ResNet stage.", lower_bound=1
)
flags.DEFINE_integer(
    "resnet_width", 16, "Channels of the first ResNet stage.", lower_bound=1
)
flags.DEFINE_string(
    "child", None, "Internal: MODEL:CONFIG:OPTIMIZER to run here."
)
# --seed, --learning_rate, --weight_decay, --wait_idle and --child_output.
common.define_shared_flags()
flags.adopt_module_key_flags(common)

# What a child process gets from the parent, besides its run.
CHILD_FLAGS = (
    "epochs",
    "examples",
    "batch_size",
    "seq_len",
    "vocab",
    "d_model",
    "heads",
    "ff",
    "blocks",
    "resnet_blocks",
    "resnet_width",
    "learning_rate",
    "weight_decay",
    "seed",
)

OPTIMIZER_LABELS = {
    "keras_adamw": "keras_adamw.AdamW (fused kernel)",
    "keras_adamw_xla": "keras_adamw.AdamW(fused=False) (XLA)",
    "keras": "keras.optimizers.AdamW",
}
MODEL_LABELS = {"transformer": "transformer", "resnet": "ResNet-like"}
CONFIG_LABELS = {
    "single": "one CPU device",
    "mirrored": "MirroredStrategy, 2 logical CPUs",
}


def make_data(model):
    """(inputs, targets) of `model`."""
    return make_tokens() if model == "transformer" else make_images()


def make_images():
    """32x32x3 images: noise plus one of 10 fixed random patterns at a
    random brightness; the label is the pattern."""
    import numpy as np

    rng = np.random.default_rng(FLAGS.seed)
    patterns = rng.standard_normal((10, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, FLAGS.examples).astype(np.int32)
    scale = rng.uniform(0.5, 1.5, (FLAGS.examples, 1, 1, 1))
    noise = rng.standard_normal((FLAGS.examples, 32, 32, 3))
    images = (patterns[labels] * scale + noise).astype(np.float32)
    return images, labels


def make_resnet():
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    layers = keras.layers

    def conv_bn(x, width, stride=1, kernel=3, relu=True):
        x = layers.Conv2D(width, kernel, stride, "same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input((32, 32, 3))
    x = conv_bn(inputs, FLAGS.resnet_width)
    for stage in range(3):
        width = FLAGS.resnet_width * 2**stage
        for block in range(FLAGS.resnet_blocks):
            stride = 2 if stage and not block else 1
            shortcut = x
            if stride != 1 or x.shape[-1] != width:
                shortcut = conv_bn(x, width, stride, 1, relu=False)
            h = conv_bn(x, width, stride)
            h = conv_bn(h, width, relu=False)
            x = layers.ReLU()(h + shortcut)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def make_tokens():
    """Token sequences following t[i+1] = (5 t[i] + 7) mod vocab, with 10%
    of the tokens replaced by random ones; targets are the next tokens."""
    import numpy as np

    rng = np.random.default_rng(FLAGS.seed)
    tokens = np.empty((FLAGS.examples, FLAGS.seq_len + 1), np.int32)
    tokens[:, 0] = rng.integers(0, FLAGS.vocab, FLAGS.examples)
    for i in range(1, FLAGS.seq_len + 1):
        tokens[:, i] = (5 * tokens[:, i - 1] + 7) % FLAGS.vocab
    noise = rng.random(tokens.shape) < 0.1
    tokens[noise] = rng.integers(0, FLAGS.vocab, int(noise.sum()))
    return tokens[:, :-1], tokens[:, 1:]


def make_model(model):
    return make_transformer() if model == "transformer" else make_resnet()


def make_transformer():
    import keras

    class PositionEmbedding(keras.layers.Layer):
        def __init__(self, length, width, **kwargs):
            super().__init__(**kwargs)
            self.embedding = keras.layers.Embedding(length, width)
            self.length = length

        def call(self, x):
            return x + self.embedding(keras.ops.arange(self.length))

    keras.utils.set_random_seed(FLAGS.seed)
    inputs = keras.Input((FLAGS.seq_len,), dtype="int32")
    x = keras.layers.Embedding(FLAGS.vocab, FLAGS.d_model)(inputs)
    x = PositionEmbedding(FLAGS.seq_len, FLAGS.d_model)(x)
    for _ in range(FLAGS.blocks):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(
            FLAGS.heads, FLAGS.d_model // FLAGS.heads
        )(h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(FLAGS.ff, activation="gelu")(h)
        x = x + keras.layers.Dense(FLAGS.d_model)(h)
    x = keras.layers.LayerNormalization()(x)
    outputs = keras.layers.Dense(FLAGS.vocab)(x)
    return keras.Model(inputs, outputs)


def make_optimizer(name):
    import keras

    kwargs = dict(
        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay
    )
    if name.startswith("keras_adamw"):
        import keras_adamw

        return keras_adamw.AdamW(fused=name != "keras_adamw_xla", **kwargs)
    return keras.optimizers.AdamW(**kwargs)


def child(model_name, config, optimizer_name, output):
    """Trains in this process; writes epoch times and the loss as JSON."""
    import tensorflow as tf

    if config == "mirrored":
        # Before anything else touches the devices.
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    import keras

    x, y = make_data(model_name)
    if config == "mirrored":
        strategy = tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")][:2]
        )
    else:
        strategy = tf.distribute.get_strategy()
    result = {"replicas": strategy.num_replicas_in_sync}
    try:
        with strategy.scope():
            model = make_model(model_name)
            optimizer = make_optimizer(optimizer_name)
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
            )
        result["parameters"] = int(
            sum(int(tf.size(v)) for v in model.trainable_variables)
        )
        result["variables"] = len(model.trainable_variables)

        class EpochTimer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self.start)

        timer = EpochTimer()
        history = model.fit(
            x,
            y,
            batch_size=FLAGS.batch_size,
            epochs=FLAGS.epochs,
            shuffle=False,
            verbose=0,
            callbacks=[timer],
        )
        result.update(
            epoch_seconds=timer.times,
            steps_per_epoch=-(-FLAGS.examples // FLAGS.batch_size),
            loss=history.history["loss"],
            iterations=int(optimizer.iterations.numpy()),
            jit_compile=str(model.jit_compile),
        )
    except Exception as error:  # noqa: BLE001 - reported by the parent.
        result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][
            :400
        ]
    with open(output, "w") as f:
        json.dump(result, f)


def run_child(model, config, optimizer_name):
    load = common.OtherLoad().start()
    code, result = common.run_child(
        __file__, [f"--child={model}:{config}:{optimizer_name}"], CHILD_FLAGS
    )
    other = load.stop()
    if result is None:
        return {
            "error": f"the process exited with code {code}",
            "other_load": other,
        }
    result["other_load"] = other
    return result


def describe(model):
    if model == "transformer":
        return (
            f"transformer: embedding {FLAGS.vocab}x{FLAGS.d_model} + "
            f"positions, {FLAGS.blocks} blocks (MultiHeadAttention "
            f"{FLAGS.heads} heads, MLP {FLAGS.d_model}-{FLAGS.ff}-"
            f"{FLAGS.d_model}), Dense to {FLAGS.vocab}; next-token loss on "
            f"{FLAGS.examples} synthetic sequences of {FLAGS.seq_len} tokens"
        )
    return (
        f"ResNet-like: 3x3 stem, 3 stages x {FLAGS.resnet_blocks} residual "
        f"blocks of widths {FLAGS.resnet_width}/{2 * FLAGS.resnet_width}/"
        f"{4 * FLAGS.resnet_width} with BatchNormalization, pooling, Dense "
        f"to 10; classification of {FLAGS.examples} synthetic 32x32x3 "
        "images"
    )


def check_names(names, known, what):
    for name in names:
        if name not in known:
            raise app.UsageError(
                f"Unknown {what} {name!r}; use {sorted(known)}."
            )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    check_names(FLAGS.optimizers, OPTIMIZER_LABELS, "optimizer")
    check_names(FLAGS.configs, CONFIG_LABELS, "config")
    check_names(FLAGS.models, MODEL_LABELS, "model")
    if FLAGS.child:
        model, config, optimizer_name = FLAGS.child.split(":")
        child(model, config, optimizer_name, FLAGS.child_output)
        return

    lines = common.header(
        "fit_epoch: model.fit epoch time, keras_adamw.AdamW "
        "vs keras.optimizers.AdamW",
        ["tensorflow", "keras", "keras_adamw", "numpy"],
    )
    for model in FLAGS.models:
        lines.append(f"- {describe(model)}")
    lines.append(
        f"- global batch {FLAGS.batch_size}; compile() with Keras' "
        f"defaults; {FLAGS.epochs} epochs per run; 'later epochs' is the "
        f"median (and min-max) of epochs 2..{FLAGS.epochs}; each run in "
        "its own process"
    )
    lines.append("")
    print("\n".join(lines), flush=True)

    results = {}
    for model in FLAGS.models:
        for config in FLAGS.configs:
            for name in FLAGS.optimizers:
                if FLAGS.wait_idle:
                    common.wait_until_idle(FLAGS.wait_idle)
                common.log(
                    f"fit: {MODEL_LABELS[model]}, {CONFIG_LABELS[config]}, "
                    f"{OPTIMIZER_LABELS[name]}"
                )
                results[model, config, name] = run_child(model, config, name)
                common.log(f"    {results[model, config, name]}")
    for model in FLAGS.models:
        print_table(model, results)
    print(
        "'x Keras' = median later epoch / keras.optimizers.AdamW's in the "
        "same configuration (<1: faster than Keras). 'other load' = cores "
        "kept busy by other processes during the run (0 = quiet)."
    )


def print_table(model, results):
    import statistics

    first = next(
        (
            r
            for (m, _, _), r in results.items()
            if m == model and "parameters" in r
        ),
        None,
    )
    print(f"## {MODEL_LABELS[model]}\n")
    if first:
        print(
            f"{first['variables']} trainable variables, "
            f"{first['parameters']:,} parameters.\n"
        )
    print(
        "| configuration | optimizer | first epoch s | later epochs s "
        "(min-max) | ms/step | x Keras | first epoch loss | "
        "final loss | other load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for config in FLAGS.configs:
        reference = results.get((model, config, "keras"), {})
        reference_median = (
            statistics.median(reference["epoch_seconds"][1:])
            if "epoch_seconds" in reference
            else None
        )
        for name in FLAGS.optimizers:
            r = results[model, config, name]
            label = CONFIG_LABELS[config]
            if "epoch_seconds" not in r:
                print(
                    f"| {label} | {OPTIMIZER_LABELS[name]} | failed | | | "
                    f"| | | {r.get('other_load', float('nan')):.2f} |"
                )
                notes.append(
                    f"- {label}, {OPTIMIZER_LABELS[name]}: {r.get('error')}"
                )
                continue
            later = r["epoch_seconds"][1:]
            median = statistics.median(later)
            ratio = (
                f"{median / reference_median:.2f}" if reference_median else "-"
            )
            print(
                f"| {label} | {OPTIMIZER_LABELS[name]} | "
                f"{r['epoch_seconds'][0]:.2f} | {median:.2f} "
                f"({min(later):.2f}-{max(later):.2f}) | "
                f"{median / r['steps_per_epoch'] * 1e3:.1f} | {ratio} | "
                f"{r['loss'][0]:.4f} | {r['loss'][-1]:.4f} | "
                f"{r['other_load']:.2f} |"
            )
    print()
    if notes:
        print("Failures:")
        print("\n".join(notes) + "\n")


if __name__ == "__main__":
    app.run(main)
