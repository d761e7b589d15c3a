"""Reading the data flow recorded in the trace: who feeds whom (helpers for rules)."""

from __future__ import annotations

from trainlint.trace import LayerTrace, RunTrace

# Leaf modules that pass their input on without weights: look through them.
PASS_THROUGH = (
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout",
    "Identity", "Flatten", "Unflatten", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d",
    "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "Upsample", "ZeroPad2d", "ConstantPad2d",
)
# Plain ops that only move or reshape data.
SHAPE_OPS = frozenset({
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "__getitem__", "expand", "unflatten", "view_as", "reshape_as", "t", "chunk", "split",
    "narrow", "movedim", "to", "float", "type", "clone", "detach",
})
# Leaf module types that hold weights applied to their input.
WEIGHT_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d", "Bilinear", "LazyLinear", "LSTM", "GRU", "RNN",
                 "NonDynamicallyQuantizableLinear", "Conv1D")


def successors(trace: RunTrace, node: tuple) -> list[tuple]:
    """Direct consumers of ``node``: (dst, via) pairs."""
    return [(e.dst, e.via) for e in trace.edges if e.src == node]


def output_nodes(trace: RunTrace, module: str) -> list[tuple]:
    """The observation nodes of a leaf module's output."""
    return [lt.node for lt in trace.layers if lt.module == module and lt.op == "output"]


def downstream(trace: RunTrace, node: tuple, hops: int = 4) -> list[tuple]:
    """Consumers of ``node``, looking through pass-through modules: (dst, via) pairs."""
    out: list[tuple] = []
    frontier = [(node, ())]
    seen = {node}
    for _ in range(hops):
        nxt = []
        for current, via0 in frontier:
            for dst, via in successors(trace, current):
                facts = trace.modules.get(dst[1]) if dst[0] == "module" else None
                if facts is not None and facts.is_leaf and facts.type in PASS_THROUGH:
                    for out_node in output_nodes(trace, dst[1]):
                        if out_node not in seen:
                            seen.add(out_node)
                            nxt.append((out_node, via0 + via + (facts.type,)))
                elif facts is None or facts.is_leaf:
                    out.append((dst, via0 + via))
        frontier = nxt
    return out


def only_shape_ops(via: tuple) -> bool:
    return all(op in SHAPE_OPS or op in PASS_THROUGH for op in via)


def feeds_weight_layer(trace: RunTrace, layer: LayerTrace) -> list[str]:
    """Names of weight layers that take this point's output directly (through reshapes only)."""
    names = []
    for dst, via in downstream(trace, layer.node):
        if dst[0] != "module" or not only_shape_ops(via):
            continue
        facts = trace.modules.get(dst[1])
        if facts is not None and facts.type in WEIGHT_LAYERS:
            names.append(dst[1])
    return names


def is_model_output(trace: RunTrace, layer: LayerTrace) -> bool:
    """Whether this point's output is (a reshape of) what the model returns."""
    return any(origin == layer.node and only_shape_ops(via)
               for origin, via in trace.output_ops)
