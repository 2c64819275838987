"""The workloads of optimizer_step.py: the shapes of the variables every
implementation updates, and their initial weights and fixed gradients."""


def bert_shapes():
    """169 variables, 90,872,832 parameters."""
    shapes = [(7600, 768)]
    for _ in range(12):
        for _ in range(4):  # query, key, value, output projections
            shapes += [(768, 768), (768,)]
        shapes += [(768, 3072), (3072,), (3072, 768), (768,)]
        shapes += [(768,), (768,)]  # a layer norm's scale and offset
    return shapes


def small_shapes(count=2000):
    """`count` variables of 1024 to 4096 parameters, a few repeated shapes
    (as in a real model, where layers repeat)."""
    cycle = [
        (1024,),
        (32, 48),
        (2048,),
        (48, 64),
        (4096,),
        (64, 64),
        (1536,),
        (40, 80),
    ]
    return [cycle[i % len(cycle)] for i in range(count)]


def parse_size(text):
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "kmg" else text
    return int(float(number) * scale)


def sweep_shapes(total, count):
    size = max(1, total // count)
    return [(size,)] * count


def parts(workload, sweep_sizes, sweep_variables):
    """(title, shapes) of each part of `workload` ("bert", "small" or
    "sweep": one part per size in `sweep_sizes`)."""
    if workload == "bert":
        return [("bert", bert_shapes())]
    if workload == "small":
        return [("small", small_shapes())]
    return [
        (text, sweep_shapes(parse_size(text), sweep_variables))
        for text in sweep_sizes
    ]


def size(shape):
    """The number of elements of an array of `shape`."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def parameter_count(shapes):
    return sum(size(s) for s in shapes)


def describe(shapes, dtype):
    sizes = [size(s) for s in shapes]
    total = sum(sizes)
    return (
        f"{len(shapes)} variables, {total:,} parameters "
        f"({total / 1e6:.1f}M; smallest {min(sizes):,}, largest "
        f"{max(sizes):,}), {dtype}"
    )


def make_data(shapes, seed):
    """Initial weights and fixed gradients, float32 NumPy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = [
        (0.02 * rng.standard_normal(s, dtype=np.float32)) for s in shapes
    ]
    grads = [(1e-3 * rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    return weights, grads
