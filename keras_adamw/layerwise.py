"""`layerwise_lr_decay`: the `variable_rules` of layer-wise learning-rate
decay, the usual recipe for fine-tuning a pretrained transformer (ELECTRA,
BEiT, ...): the head trains at the full rate, each earlier block at `decay`
times the rate of the block after it, the embeddings slowest of all."""

import re

from keras_adamw import rules
from keras_adamw import validation

# A block is a path component ending in "layer" or "block", maybe plural,
# with a "_<n>" suffix, or starting so ("encoder_layer_3_norm" belongs to
# block 3). Keras names the first of several "transformer_block", then
# "transformer_block_1", ...: no suffix is 0.
BLOCK_PATTERN = (
    r"(?:^|/)(?P<block>[^/]*?(?:layer|block)s?"
    r"(?:_(?P<index>\d+)(?=[/_])|(?=/)))"
)
EMBEDDING_PATTERN = r"embed"


def _paths(model_or_paths):
    variables = getattr(model_or_paths, "trainable_variables", None)
    items = model_or_paths if variables is None else variables
    if isinstance(items, str):
        raise TypeError(
            "Argument `model_or_paths` must be a model or a list of variable "
            f"paths. Received the string {items!r}; pass [{items!r}]."
        )
    return [p if isinstance(p, str) else rules.variable_path(p) for p in items]


def layerwise_lr_decay(
    model_or_paths,
    decay,
    *,
    block_pattern=BLOCK_PATTERN,
    embedding_pattern=EMBEDDING_PATTERN,
):
    """Returns `variable_rules` for layer-wise learning-rate decay.

    With `L` blocks (numbered by `block_pattern` in the variables' paths),
    block `k` (0 = nearest the input) gets the learning-rate multiplier
    `decay ** (L - k)`, variables whose path matches `embedding_pattern`
    get `decay ** (L + 1)`, and everything else (the head, a final norm)
    keeps 1.0, as in BEiT and ELECTRA. Combine with other rules by
    concatenating lists: each setting comes from the first matching rule
    that sets it, so `[("bias|norm", {"weight_decay": 0.0})] + rules` also
    excludes biases and norms from weight decay.

    Args:
        model_or_paths: A built Keras model, or a list of variables or of
            variable paths.
        decay: The factor per block, in `(0, 1]` (e.g. 0.65 to 0.95).
        block_pattern: A regular expression searched in each path whose
            match names a block; its named group `index` is the block number
            (absent: 0). The default matches path components ending in
            `layer` or `block` (`"encoder_layer_3/"`, `"transformer_block/"`).
        embedding_pattern: A regular expression for the embeddings.

    Returns:
        A list of `(pattern, {"learning_rate_multiplier": m})` rules.

    Raises:
        ValueError: If `decay` is outside `(0, 1]` or no block is found.

    Example (a BERT-like model with two named blocks):

    >>> inputs = keras.Input((4,), dtype="int32")
    >>> x = keras.layers.Embedding(10, 8, name="token_embedding")(inputs)
    >>> for i in range(2):
    ...     x = keras.layers.Dense(8, name=f"encoder_layer_{i}")(x)
    >>> outputs = keras.layers.Dense(2, name="head")(x)
    >>> model = keras.Model(inputs, outputs)
    >>> for pattern, overrides in layerwise_lr_decay(model, 0.5):
    ...     print(pattern, overrides)
    embed {'learning_rate_multiplier': 0.125}
    (?:^|/)encoder_layer_1(?=[/_]) {'learning_rate_multiplier': 0.5}
    (?:^|/)encoder_layer_0(?=[/_]) {'learning_rate_multiplier': 0.25}
    >>> opt = keras_adamw.AdamW(
    ...     variable_rules=layerwise_lr_decay(model, 0.5)
    ...     + [("bias", {"weight_decay": 0.0})])
    """
    decay = validation.check_number("decay", decay, low=0.0, high=1.0)
    if decay == 0:
        raise ValueError(
            "Argument `decay` must be in (0, 1]. Received: decay=0.0"
        )
    blocks = {}  # The matched block component -> its number.
    for path in _paths(model_or_paths):
        if re.search(embedding_pattern, path):
            continue
        found = re.search(block_pattern, path)
        if found:
            index = found.group("index")
            blocks[found.group("block"), index is None] = int(index or 0)
    if not blocks:
        raise ValueError(
            f"No block found: no variable path matches block_pattern="
            f"{block_pattern!r}. Name the blocks (`name=f'layer_{{i}}'`) or "
            "pass a `block_pattern` whose group `index` is the block number."
        )
    count = max(blocks.values()) + 1
    result = [
        (
            embedding_pattern,
            {"learning_rate_multiplier": decay ** (count + 1)},
        )
    ]
    for (block, bare), index in sorted(blocks.items(), key=lambda b: -b[1]):
        # "layer_1" must not match "layer_10"; a bare "transformer_block" must
        # not match "transformer_block_1".
        end = "/" if bare else "(?=[/_])"
        result.append(
            (
                "(?:^|/)" + re.escape(block) + end,
                {"learning_rate_multiplier": decay ** (count - index)},
            )
        )
    return result
