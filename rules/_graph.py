"""Reading the data flow recorded in the trace: who feeds whom (helpers for rules)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from trainlint.trace import (
    CONCAT_OPS,
    SUM_OPS,
    InputTrace,
    LayerTrace,
    ModuleFacts,
    ParamTrace,
    RunTrace,
)

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
# Functional twins of the dropout and pooling pass-through modules (F.dropout, F.max_pool2d).
FUNCTIONAL_DROPOUT = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                      "feature_alpha_dropout")
FUNCTIONAL_PASS_THROUGH = frozenset(FUNCTIONAL_DROPOUT) | {
    f"{kind}_pool{d}d" for kind in ("max", "avg", "adaptive_max", "adaptive_avg")
    for d in (1, 2, 3)}
# Leaf module types that hold weights applied to their input.
WEIGHT_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d", "Bilinear", "LazyLinear", "LSTM", "GRU", "RNN",
                 "NonDynamicallyQuantizableLinear", "Conv1D")


def passed_on_by(facts: Optional[ModuleFacts]) -> Optional[tuple]:
    """How a leaf module passes its input on unchanged: ``(type,)`` for the pass-through types,
    the ops of a user's leaf module without weights whose forward only reshapes or slices its
    input (a causal conv's ``Chomp1d``); None for any other module."""
    if facts is None or not facts.is_leaf:
        return None
    if facts.base in PASS_THROUGH:
        return (facts.base,)
    inner = facts.attrs.get("inner_ops")
    return tuple(inner) if inner is not None and only_shape_ops(tuple(inner)) else None


# The RMS of features (or raw model inputs) above which they, not the weights of the layer
# taking them, make its outputs large (normalized features have RMS ~1).
LARGE_FEATURES = 10.0


def rms_of_input(inp: InputTrace) -> float:
    """RMS of a model input over its channels, from their means and stds."""
    mean, std = np.asarray(inp.mean, float), np.asarray(inp.std, float)
    return float(np.sqrt(np.mean(mean ** 2 + std ** 2)))


def large_input_into(trace: RunTrace, module: str) -> Optional[tuple]:
    """``(name, RMS)`` of a model input that ``module`` takes as it is (through reshapes, or
    concatenated with others) with an RMS above ``LARGE_FEATURES``: raw values that no init
    of ``module`` scales back."""
    for src, via in sources(trace, module):
        if src[0] != "input" or not only_shape_ops(via, joins=True):
            continue
        inp = next((i for i in trace.inputs if i.name == src[1]), None)
        if inp is not None and (rms := rms_of_input(inp)) > LARGE_FEATURES:
            return inp.name, rms
    return None


# A ReLU-family layer with at least this share of its units dead passes almost no signal on
# and no gradient back: its own finding (TL101) explains a signal or gradient that vanishes
# behind it.
MOSTLY_DEAD = 0.9


def mostly_dead(lt: Optional[LayerTrace]) -> bool:
    """Whether ``lt`` is a unit-recorded layer with at least ``MOSTLY_DEAD`` of units dead."""
    share = lt.dead_fraction if lt is not None else None
    return share is not None and share >= MOSTLY_DEAD


def feeds_dead_layer(trace: RunTrace, lt: LayerTrace) -> bool:
    """Whether ``lt``'s output goes (through reshapes and pass-through modules) into a layer
    whose units are mostly dead: no gradient comes back to it through them."""
    for dst, via in downstream(trace, lt.node, hops=2):
        if not only_shape_ops(via):
            continue
        nodes = output_nodes(trace, dst[1]) if dst[0] == "module" else [dst]
        if any(mostly_dead(layer_at(trace, node)) for node in nodes):
            return True
    return False


def successors(trace: RunTrace, node: tuple) -> list[tuple]:
    """Direct consumers of ``node``: (dst, via) pairs."""
    return [(e.dst, e.via) for e in trace.edges if e.src == node]


def output_nodes(trace: RunTrace, module: str) -> list[tuple]:
    """The observation nodes of a leaf module's output."""
    return [lt.node for lt in trace.layers if lt.module == module and lt.op == "output"]


def output_point(trace: RunTrace, module: str) -> Optional[LayerTrace]:
    """The observation point of a leaf module's output, or None."""
    return next((lt for lt in trace.layers if lt.module == module and lt.op == "output"), None)


def feeds_norm(trace: RunTrace, module: str) -> bool:
    """Whether the module's output goes straight (through reshapes, dropout, pooling) into a
    normalization layer, which cancels the output's scale."""
    for node in output_nodes(trace, module):
        for dst, via in downstream(trace, node, hops=2):
            norm = trace.modules.get(dst[1]) if dst[0] == "module" else None
            if norm is not None and is_norm_type(norm.base) and only_shape_ops(via):
                return True
    return False


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
                passed = passed_on_by(facts)
                if passed is not None:
                    for out_node in output_nodes(trace, dst[1]):
                        if out_node not in seen:
                            seen.add(out_node)
                            nxt.append((out_node, via0 + via + passed))
                elif facts is None or facts.is_leaf:
                    out.append((dst, via0 + via))
        frontier = nxt
    return out


def frozen_at_zero(trace: RunTrace) -> list[str]:
    """Modules that ran and whose parameters are all frozen (``requires_grad=False``) and all
    exactly 0: a zero-initialized layer (a ControlNet's zero conv, a LoRA B) left frozen by
    mistake, which cuts the gradient to everything behind it for good."""
    owned: dict = {}
    for p in trace.params:
        owned.setdefault(p.module, []).append(p)
    ran = {lt.module for lt in trace.layers}  # a module never called cuts nothing
    return sorted(m for m, ps in owned.items()
                  if m and m in ran and all(not p.requires_grad and p.norm == 0 for p in ps))


def feeds_residual_sum(trace: RunTrace, lt: LayerTrace) -> bool:
    """Whether ``lt``'s output goes nowhere but into sums with other paths, right away
    (through reshapes and pass-through modules such as Dropout): a residual branch's last
    layer, whose scale is the branch's share of the stream (small on purpose in GPT-2's or
    ModernBERT's init), not the stream's. (The stream's own layers also feed the next block.)"""
    taken = downstream(trace, lt.node)
    return bool(taken) and all(dst[0] == "sum" and only_shape_ops(via[:-1])
                               for dst, via in taken)


# Ops that pick some positions of a tensor (a classifier's [CLS] token: ``hidden[:, 0]``).
POSITION_PICKS = frozenset({"__getitem__", "select", "index_select", "narrow", "gather",
                            "take_along_dim"})


def only_shape_ops(via: tuple, joins: bool = False) -> bool:
    """Whether ``via`` only reshapes, moves or passes values on (``joins``: or concatenates
    them with other tensors, which keeps each value as it is)."""
    return all(op in SHAPE_OPS or op in PASS_THROUGH or op in FUNCTIONAL_PASS_THROUGH
               or (joins and op in CONCAT_OPS) for op in via)


def feeds_weight_layer(trace: RunTrace, layer: LayerTrace) -> list[str]:
    """Names of weight layers that take this point's output directly (through reshapes only)."""
    names = []
    for dst, via in downstream(trace, layer.node):
        if dst[0] != "module" or not only_shape_ops(via):
            continue
        facts = trace.modules.get(dst[1])
        if facts is not None and facts.base in WEIGHT_LAYERS:
            names.append(dst[1])
    return names


def is_model_output(trace: RunTrace, layer: LayerTrace, hops: int = 4) -> bool:
    """Whether this point's output is (a reshape of) what the model returns, also through
    pass-through modules (SqueezeNet's last ReLU, then AdaptiveAvgPool2d and a flatten)."""
    nodes, seen = [layer.node], {layer.node}
    for _ in range(hops):
        if any(origin in nodes and only_shape_ops(via) for origin, via in trace.output_ops):
            return True
        passed = []
        for node in nodes:
            for dst, via in successors(trace, node):
                facts = trace.modules.get(dst[1]) if dst[0] == "module" else None
                if passed_on_by(facts) is not None and only_shape_ops(via):
                    passed += [out for out in output_nodes(trace, dst[1]) if out not in seen]
        seen.update(passed)
        nodes = passed
    return False


# Normalization layers, by what they normalize over.
BATCHNORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                   "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d")
INSTANCENORM_TYPES = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
                      "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d")
NORM_TYPES = BATCHNORM_TYPES + INSTANCENORM_TYPES + ("GroupNorm", "LayerNorm", "RMSNorm",
                                                     "LocalResponseNorm")
# Library subclasses are named after what they normalize (ConvNextLayerNorm, T5LayerNorm,
# LlamaRMSNorm): recognised by the end of the class name.
NORM_NAME_ENDINGS = ("LayerNorm", "RMSNorm", "GroupNorm")


def batchnorm_trained_in_eval(trace: RunTrace) -> bool:
    """Whether a BatchNorm with trainable parameters ran in eval mode during an observed
    training step, not kept there on purpose (:func:`kept_in_eval`): it normalized with its
    running statistics, not the batch's (TL602's fault)."""
    trained = {p.module for p in trace.params if p.requires_grad}
    norms = {f.name for f in trace.modules.values()
             if f.base in BATCHNORM_TYPES and f.name in trained}
    return any(name in f["eval_modules"] and not kept_in_eval(trace, f, name)
               for f in trace.train_flags for name in norms)


def kept_in_eval(trace: RunTrace, flags: dict, module: str) -> bool:
    """Whether ``module``'s eval mode at the step of ``flags`` (a ``RunTrace.train_flags``
    entry) was the user's choice: it sat inside a submodule in eval whose parameters were all
    frozen then (``frozen_eval``), its own parameters are all frozen, the submodule it sits in
    does not train (:func:`_untrained_copy`: an EMA teacher), or a user class on its path
    overrides ``train()`` to keep it in eval (the detection-backbone idiom)."""
    if module in flags.get("frozen_eval", ()):
        return True
    own = [p for p in trace.params if p.module == module]
    if own and not any(p.requires_grad for p in own):
        return True
    if _untrained_copy(trace, module):
        return True
    return any(trace.modules[name].attrs.get("overrides_train")
               for name in ancestors(module) if name in trace.modules)


def _untrained_copy(trace: RunTrace, module: str) -> bool:
    """Whether the nearest submodule at or above ``module`` (the model itself left out) that
    holds parameters holds none that trains: none an optimizer holds, or none that got a
    gradient at an observed step (an EMA teacher or a target network run under no_grad,
    updated by the user's code, not by the optimizer)."""
    for name in [module] + [a for a in ancestors(module) if a]:
        held = [p for p in trace.params if p.name.startswith(name + ".")]
        if held:
            return all(p.in_optimizer is False for p in held) or not any(
                p.grad_steps or (p.grad_norm or 0) > 0 for p in held)
    return False


def trained_twin(trace: RunTrace, module: str) -> Optional[str]:
    """Another module of ``module``'s class, neither inside it nor holding it, whose
    parameters have the same names, shapes and norms before the first observed update one
    for one (the same values: a ``copy.deepcopy``, not a block built alike with its own init:
    four stacked blocks, the first two cut off by a stray no_grad, reached accuracy 0.733
    against 0.834 with autograd on) and got a gradient: ``module`` is its copy (a BYOL/MoCo
    target, a mean teacher, a DQN target network); None otherwise."""
    facts = trace.modules.get(module)
    if not module or facts is None:
        return None

    def layout(name: str) -> tuple:
        held = sorted((p for p in trace.params if p.name.startswith(name + ".")),
                      key=lambda p: p.name)
        return [(p.name[len(name) + 1:], tuple(p.shape)) for p in held], held

    mine, own = layout(module)
    if not mine:
        return None
    for name, other in trace.modules.items():
        if not name or other.type != facts.type or name == module or \
                name.startswith(module + ".") or module.startswith(name + "."):
            continue
        theirs, held = layout(name)
        if theirs == mine and any(p.grad_steps for p in held) and all(
                _first_norm(a) is not None and _first_norm(b) is not None
                and math.isclose(_first_norm(a), _first_norm(b), rel_tol=1e-6)
                for a, b in zip(own, held)):
            return name
    return None


def _first_norm(p: ParamTrace) -> Optional[float]:
    """``p``'s norm before any observed update: before the first observed optimizer step, or
    its first read (a parameter no optimizer steps)."""
    return p.norms_before[0] if p.norms_before else p.first_norm


def is_norm_type(type_name: str) -> bool:
    """Whether a module type normalizes its input (torch's norm layers and named subclasses)."""
    return type_name in NORM_TYPES or type_name.endswith(NORM_NAME_ENDINGS)
DROPOUT_TYPES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                 "FeatureAlphaDropout")
# Sequence-model building blocks.
RNN_TYPES = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
EMBEDDING_TYPES = ("Embedding", "EmbeddingBag")
ATTENTION_TYPES = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
                   "Transformer", "TransformerEncoder", "TransformerDecoder")
# Plain ops that sum two tensors: a residual connection when they join two paths.
ADD_OPS = SUM_OPS


def is_gate(trace: RunTrace, layer: LayerTrace) -> bool:
    """Whether this point's output is multiplied into another tensor (SE, GLU, LSTM gates)."""
    return any(e.src == layer.node and e.dst[0] == "op" for e in trace.edges)


def is_attention(type_name: str) -> bool:
    return type_name in ATTENTION_TYPES or "Attention" in type_name


def attends(facts: ModuleFacts) -> bool:
    """Whether a module is an attention layer: by its class, or because its own forward calls
    ``F.scaled_dot_product_attention`` (a hand-written attention named anything)."""
    return is_attention(facts.base) or bool(facts.attrs.get("attends"))


def module_expr(module: str) -> str:
    """Python that reaches ``module`` from ``model``."""
    if all(part.isidentifier() for part in module.split(".")):
        return f"model.{module}"
    return f"model.get_submodule({module!r})"


def ancestors(name: str) -> list[str]:
    """``name`` and every enclosing module's name, innermost first ("" = the model)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def inside_attention(trace: RunTrace, module: str) -> bool:
    """Whether ``module`` is (inside) an attention block."""
    for name in ancestors(module):
        facts = trace.modules.get(name)
        if facts is not None and (attends(facts) if name else is_attention(facts.base)):
            return True
        leaf = name.rsplit(".", 1)[-1].lower()
        if "attn" in leaf or "attention" in leaf:
            return True
    return False


def inside_attention_sublayer(trace: RunTrace, module: str) -> bool:
    """Whether ``module`` is inside the attention sub-layer itself (q/k/v/out projections),
    as opposed to anywhere in a transformer block (see :func:`inside_attention`)."""
    for name in ancestors(module)[1:]:
        facts = trace.modules.get(name)
        if facts is not None and (facts.base == "MultiheadAttention"
                                  or "Attention" in facts.type or (name and attends(facts))):
            return True
        leaf = name.rsplit(".", 1)[-1].lower()
        if "attn" in leaf or "attention" in leaf:
            return True
    return False


def predecessors(trace: RunTrace, node: tuple) -> list[tuple]:
    """What flows into ``node`` (a module's forward, a functional op's point): (src, via)."""
    return [(e.src, e.via) for e in trace.edges if e.dst == node]


def sources(trace: RunTrace, module: str) -> list[tuple]:
    """What flows into ``module``'s forward: (src, via) pairs."""
    return predecessors(trace, ("module", module))


def upstream(trace: RunTrace, module: str, hops: int = 4) -> list[tuple]:
    """:func:`sources` of ``module``, looking back through pass-through modules (a Dropout
    between a LayerNorm and a classifier's dense layer): (src, via) pairs, the pass-through
    modules' types in ``via``."""
    out: list[tuple] = []
    frontier, seen = [(module, ())], {module}
    for _ in range(hops):
        nxt = []
        for current, later in frontier:
            for src, via in sources(trace, current):
                facts = trace.modules.get(src[1]) if src[0] == "point" else None
                passed = passed_on_by(facts)
                if passed is not None:
                    if src[1] not in seen:
                        seen.add(src[1])
                        nxt.append((src[1], passed + via + later))
                else:
                    out.append((src, via + later))
        frontier = nxt
    return out


def layer_at(trace: RunTrace, node: tuple) -> Optional[LayerTrace]:
    """The observation point of a ("point", ...) node, or None."""
    for lt in trace.layers:
        if lt.node == node:
            return lt
    return None


def output_layer(trace: RunTrace) -> Optional[LayerTrace]:
    """The observation point the model's (first) output comes from, through reshapes only."""
    for origin, via in trace.output_ops:
        if origin[0] == "point" and only_shape_ops(via):
            return layer_at(trace, origin)
    return None


def maximal_groups(bad: set, universe: set, *, params: bool,
                   root: bool = True) -> dict[str, list]:
    """Group the dotted names in ``bad`` under the outermost module whose every name in
    ``universe`` is bad: {module: [names]}. Names are parameter names (``params``: a name
    left alone is grouped under its own module) or module names (grouped under itself).
    Without ``root``, no group is made at the model itself ("")."""
    groups: dict[str, list] = {}
    for name in sorted(bad):
        base = (name.rsplit(".", 1)[0] if "." in name else "") if params else name
        key = base
        for candidate in reversed(ancestors(base)):
            inside = {n for n in universe
                      if candidate == "" or n == candidate or n.startswith(candidate + ".")}
            if (candidate or root) and inside and inside <= bad:
                key = candidate
                break
        groups.setdefault(key, []).append(name)
    return groups


def first_weight_norms(trace: RunTrace) -> dict[str, float]:
    """``{module: the norm of its weight before the first observed update}`` (0: initialized
    at 0), for the modules whose ``weight`` an optimizer stepped."""
    return {p.module: p.norms_before[0] for p in trace.params
            if p.name.endswith(".weight") and p.norms_before}


def quiet_branches(trace: RunTrace) -> list[str]:
    """The blocks (the modules holding them) of norm layers whose scale was exactly 0 before
    the first observed update: the last norm of a residual branch (torchvision's
    ``zero_init_residual``, timm's ``zero_init_last``), which at first adds nothing, so the
    block's layers get no gradient and make no update, by design. Only a block whose other
    norms start above 0 (the branch's earlier norms)."""
    norms = {name: scale for name, scale in first_weight_norms(trace).items()
             if name in trace.modules and is_norm_type(trace.modules[name].base)}
    blocks = []
    for name, scale in sorted(norms.items()):
        block = name.rsplit(".", 1)[0] if "." in name else ""
        # The branch's other norms start at scale 1: a block whose every norm is at 0 (an
        # init that zeroes all norm scales) quiets the main path, a fault the rules must see.
        if scale == 0 and block and any(s > 0 for n, s in norms.items()
                                        if n.startswith(block + ".")):
            blocks.append(block)
    return blocks


# A residual branch's layer scale (ConvNeXt's and CaiT's 1e-6 .. 1e-5, ReZero's 0) at most
# this RMS quiets the branch by design: its layers' gradients are this small a share of the
# stream's.
LAYER_SCALE = 1e-3


def layer_scaled_branches(trace: RunTrace) -> list[str]:
    """The blocks whose residual branches a small learned scale quiets: a vector (or scalar)
    parameter of RMS at most ``LAYER_SCALE`` before its first observed update, on a module that
    is no weight, norm or embedding layer: the block itself (ConvNeXt's ``gamma``, transformers'
    ``layer_scale_parameter``) or, for a leaf that only holds it (timm's ``LayerScale``), the
    block around that leaf. Its branch's layers get a gradient that small, by design, while the
    block's skip carries the stream: only a block with a residual sum inside. A vector of
    zeros is a shift, not a scale. Never the model itself."""
    blocks = set()
    for p in trace.params:
        facts = trace.modules.get(p.module)
        if (facts is None or len(p.shape) > 1 or not p.norms_before
                or p.name.endswith((".weight", ".bias"))  # a norm of the user's own, say
                or facts.base in WEIGHT_LAYERS + EMBEDDING_TYPES or is_norm_type(facts.base)):
            continue
        numel = math.prod(p.shape)
        first = p.norms_before[0]
        # A scale multiplies: tiny but not 0 (1e-6 × ones), or ReZero's one scalar at 0; a
        # vector of zeros is a shift (ResMLP's Affine beta), which quiets nothing.
        if not numel or first > LAYER_SCALE * math.sqrt(numel) or (first == 0 and numel > 1):
            continue
        has_children = any(name.startswith(p.module + ".") for name in trace.modules)
        block = p.module if has_children or not p.module else p.module.rpartition(".")[0]
        if block and _has_residual_sum(trace, block):
            blocks.add(block)
    return sorted(blocks)


def _has_residual_sum(trace: RunTrace, block: str) -> bool:
    """Whether an output observed inside ``block`` is added to another path: the block is a
    residual one, whose skip carries the stream past its quieted branch (a tiny gain on a
    block's only path quiets the stream itself)."""
    return any(e.dst[0] == "sum" and e.src[0] == "point" and in_blocks(e.src[1], [block])
               for e in trace.edges)


def in_blocks(name: str, blocks: list[str]) -> bool:
    """Whether module or parameter ``name`` is inside one of ``blocks``."""
    return any(name.startswith(block + ".") for block in blocks)
