"""Weight initialization: layer scales against their fan-in, and the loss at the first step."""

from __future__ import annotations

import math
from typing import Iterator, Optional

from trainlint.engine import Hit, Skip, Thresholds, rule
from trainlint.trace import (
    CLASSIFICATION_LOSSES,
    LayerTrace,
    ModuleFacts,
    ParamTrace,
    RunTrace,
)

from ._graph import (
    ADD_OPS,
    LARGE_FEATURES,
    downstream,
    feeds_norm,
    is_model_output,
    is_norm_type,
    large_input_into,
    layer_at,
    only_shape_ops,
    output_layer,
    output_nodes,
    output_point,
    passed_on_by,
    rms_of_input,
    sources,
    upstream,
)
from .run import chance_level, seen_from_start, unknown_loss

# nn.init.calculate_gain for the nonlinearities the probe tells apart (GELU-family: ReLU's).
GAINS = {"relu": math.sqrt(2.0), "gelu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "sigmoid": 1.0}
# Layers whose weight is (out, in / groups, *kernel): fan-in = in / groups * prod(kernel).
SCALED_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                 "ConvTranspose3d")
# How far to look past the nonlinearity for a residual sum.
RESIDUAL_HOPS = 3


def first_step(trace: RunTrace) -> dict:
    """The observed data of training step 0; Skip when the run was not seen from the start."""
    if not seen_from_start(trace):
        raise Skip("it needs the first training step (trainlint check, or a Monitor created "
                   "before training starts)")
    return trace.per_step[0]


def fan_in(shape: tuple) -> int:
    """``nn.init``'s fan-in of a weight of this shape."""
    return int(shape[1] * math.prod(shape[2:])) if len(shape) >= 2 else 0


def fan_out(shape: tuple) -> int:
    """``nn.init``'s fan-out of a weight of this shape (``mode='fan_out'``)."""
    return int(shape[0] * math.prod(shape[2:])) if len(shape) >= 2 else 0


# A weight within this factor of ``gain / sqrt(fan_out)`` is Kaiming's fan-out mode.
FAN_OUT_BAND = (0.75, 1.33)


def fan_out_mode(std: float, shape: tuple, gain: float) -> bool:
    """Whether a weight of ``std`` is at Kaiming's fan-out scale (torchvision's VGG and ResNet
    init, ``kaiming_normal_(mode='fan_out')``) where that differs from the fan-in scale. He et
    al. derive it as the init that keeps the backward pass's scale: the forward pass changes
    scale by fan_in / fan_out at such a layer, once, not layer after layer."""
    fans, outs = fan_in(shape), fan_out(shape)
    if not fans or not outs or fans == outs:
        return False
    return FAN_OUT_BAND[0] <= std / (gain / math.sqrt(outs)) <= FAN_OUT_BAND[1]


def init_call(kind: str) -> str:
    if kind in ("relu", "gelu"):
        return "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')"
    return f"nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain('{kind}'))"


def nonlinearity(trace: RunTrace, point: LayerTrace) -> Optional[tuple[str, float, str]]:
    """``(name, gain, init call)`` of an activation point: by the probe's kind (relu, gelu,
    tanh, sigmoid), else by its module's torch.nn class (the gains TL301's docstring gives)."""
    facts = trace.modules.get(point.module)
    if point.kind in GAINS:
        return _named(point, facts), GAINS[point.kind], init_call(point.kind)
    if point.op != "output" or facts is None:
        return None
    slope = {"LeakyReLU": facts.attrs.get("negative_slope", 0.01),
             "PReLU": facts.attrs.get("init", 0.25)}.get(facts.base)
    if slope is not None:
        return (facts.base, math.sqrt(2.0 / (1.0 + slope ** 2)),
                f"nn.init.kaiming_normal_(layer.weight, a={slope:g}, nonlinearity='leaky_relu')")
    if facts.base in ("ELU", "CELU"):
        return facts.base, GAINS["relu"], init_call("relu")
    if facts.base == "SELU":
        return "SELU", 1.0, "nn.init.kaiming_normal_(layer.weight, nonlinearity='linear')"
    return None


def _named(point: LayerTrace, facts: object) -> str:
    """The name a finding gives a nonlinearity of the probe's kind: a GELU-family one by its
    own function or class (SiLU, Mish: the kind 'gelu' covers them all), else the kind."""
    if point.kind != "gelu":
        return point.kind
    op = point.op.split("#")[0]
    if op != "output":
        return op
    base = getattr(facts, "base", "")
    return base if base in ("GELU", "SiLU", "Mish") else "GELU-family activation"


def following_nonlinearity(trace: RunTrace, layer: LayerTrace) -> Optional[LayerTrace]:
    """The nonlinearity that takes this layer's output as it is (through reshapes only)."""
    for dst, via in downstream(trace, layer.node, hops=2):
        if not only_shape_ops(via):
            continue
        if dst[0] == "point":
            point = layer_at(trace, dst)
        else:
            point = output_point(trace, dst[1])
        if point is not None and nonlinearity(trace, point) is not None:
            return point
    return None


def first_rms(lt: LayerTrace, first: dict) -> Optional[float]:
    """RMS of a point's output at the first training step."""
    stats = first["layers"].get(lt.node[1:])
    if not stats or stats.get("std") is None:
        return None
    return math.sqrt(stats["std"] ** 2 + stats["mean"] ** 2)


def initial_weight_rms(p: ParamTrace) -> float:
    """RMS of the weight before the first observed optimizer step (its init, in a check)."""
    if p.norms_before:
        return p.norms_before[0] / math.sqrt(max(math.prod(p.shape), 1))
    return p.std


def input_rms(trace: RunTrace, module: str, first: dict) -> Optional[float]:
    """RMS of what flows into ``module`` unchanged (another point's output or a model input)."""
    for src, via in sources(trace, module):
        if not only_shape_ops(via):
            continue
        if src[0] == "point":
            lt = layer_at(trace, src)
            if lt is not None:
                return first_rms(lt, first)
        elif src[0] == "input":
            for inp in trace.inputs:
                if inp.name == src[1]:
                    return rms_of_input(inp)
    return None


def normalized_or_residual(trace: RunTrace, layer: LayerTrace, act: LayerTrace) -> bool:
    """Whether the layer sits in a block whose scale a norm layer or a skip connection sets:
    its input comes from a norm layer (through Dropout/Identity and reshapes), or the path
    after its nonlinearity reaches a sum."""
    for src, via in upstream(trace, layer.module):
        if src[0] == "point" and only_shape_ops(via):
            facts = trace.modules.get(src[1])
            if facts is not None and is_norm_type(facts.base):
                return True
    frontier = [act.node]
    for _ in range(RESIDUAL_HOPS):
        nxt = []
        for node in frontier:
            for dst, via in downstream(trace, node):
                if any(op in ADD_OPS for op in via):
                    return True
                if dst[0] == "module":
                    nxt += output_nodes(trace, dst[1])
        frontier = nxt
    return False


def scale_cancelled_after(trace: RunTrace, act: LayerTrace) -> bool:
    """Whether the nonlinearity feeds a weight layer whose output goes straight into a norm
    layer (DCGAN's discriminator: conv, LeakyReLU, conv, BatchNorm): that norm cancels the
    scale (through reshapes only)."""
    for dst, via in downstream(trace, act.node, hops=2):
        facts = trace.modules.get(dst[1]) if dst[0] == "module" else None
        if facts is None or facts.base not in SCALED_LAYERS or not only_shape_ops(via):
            continue
        if feeds_norm(trace, dst[1]):
            return True
    return False


def _weight(trace: RunTrace, module: str, matrix: bool = True) -> Optional[ParamTrace]:
    """``module``'s ``weight``: a matrix or kernel (2+ dims), else (``matrix=False``) a norm
    layer's vector of scales."""
    for p in trace.params:
        if p.name == f"{module}.weight" and (len(p.shape) >= 2 if matrix else len(p.shape) == 1):
            return p
    return None


def _check_norm(trace: RunTrace, t: Thresholds, layer: LayerTrace, first: dict) -> Optional[dict]:
    """A norm layer whose scale (gamma) starts far below 1 and whose output shows it."""
    scale = _weight(trace, layer.module, matrix=False)
    out_rms = first_rms(layer, first)
    if scale is None or not scale.requires_grad or out_rms is None:
        return None
    rms = initial_weight_rms(scale)
    if not (0 < rms < t.min_norm_scale and 0 < out_rms < t.min_norm_scale):
        return None
    if any(ADD_OPS.intersection(via) for _, via in downstream(trace, layer.node, hops=2)):
        return None  # the end of a residual branch
    return {"module": layer.module, "type": trace.modules[layer.module].type, "rms": rms,
            "out_rms": out_rms}


def _check_layer(trace: RunTrace, t: Thresholds, layer: LayerTrace, facts: ModuleFacts,
                 first: dict) -> Optional[dict]:
    weight = _weight(trace, layer.module)
    act = following_nonlinearity(trace, layer)
    if weight is None or not weight.requires_grad or act is None or act.activation is None:
        return None  # (a frozen layer's scale is a pretrained one)
    fans = fan_in(weight.shape)
    if not fans or normalized_or_residual(trace, layer, act):
        return None
    kind, gain, call = nonlinearity(trace, act)
    expected = gain / math.sqrt(fans)
    std = initial_weight_rms(weight)
    if std == 0:
        return None  # zero-initialized on purpose (a flow's coupling starts as the identity)
    ratio = std / expected
    in_rms = input_rms(trace, layer.module, first)
    out_rms = first_rms(layer, first)
    if in_rms is None or out_rms is None or not in_rms > 0:
        return None
    # The same ratio seen in the signal: RMS of the pre-activation against what a well-scaled
    # layer makes of this input (gain * input RMS).
    signal = out_rms / (gain * in_rms)
    saturated = act.activation.saturated_fraction or 0.0
    if saturated < t.saturated_fraction and scale_cancelled_after(trace, act):
        return None  # a saturated tanh/sigmoid loses what no norm after it gives back
    # At the model's output (DCGAN's generator tanh) a small scale shrinks the output, which
    # its layer's updates fix: no signal that later layers lose.
    if ratio < t.min_ratio and signal < t.min_ratio and not is_model_output(trace, act) \
            and not fan_out_mode(std, weight.shape, gain):
        direction = "small"
    elif ratio > t.max_ratio and (signal > t.max_ratio or saturated >= t.saturated_fraction):
        direction = "large"
    else:
        return None
    return {"module": layer.module, "type": facts.type, "kind": kind, "gain": gain,
            "call": call, "std": std,
            "expected_std": expected, "ratio": ratio, "signal_ratio": signal,
            "saturated_fraction": saturated, "fan_in": fans, "direction": direction,
            "activation": act.label}


@rule("TL301", "init-scale-mismatch", "warning", min_ratio=0.2, max_ratio=5.0,
      saturated_fraction=0.3, min_norm_scale=0.05)
def init_scale_mismatch(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """A layer's weight scale is far from what its fan-in and nonlinearity call for.

    ## What it does
    For every Linear/Conv/ConvTranspose layer whose output goes straight into a nonlinearity
    (ReLU, GELU, tanh, sigmoid; LeakyReLU, PReLU, ELU, CELU, SELU modules), it compares the
    weight's scale at the first training step (its RMS before the first update) with
    ``gain / sqrt(fan_in)`` (Kaiming for ReLU/GELU, Xavier-style for tanh/sigmoid, gains from
    ``nn.init.calculate_gain``: LeakyReLU's of its negative slope, PReLU's of its initial slope
    0.25 as He et al. derived; ELU/CELU take ReLU's, the init used for them in practice and in
    the ELU paper; SELU takes 1, LeCun's 1/sqrt(fan_in) that self-normalization needs, as
    PyTorch's docs advise, rather than calculate_gain('selu') = 3/4). It fires when the ratio
    is below ``min_ratio`` or above ``max_ratio`` AND the first step's activations show it:
    the layer's output RMS against its input's is off by the same factor (or, for too-large
    weights, at least ``saturated_fraction`` of a tanh/sigmoid output is saturated). Layers
    in a block normalized by a norm layer, or on a residual branch, are skipped: there the
    scale of one layer does not carry on; so are layers whose nonlinearity feeds a weight layer
    that goes straight into a norm layer (DCGAN's discriminator: conv at std 0.02, LeakyReLU,
    conv, BatchNorm), unless the nonlinearity saturates; a layer whose nonlinearity is the
    model's output (DCGAN's generator: ConvTranspose at std 0.02, then tanh) is judged only
    for too-large weights; a weight that starts at exactly 0 is zero-initialized on purpose
    (the last layer of a RealNVP/Glow coupling net, so that it starts as the identity) and is
    not judged. PyTorch's default init (ratio 0.35-0.58) passes, and so does
    Kaiming's fan-out mode (``kaiming_normal_(mode='fan_out')``, torchvision's VGG and ResNet
    init: within 0.75-1.33× ``gain / sqrt(fan_out)``), which He et al. derive as the init that
    keeps the backward pass's scale: a stem conv from 1 channel to 64 starts at 0.125× its
    fan-in scale and shrinks the forward signal there once, not layer after layer. Layers with the
    same problem are reported together, at the first one. Frozen layers
    (``requires_grad=False``: a pretrained backbone) are not judged.

    A norm layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm...) starts with its scale
    (``weight``, gamma) at 1: it fires when the scale's RMS before the first update is below
    ``min_norm_scale`` (not 0: a zero-initialized last norm of a residual branch is a known
    trick) and the layer's output RMS at the first step is below it too, unless the output
    goes straight into a residual sum (the end of a branch, which a small scale only quiets).
    That is the init meant for weight matrices (``normal_(std=0.02)``) applied to every
    parameter, norm scales included: each such layer shrinks the signal ~50×.

    ## Why is this bad?
    Each badly scaled layer multiplies the signal's scale by about the ratio: too small and
    activations (and their gradients) shrink layer after layer; too large and tanh/sigmoid
    units saturate or ReLU activations blow up. Either way learning stalls or diverges.

    ## Example
    ``nn.init.normal_(layer.weight, std=0.01)`` on 500-wide tanh layers: ratio 0.13.

    ## Fix
    Initialize with the call the finding names, e.g.
    ``nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')`` before ReLU, or
    ``nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain('tanh'))`` before tanh;
    or add normalization layers.
    """
    first = first_step(trace)
    groups: dict[tuple, list] = {}
    norms: list = []
    for layer in trace.ordered_layers():
        facts = trace.modules.get(layer.module)
        if layer.op != "output" or facts is None:
            continue
        if is_norm_type(facts.base):
            found = _check_norm(trace, t, layer, first)
            if found is not None:
                norms.append(found)
            continue
        if facts.base not in SCALED_LAYERS:
            continue
        found = _check_layer(trace, t, layer, facts, first)
        if found is not None:
            groups.setdefault((found["direction"], found["kind"]), []).append(found)
    for (direction, kind), found in groups.items():
        first = found[0]
        others = [f["module"] for f in found[1:]]
        also = f"; {len(others)} more layer(s) alike: {others[:8]}" if others else ""
        shows = (f"the pre-activation RMS is {first['signal_ratio']:.3g}× what a well-scaled "
                 f"layer gives this input")
        if direction == "large" and first["saturated_fraction"] >= t.saturated_fraction:
            shows += f", and {first['saturated_fraction']:.0%} of {first['activation']} saturates"
        threshold = t.min_ratio if direction == "small" else t.max_ratio
        yield Hit(
            module=first["module"],
            message=(f"{first['type']} {first['module']!r} feeds a {kind} with weight std "
                     f"{first['std']:.3g}, {first['ratio']:.3g}× the {first['expected_std']:.3g} "
                     f"that fan-in {first['fan_in']} and gain {first['gain']:.3g} call for "
                     f"(threshold {threshold:g}×); {shows}{also}"),
            fix=(f"initialize {'these layers' if others else 'it'} with {first['call']} "
                 f"(std {first['expected_std']:.3g} here) and nn.init.zeros_(layer.bias), or "
                 f"put a normalization layer before the {kind}"),
            evidence={"ratio": first["ratio"], "signal_ratio": first["signal_ratio"],
                      "weight_std": first["std"], "expected_std": first["expected_std"],
                      "saturated_fraction": first["saturated_fraction"],
                      "layers": [f["module"] for f in found], "threshold": threshold},
        )
    if norms:
        yield _norm_hit(norms, t)


def _norm_hit(norms: list, t: Thresholds) -> Hit:
    """One finding for the norm layers whose scale starts far below 1, at the first."""
    first, others = norms[0], [f["module"] for f in norms[1:]]
    also = f"; {len(others)} more norm layer(s) alike: {others[:8]}" if others else ""
    return Hit(
        module=first["module"],
        message=(f"{first['type']} {first['module']!r} starts with its scale (weight) at RMS "
                 f"{first['rms']:.3g} where norm layers start at 1 (threshold "
                 f"{t.min_norm_scale:g}): its output RMS at the first step is "
                 f"{first['out_rms']:.3g} instead of ~1, so it shrinks the signal "
                 f"{1 / first['rms']:.3g}×{also}"),
        fix=("initialize norm layers with nn.init.ones_(norm.weight) and "
             "nn.init.zeros_(norm.bias) (their default): leave them out of an init loop "
             "meant for weight matrices, e.g. `if isinstance(m, (nn.Linear, nn.Conv2d)): "
             "nn.init.normal_(m.weight, std=0.02)`"),
        evidence={"scale_rms": first["rms"], "output_rms": first["out_rms"],
                  "layers": [f["module"] for f in norms], "threshold": t.min_norm_scale},
    )




def _fine_tune(trace: RunTrace) -> Optional[str]:
    """Why the first loss is a pretrained model's on a new task, not an untrained one's: its
    output layer is frozen (``requires_grad=False``: LoRA, adapters); None otherwise (a fresh
    head on a frozen backbone, linear probing, starts from its own init)."""
    head = output_layer(trace)
    weight = _weight(trace, head.module) if head is not None else None
    if weight is not None and not weight.requires_grad:
        return (f"the output layer {head.module!r} is frozen (requires_grad=False): a "
                "pretrained model's first loss on its task says nothing of an init")
    return None


def _head_input(trace: RunTrace, head: Optional[LayerTrace]) -> Optional[tuple]:
    """``(what, RMS)`` of an observed output or a model input that the last layer takes as it
    is (or concatenated with others) when its RMS is above LARGE_FEATURES."""
    if head is None or head.op != "output":
        return None
    for src, via in sources(trace, head.module):
        if not only_shape_ops(via, joins=True):
            continue
        fed = layer_at(trace, src) if src[0] == "point" else None
        if fed is not None and fed.activation is not None and \
                fed.activation.rms > LARGE_FEATURES:
            return fed.label, fed.activation.rms
    raw = large_input_into(trace, head.module)
    return (f"the model's input {raw[0]!r}", raw[1]) if raw is not None else None


def _weight_head(head: Optional[LayerTrace], trace: RunTrace) -> Optional[LayerTrace]:
    """The layer that makes the model's output, looking back through modules that pass it on
    (an ``nn.Identity`` or a Dropout after the classifier)."""
    for _ in range(3):
        if head is None or head.op != "output" or \
                passed_on_by(trace.modules.get(head.module)) is None:
            return head
        fed = [src for src, via in sources(trace, head.module)
               if src[0] == "point" and only_shape_ops(via)]
        before = layer_at(trace, fed[0]) if len(fed) == 1 else None
        if before is None:
            return head
        head = before
    return head


# The outputs' between-sample RMS below this share of their spread: the same for every sample.
SAME_FOR_ALL = 0.25
# The last layer's bias at least this share of the outputs' spread: large enough to set them.
BIAS_SHARE = 0.5


def _bias_driven(trace: RunTrace, head: Optional[LayerTrace],
                 at_first: Optional[dict]) -> Optional[tuple]:
    """``(bias name, its RMS at init, between-sample RMS, spread)`` when the first outputs
    barely differ between samples while their spread (across classes for a softmax, their
    size for BCE's sigmoid) is large, and the last layer's bias is about as large: the bias,
    not the weights, makes the first predictions confident."""
    if head is None or not at_first:
        return None
    signal, std = at_first.get("signal"), at_first.get("std")
    if signal is None or std is None:
        return None
    spread = std if trace.loss_kind != "bce_with_logits" else math.hypot(
        std, at_first.get("mean") or 0.0)
    bias = next((p for p in trace.params if p.name == f"{head.module}.bias"), None)
    if bias is None or not spread > 0 or signal > SAME_FOR_ALL * spread:
        return None
    rms = initial_weight_rms(bias)
    return (bias.name, rms, signal, spread) if rms >= BIAS_SHARE * spread else None


@rule("TL302", "loss-at-init", "warning", max_ratio=2.0, min_excess=1.0, max_excess=3.0,
      min_items=8)
def loss_at_init(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """The classification loss at the first step is far above ln(num_classes).

    ## What it does
    For cross-entropy (and NLL) losses with C classes, an untrained classifier's first loss
    should be about ln(C) (2.303 for 10 classes); for BCE-with-logits about ln(2). It fires
    when the loss of the first training step exceeds that value by at least ``min_excess``
    nats and either ``max_ratio`` × it or by more than ``max_excess`` nats (many classes:
    logits of std s add about s²/2 nats whatever C is, so 3 nats is a logit std of ~2.4 at
    1000 classes as at 10). A first loss below ln(C) is not flagged (a pretrained model), nor
    is a fine-tune's whose output layer is frozen (LoRA, adapters: the first loss is a
    pretrained model's on a new task); a fresh head on a frozen backbone is judged. A first
    loss over fewer than ``min_items`` items (samples times positions: a check at batch 1 of
    a classifier) is not judged: one sample's loss strays several nats from ln(C) by chance
    (5.8 against 2.3 for a healthy Kaiming MLP). Nor is a
    loss whose torch loss reads values its loss function computed from a model output
    (ArcFace's ``s * cos(theta + m)`` starts some 30 nats above ln(C) by design). A BCE
    loss with ``pos_weight`` or ``weight`` is not judged: with ``pos_weight=20`` and 10%
    positives, an uninformed classifier starts at 2.9 × ln(2).
    It needs the first step (``trainlint check``, or a Monitor created before training) and a
    recognised loss.

    ## Why is this bad?
    A first loss well above ln(C) means confident random predictions: the last layer's
    weights (or the features reaching it) are too large. The first iterations are then spent
    undoing the init ("hockey-stick" loss curve), and large logits can saturate the softmax.

    ## Example
    ``nn.Linear(256, 10)`` as the head, initialized with ``nn.init.normal_(w, std=1.0)``:
    first loss ~15 instead of 2.3.

    ## Fix
    Scale down the last layer's init (e.g. ``nn.init.normal_(head.weight, std=0.01)``) or zero
    it (``nn.init.zeros_(head.weight)``), and set its bias to the log class priors. The finding
    names the layer that makes the output (behind an ``nn.Identity`` or a Dropout at the end).
    Where the first outputs barely differ between samples (between-sample RMS below
    ``SAME_FOR_ALL`` = 1/4 of their spread across classes, or of their size for BCE) and that
    layer's bias is at least half as large as the spread, the bias sets the predictions (a +12
    start on one tag), and the fix is to start it at zero; where the features reaching the
    layer are large, the fix names them; where the layer's weight is another module's (a
    head tied to the token embedding), the fix names that weight.
    """
    if trace.loss_kind is None:
        raise Skip(unknown_loss(trace))
    if trace.loss_kind == "model":
        raise Skip("the loss comes from the model's own output (.loss): its kind is not known")
    if trace.loss_kind == "custom":
        raise Skip("the loss is not a recognised classification loss: it calls no "
                   "F.cross_entropy, F.nll_loss or F.binary_cross_entropy_with_logits")
    if trace.loss_kind not in CLASSIFICATION_LOSSES:
        return
    if trace.loss_terms is not None and trace.loss_terms > 1:
        raise Skip(f"the loss adds {trace.loss_terms} terms (auxiliary heads, a distillation "
                   "term): its first value is not one classifier's, comparable with ln(C)")
    if trace.loss_reduction not in (None, "mean"):
        raise Skip(f"the loss is reduced by {trace.loss_reduction!r}, not averaged over the "
                   "samples: its first value is not comparable with ln(C)")
    if trace.loss_weighted:
        raise Skip("the loss weighs its terms (BCEWithLogitsLoss's pos_weight or weight): an "
                   "uninformed classifier's first loss is not ln(2)")
    if trace.loss_items is not None and trace.loss_items < t.min_items:
        raise Skip(f"the first loss averages {trace.loss_items} item(s) (samples times "
                   f"positions), fewer than {t.min_items}: one sample's loss strays from ln(C) "
                   "by several nats by chance")
    if trace.loss_soft_targets:
        raise Skip("the cross-entropy is a sum of constants times a log_softmax: probability "
                   "targets (mixup, soft labels) or a policy gradient's weights, which its "
                   "graph does not tell apart; its first value is not judged against ln(C)")
    if trace.loss_transforms_output:
        raise Skip("the classification loss reads values the loss function computes from the "
                   "model's output (a margin or a scale: ArcFace, a temperature), not the "
                   "output itself: its first value is that function's, not the model's")
    first = next((s for s in trace.per_step if s.get("loss") is not None), None)
    if first is None or not trace.at_start(first) or not math.isfinite(first["loss"]):
        return
    tuned = _fine_tune(trace)
    if tuned is not None:
        raise Skip(tuned)
    chance = chance_level(trace)
    if chance is None:
        return
    classes, expected = chance
    loss = first["loss"]
    excess = loss - expected
    if excess < t.min_excess or (loss <= t.max_ratio * expected and excess <= t.max_excess):
        return
    head = _weight_head(output_layer(trace), trace)
    module = head.module if head is not None else ""
    at_first = first["layers"].get(head.node[1:]) if head is not None else None
    logits = (f"; the output ({head.label}) has std {at_first['std']:.3g} at that step"
              if at_first and at_first.get("std") is not None else "")
    fed = _head_input(trace, head)
    biased = _bias_driven(trace, head, at_first) if fed is None else None
    facts = trace.modules.get(module)
    tied = facts.attrs.get("weight_of") if facts is not None else None
    if biased is not None:
        logits = (f"; the outputs differ between samples by RMS {biased[2]:.3g} against a "
                  f"spread of {biased[3]:.3g}")
        fix = (f"the last layer's bias ({biased[0]!r}, RMS {biased[1]:.3g} at init) sets the "
               f"first predictions: start it at zero (nn.init.zeros_(layer.bias)) or at the "
               f"log class priors")
    elif fed is not None:
        fix = (f"the features reaching the last layer are too large ({fed[0]} has RMS "
               f"{fed[1]:.3g}): fix the scale of the layers or inputs before it first (TL301, "
               f"TL104, TL201: Kaiming/Xavier init, normalization)")
    elif tied:
        fix = (f"{module!r} shares its weight with {tied!r} (tied weights): scale that down at "
               f"init (nn.init.normal_(weight, std=0.02), GPT-2's; multiply the embedding's "
               f"output by sqrt(d_model) in the forward where the model needs it larger), not "
               f"{module!r} alone")
    else:
        fix = (f"scale down the last layer's init{f' ({module!r})' if module else ''}: "
               f"nn.init.normal_(layer.weight, std=0.01) or nn.init.zeros_(layer.weight), with "
               f"nn.init.zeros_(layer.bias) (or the log class priors)")
    yield Hit(
        module=module,
        message=(f"the first-step {trace.loss_kind} loss is {loss:.4g}, {loss / expected:.3g}× "
                 f"ln({classes}) = {expected:.4g}, the loss of an uninformed classifier "
                 f"(threshold {t.max_ratio:g}× or +{t.max_excess:g} nats){logits}: the initial "
                 f"predictions are confident{' and the same for every sample' if biased else ''}"
                 f"{'' if biased else 'ly random'}"),
        fix=fix,
        evidence={"loss": loss, "expected": expected, "ratio": loss / expected,
                  "num_classes": classes, "threshold": t.max_ratio},
    )
