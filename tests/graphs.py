"""Looking into traced graphs: which ops a `tf.function` built."""


def op_count(function, op_type):
    """How many ops of `op_type` the graphs of `tf.function` `function`
    hold, the functions they call included (each function counted once)."""
    counts = {}
    for concrete in function._list_all_concrete_functions():
        graph_def = concrete.graph.as_graph_def()
        counts[concrete.name] = sum(n.op == op_type for n in graph_def.node)
        for library_function in graph_def.library.function:
            counts[library_function.signature.name] = sum(
                n.op == op_type for n in library_function.node_def
            )
    return sum(counts.values())


def kernel_calls(function):
    """How many calls of the fused kernel `function`'s graphs hold."""
    return op_count(function, "KerasAdamwApplyAdam")
