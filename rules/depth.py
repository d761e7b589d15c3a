"""Signal scale along depth: vanishing (TL103) and exploding (TL104) activations."""

from __future__ import annotations

import math
from statistics import median
from typing import Iterator, Optional

from trainlint.engine import Hit, Thresholds, rule
from trainlint.trace import (
    LayerTrace,
    RunTrace,
    layer_columns,
)

from ._graph import (
    POSITION_PICKS,
    WEIGHT_LAYERS,
    batchnorm_trained_in_eval,
    feeds_residual_sum,
    first_weight_norms,
    in_blocks,
    is_model_output,
    is_norm_type,
    large_input_into,
    layer_at,
    mostly_dead,
    quiet_branches,
)
from .activations import ACTIVATION_TYPES, NORM_WEIGHT_COLLAPSED, gate_layer
from .gradients import UNBOUNDED_FIRST, firing, loss_unbounded

FP16_MAX = 65504.0


def depth_series(trace: RunTrace) -> list[LayerTrace]:
    """The signal path along depth: weight-layer and nonlinearity outputs, in forward order,
    without the model's own output (a zero-initialized head is not a vanishing signal) nor
    the outputs of weight layers zero-initialized on purpose (adaLN-Zero's modulation, a
    zero-initialized last projection of a residual branch, LoRA's B): they start at 0 and
    grow as they learn."""
    zero_init = {name for name, norm in first_weight_norms(trace).items() if norm == 0}
    quiet = quiet_branches(trace)
    series = []
    for lt in trace.ordered_layers():
        act = lt.activation
        if act is None or act.count == 0 or lt.kind in ("softmax", "log_softmax"):
            continue
        if not (lt.kind in ("relu", "tanh", "sigmoid", "gelu") or lt.base in WEIGHT_LAYERS
                or lt.base in ACTIVATION_TYPES):
            continue
        if is_model_output(trace, lt) or (lt.base in WEIGHT_LAYERS and lt.module in zero_init):
            continue
        if in_blocks(lt.module, quiet):  # a branch that a zero-initialized norm quiets
            continue
        series.append(lt)
    return series


def _dominant_nonlinearity(trace: RunTrace, series: list[LayerTrace]) -> str:
    """The most common nonlinearity of the series, gates (an SE block's sigmoid, multiplied
    into the features) left out: they are not what the init is matched to."""
    kinds = [lt.kind for lt in series if lt.kind in ("relu", "tanh", "sigmoid")
             and not gate_layer(trace, lt)]
    return max(set(kinds), key=kinds.count) if kinds else "relu"


# The fix of a scale that drifts because BatchNorm layers trained in eval mode (TL602).
EVAL_MODE_FIX = ("the model's BatchNorm layers ran in eval mode while it trained (TL602): "
                 "they normalized with their running statistics, not the batch's, so nothing "
                 "kept the scale; call model.train() before the training steps (after every "
                 "validation pass)")


def _residual_fix(trace: RunTrace, where: LayerTrace) -> Optional[str]:
    """TL104's fix where the growth runs along a stream of residual branches (at least two
    branch ends before ``where``, the first layer past the threshold): each block adds its
    branch at the stream's own scale, so the stream's variance multiplies block after block
    whatever the per-layer init; None otherwise (residual blocks after a plain trunk that
    grew on its own: the trunk's init is the fix)."""
    layers = trace.ordered_layers()

    def kind(lt: LayerTrace) -> tuple:  # the same place in blocks of one class
        parent, _, leaf = lt.module.rpartition(".")
        return getattr(trace.modules.get(parent), "type", None), leaf, lt.type, lt.op

    # The data-flow graph may lose a sum now and then (paths longer than it follows): each
    # layer in the place of a branch end it saw counts.
    ends = {kind(lt) for lt in layers if feeds_residual_sum(trace, lt)}
    blocks = sum(1 for lt in layers if kind(lt) in ends)
    if sum(1 for lt in layers if kind(lt) in ends and lt.depth < where.depth) < 2:
        return None
    return (f"each of the {blocks} residual branches adds its output to the stream at about the "
            "stream's own scale, so the stream's variance multiplies with every block (about "
            "2x a block at Kaiming init): initialize each branch's last weight layer at "
            f"Kaiming's std times 1/sqrt({blocks}) (x{1 / math.sqrt(blocks):.2g}), or "
            "normalize each branch's input and the stream before the head (pre-norm: "
            "nn.LayerNorm)")


def _init_fix(kind: str, vanishing: bool = False) -> str:
    if kind == "sigmoid" and vanishing:  # no init holds it: slope at most 1/4, not centred
        return ("replace the hidden sigmoids (TL105) with ReLU and initialize with "
                "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu'), or tanh with "
                "nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain('tanh')); "
                "with sigmoids no init holds the scale (their slope is at most 1/4 and their "
                "outputs are not centred), and Xavier at calculate_gain('sigmoid') = 1 leaves "
                "it fading")
    if kind == "relu":
        return ("initialize every weight layer with nn.init.kaiming_normal_(layer.weight, "
                "nonlinearity='relu') (He init, std = sqrt(2 / fan_in))")
    return (f"initialize every weight layer with nn.init.xavier_normal_(layer.weight, "
            f"gain=nn.init.calculate_gain('{kind}')) (Glorot init)")


def _step_scales(step: dict, series: list[LayerTrace], keys: list,
                 measure: str) -> Optional[list[float]]:
    """Each series layer's scale at one observed step (``measure`` "signal": between-sample
    RMS; "rms": RMS); None when one of them was not measured or held NaN/Inf then (a diverged
    step says nothing about scale). ``keys``: the series' point keys."""
    bad = step.get("nonfinite", {}).get("activations", {})
    if any(key in bad for key in keys):
        return None
    found = layer_columns(step.get("layers", {}), keys, ("std", "mean", "signal"))
    if found is None or None in found["std"]:
        return None
    if measure == "signal":
        if None in found["signal"]:
            return None
        scales = found["signal"]
    else:
        scales = [math.hypot(s, m) for s, m in zip(found["std"], found["mean"])]
    if any(scale == 0 and lt.activation.nonfinite for scale, lt in zip(scales, series)):
        return None  # all NaN/Inf: no finite moments
    return scales


def _scale_profiles(trace: RunTrace, window: int, min_layers: int,
                    measure: str = "rms", stream_only: bool = False) -> list[tuple]:
    """(step, series, scales, reference) for each observed step whose profile is finite; one
    profile of the statistics merged over the run (step None) when there is none.
    ``stream_only``: without residual branches' last layers (:func:`feeds_residual_sum`),
    where at least ``min_layers`` others remain."""
    series = depth_series(trace)
    if stream_only:
        stream = [lt for lt in series
                  if lt.base not in WEIGHT_LAYERS or not feeds_residual_sum(trace, lt)]
        # Where the branches' outputs are all that shows the stream (x = x + f(x) with no
        # layer reading it otherwise), they stand for it.
        series = stream if len(stream) >= min_layers else series
    if len(series) < min_layers:
        return []
    keys = [lt.node[1:] for lt in series]
    candidates = [(s.get("step"), scales) for s in trace.per_step
                  if (scales := _step_scales(s, series, keys, measure)) is not None]
    if not candidates:
        merged = [lt.activation.signal if measure == "signal" else lt.activation.rms
                  for lt in series]
        if any(v is None for v in merged) or any(
                v == 0 and lt.activation.nonfinite for v, lt in zip(merged, series)):
            return []  # all NaN/Inf somewhere: no finite moments to compare
        candidates = [(None, merged)]
    profiles = []
    for step, scales in candidates:
        reference = median(scales[:window])
        if reference > 0 and math.isfinite(reference):
            profiles.append((step, series, scales, reference))
    return profiles


def _at_step(step: Optional[int]) -> str:
    return "" if step is None else f" at step {step}"  # 0-based, as every rule's steps


@rule("TL103", "vanishing-activations", "warning", min_ratio=0.01, window=3, min_layers=6)
def vanishing_activations(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Vanishing activations: the signal's scale decays with depth to a small fraction.

    ## What it does
    Along the forward path (outputs of weight layers and nonlinearities, in execution order,
    the model's final output excluded) it compares the scale of the signal in the deepest
    ``window`` layers with that of the first ``window``. The scale is the between-sample RMS
    (how much an output differs from one sample to the next at the same position), so a
    layer whose output is only its bias, the same for every input, counts as vanished; with
    batches of one it falls back to the RMS. It fires when the ratio falls below
    ``min_ratio`` in a network of at least ``min_layers`` such layers, naming the first layer
    below it. A residual branch's last layer (its output added to the stream right away) is
    left out: its scale is the branch's share, small on purpose in GPT-2's and ModernBERT's
    inits, while the skip carries the stream. A layer that takes some positions of a point
    (``hidden[:, 0]``, a [CLS] token) whose between-sample RMS is within the threshold, and
    keeps at least ``min_ratio`` of that point's RMS, is no decay either: the signal is in the
    stream, the positions picked do not carry it yet (ModernBERT's [CLS] at init). Where they
    hold exactly the same values for every sample (between-sample RMS at most ``IDENTICAL``,
    1e-6, of the RMS: a causal model's first token, which sees no other), it is reported,
    with a fix that reads the last real token or pools over the positions.

    ## Why is this bad?
    When activations shrink layer after layer, so do the weight gradients (which are
    proportional to the layer inputs): the deep layers output ~0 and the network barely
    learns. The classic cause is small random weights, e.g. N(0, 0.01²) in a 10-layer MLP,
    where each layer multiplies the scale by about sqrt(fan_in)·0.01 < 1.

    ## Example
    ``nn.init.normal_(layer.weight, std=0.01)`` in a 10 × 500 tanh MLP.

    ## Fix
    Kaiming init for ReLU (``nn.init.kaiming_normal_(w, nonlinearity='relu')``), Xavier for
    tanh (``nn.init.xavier_normal_(w, gain=nn.init.calculate_gain('tanh'))``), or add
    normalization layers / residual connections. Hidden sigmoids fade under any init (their
    slope is at most 1/4): replace them (TL105). When the profile was within the threshold at
    the first observed step and decayed past it later, training made it (units killed or
    saturated by large updates): the fix named is the learning rate and gradient clipping, not
    the init. When the largest drop between two layers of the series is 10-fold or more
    (``sqrt(min_ratio)``) and an observed output between them already holds most of it (a
    VQ-VAE's codebook lookup, initialized at uniform(±1/K), between the encoder and the
    decoder), the finding names that module and its scale. Two decays are left to other
    rules: one behind a ReLU layer with 90% or more of its units dead (TL101 names it), and
    a drop at a norm layer whose output keeps a scale of 0.1 or more (it brought a first
    layer far too large back to scale). Where BatchNorm layers with trainable parameters ran
    in eval mode during training (TL602), they normalized with running statistics: the fix
    is ``model.train()``. The init fix follows the hidden layers' nonlinearity, gates (an SE
    block's sigmoid) left out; where norm layers' scales start above 0 but below
    ``NORM_WEIGHT_COLLAPSED`` (0.1), the fix names them (initialize them at 1). In a Monitor
    run whose profiles over the last half of the observed steps (two at least) are all back
    within the threshold, training escaped the decay (a VQ-VAE whose codebook, at
    uniform(±1/K), grows toward the encoder's outputs): not reported. (A tanh MLP at N(0,
    0.05) under SGD that escapes only in its last tenth spent the run decayed: reported.)
    """
    measure = "signal"
    profiles = _scale_profiles(trace, t.window, t.min_layers, measure, stream_only=True)
    if not profiles:
        measure = "rms"
        profiles = _scale_profiles(trace, t.window, t.min_layers, measure, stream_only=True)
    # A Monitor run whose profiles over the last half of its observed steps (two at least) are
    # all back within the threshold escaped the decay by training (a VQ-VAE's codebook at
    # uniform(±1/K) grows toward the encoder's outputs); one that escapes only near its end
    # spent the run decayed.
    late = profiles[len(profiles) // 2:]
    resolved = (trace.mode == "monitor" and len(late) >= 2 and late[0][0] is not None
                and all(median(scales[-t.window:]) / reference >= t.min_ratio
                        for _, _, scales, reference in late))
    for step, series, scales, reference in profiles:
        deep = median(scales[-t.window:])
        ratio = deep / reference
        if ratio >= t.min_ratio or resolved:
            continue
        first = next(i for i, s in enumerate(scales) if s < t.min_ratio * reference)
        where = series[first]
        if any(mostly_dead(lt) for lt in series[:first + 1]):
            continue  # dead ReLUs stop the signal: TL101 names them, with its own fix
        picked = (_picked_positions(trace, step, where, t.min_ratio, reference)
                  if measure == "signal" else None)
        alike = None
        if picked is not None:
            signal, rms = _scales_at(trace, step, where)
            if signal is None or signal > IDENTICAL * rms:
                continue  # the stream holds the signal; the positions picked do not yet
            alike = picked  # the same values for every sample: nothing to learn from
        drop = _drop_between(trace, step, series, scales[:first + 1], measure,
                             math.sqrt(t.min_ratio))
        if drop is not None and is_norm_type(drop[0].base) and drop[1] >= RESCALED:
            continue  # a norm brings an outsized signal back to scale: nothing vanishes
        # Within the threshold at the first observed step: training made it, not the init.
        trained = step is not None and step != profiles[0][0]
        drop = None if trained else drop
        at = ""
        if trained:
            fix = (f"the decay came with training (within the threshold"
                   f"{_at_step(profiles[0][0])}): large updates killed or saturated units "
                   "(TL101, TL102 name such layers): lower the learning rate (TL503) and clip "
                   "gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), "
                   "max_norm=1.0)); normalization layers keep the scale in check")
        elif drop is not None:
            point, scale, before = drop
            at = (f"; the signal falls at {point.label} ({point.type}), {scale:.3g} right "
                  f"after {before[0].label}'s {before[1]:.3g}")
            fix = (f"{point.module!r} ({point.type}) outputs a scale of {scale:.3g} where the "
                   f"signal reaching it has {before[1]:.3g}, and the layers after it keep "
                   f"that: initialize its parameters at the signal's scale (an embedding or "
                   f"codebook read as features: nn.init.normal_(weight, std=1.0), or the range "
                   f"of what it stands for; a norm layer's scale: 1), or normalize its output")
        else:
            fix = _init_fix(_dominant_nonlinearity(trace, series), vanishing=True)
            shrunk = _shrunk_norms(trace, where)
            if shrunk:
                fix = (f"{len(shrunk)} norm layer(s) start with their scale (weight) near 0 "
                       f"(RMS {shrunk[0][1]:.3g} at {shrunk[0][0]!r}"
                       + (f", and {len(shrunk) - 1} more" if len(shrunk) > 1 else "")
                       + "), so each scales its output down to that size: initialize them "
                       "with nn.init.ones_(norm.weight) and nn.init.zeros_(norm.bias)")
        if batchnorm_trained_in_eval(trace):
            fix = EVAL_MODE_FIX
        if alike is not None:
            drop = None
            fix = (f"{where.label} takes positions of {alike.label} that hold the same values "
                   f"for every sample, while the others differ: nothing reaches them from the "
                   f"input (a causal model's first token, BOS, sees no token after it; a "
                   f"padding position); read the last real token instead "
                   f"(hidden[torch.arange(n), lengths - 1]), or pool over the positions "
                   f"(a masked mean)")
        yield Hit(
            module=where.module if drop is None else drop[0].module,
            message=(f"activation scale decays along depth{_at_step(step)}: {reference:.3g} in "
                     f"the first layers, {deep:.3g} in the last ({ratio:.2g}×, threshold "
                     f"{t.min_ratio:g}×); it first falls below the threshold at {where.label} "
                     f"(layer {first + 1} of {len(series)}){at}"),
            fix=fix,
            evidence={"ratio": ratio, "threshold": t.min_ratio, "first_rms": reference,
                      "last_rms": deep, "layers": len(series), "step": step},
        )
        return


def _scales_at(trace: RunTrace, step: Optional[int], lt: LayerTrace) -> tuple:
    """``(between-sample RMS or None, RMS)`` of ``lt``'s output at observed step ``step``
    (merged over the run when the step did not measure it, or ``step`` is None)."""
    entry = next((s for s in trace.per_step if s.get("step") == step), None)
    found = (layer_columns(entry.get("layers", {}), [lt.node[1:]], ("std", "mean", "signal"))
             if entry is not None else None)
    if found is None or None in (found["std"][0], found["mean"][0]):
        return lt.activation.signal, lt.activation.rms
    return found["signal"][0], math.hypot(found["std"][0], found["mean"][0])


# A between-sample RMS at most this share of the RMS: every sample's values are the same
# (float32 rounding aside).
IDENTICAL = 1e-6


def _picked_positions(trace: RunTrace, step: Optional[int], where: LayerTrace,
                      min_ratio: float, reference: float) -> Optional[LayerTrace]:
    """The point some positions of which (``POSITION_PICKS``: a [CLS] token) ``where`` takes,
    when its between-sample RMS is at least ``min_ratio`` × ``reference`` and ``where`` keeps
    at least ``min_ratio`` of its RMS, as its between-sample RMS does not: the signal is in
    the stream, but the positions picked do not carry it (yet: ModernBERT at init, whose
    residual branches start ~100x below the stream, so the [CLS] token barely differs
    between samples until they grow; or never: a causal model's first token). None
    otherwise."""
    own = _scales_at(trace, step, where)[1]
    for edge in trace.edges:
        if edge.dst not in (("module", where.module), where.node) or \
                not POSITION_PICKS.intersection(edge.via):
            continue
        src = layer_at(trace, edge.src)
        if src is None or src.activation is None:
            continue
        signal, rms = _scales_at(trace, step, src)
        if signal is not None and signal >= min_ratio * reference and own >= min_ratio * rms:
            return src
    return None


def _shrunk_norms(trace: RunTrace, where: LayerTrace) -> list[tuple]:
    """``(name, weight RMS)`` of the norm layers whose scale started above 0 but below
    ``NORM_WEIGHT_COLLAPSED`` (transformers' EfficientNet draws BatchNorm weights from
    N(0, 0.02)), those that run before ``where`` (the decay's first layer below the
    threshold) first; none unless one does. A scale of exactly 0 is a residual branch's zero
    init."""
    order = trace.ordered_layers()
    before = {lt.module for lt in order[:order.index(where)]} if where in order else set()
    found = []
    for p in trace.params:
        facts = trace.modules.get(p.module)
        if not p.name.endswith(".weight") or facts is None or not is_norm_type(facts.base) \
                or not p.norms_before or not p.shape:
            continue
        rms = p.norms_before[0] / math.sqrt(math.prod(p.shape))
        if 0 < rms < NORM_WEIGHT_COLLAPSED:
            found.append((p.module, rms))
    if not any(name in before for name, _ in found):
        return []  # (a shrunk norm after the decay does not make it)
    return sorted(found, key=lambda pair: (pair[0] not in before, pair[1]))


# A norm layer's output at or above this scale where the signal falls: the norm brought an
# outsized signal back to its scale (a first layer far too large), which is TL104's or
# TL301's to report; a norm whose scale (gamma) starts near 0 outputs far less.
RESCALED = 0.1


def _drop_between(trace: RunTrace, step: Optional[int], series: list, scales: list,
                  measure: str, steep: float) -> Optional[tuple]:
    """``(point, its scale, (series layer before it, that layer's scale))`` of an observed
    point outside the depth series whose module holds parameters (an embedding, a codebook
    lookup, a norm layer's scale) where the signal falls: the largest drop between two
    consecutive series layers in ``scales`` is at least 1 / ``steep``-fold, and the point
    runs between them with most of the drop (in log scale) already behind it. None when no
    such point was seen."""
    if step is None or len(scales) < 2:
        return None
    values = next((s.get("layers", {}) for s in trace.per_step if s.get("step") == step), {})
    j = min(range(1, len(scales)), key=lambda i: scales[i] / scales[i - 1]
            if scales[i - 1] > 0 else math.inf)
    if not scales[j - 1] > 0 or scales[j] / scales[j - 1] > steep:
        return None
    lo, hi = series[j - 1].depth, series[j].depth
    midway = math.sqrt(scales[j - 1] * scales[j])
    # Only a module with parameters has an init that sets its scale (a pooling's average over
    # positions lowers the between-sample scale by itself).
    weighted = {p.module for p in trace.params}
    in_series = {id(lt) for lt in series}
    found = []
    for lt in trace.layers:
        if not lo < lt.depth < hi or id(lt) in in_series or lt.module not in weighted:
            continue
        found_values = values.get(lt.node[1:])
        if not found_values:
            continue
        scale = (found_values.get("signal") if measure == "signal" else
                 math.hypot(found_values.get("std") or 0.0, found_values.get("mean") or 0.0))
        if scale is not None and scale <= midway:
            found.append((scale, lt))
    if not found:
        return None
    scale, point = min(found, key=lambda item: item[0])
    return point, scale, (series[j - 1], scales[j - 1])


@rule("TL104", "exploding-activations", "warning", max_ratio=1000.0, window=3, min_layers=6,
      fp16_fraction=0.25)
def exploding_activations(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Exploding activations: the signal's scale grows with depth by orders of magnitude, or
    magnitudes approach the float16 range.

    ## What it does
    Along the forward path it compares the RMS of the deepest ``window`` layers with that of
    the first ``window`` and fires when the ratio exceeds ``max_ratio``. Separately it fires
    when any activation's magnitude reaches ``fp16_fraction`` of float16's maximum (65504),
    where mixed-precision training overflows to Inf; that check follows the run's dtype
    (``RunTrace.amp_dtype``): it is skipped under bfloat16, whose range is float32's.

    ## Why is this bad?
    Growing activations mean growing gradients and unstable updates; in float16 they overflow
    to Inf and then NaN.

    ## Example
    A 10-layer ReLU MLP initialized with ``nn.init.normal_(w, std=1.0)`` (each layer multiplies
    the scale by about sqrt(fan_in / 2)).

    ## Fix
    Kaiming/Xavier initialization matched to the nonlinearity, normalization layers, and a
    lower learning rate. When the profile was within the threshold at the first observed step
    and grew past it later, training grew it: the fix named is the learning rate and gradient
    clipping, not the init. In a model that adds residual branches to a stream, the fix is
    the branches' scale (their last layer's init times 1/sqrt(blocks)) or pre-norm: a
    30-block ``x + relu(fc(x))`` MLP still reached NaN at Kaiming init, and trained at
    Kaiming x 1/sqrt(30). Where the loss falls without bound as well (TL604), it is the
    sign of that loss's term. Where BatchNorm layers with trainable parameters ran in eval mode
    during training (TL602), the fix is ``model.train()``.
    """
    profiles = _scale_profiles(trace, t.window, t.min_layers)
    for step, series, scales, reference in profiles:
        deep = median(scales[-t.window:])
        ratio = deep / reference
        if ratio > t.max_ratio:
            first = next(i for i, s in enumerate(scales) if s > t.max_ratio * reference)
            where = series[first]
            # Within the threshold at the first observed step: training grew it, not the init.
            grew = step is not None and step != profiles[0][0]
            fix = (f"the growth came with training (within the threshold"
                   f"{_at_step(profiles[0][0])}): lower the learning rate (TL503) and clip "
                   "gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), "
                   "max_norm=1.0)); normalization layers keep the scale in check" if grew
                   else _residual_fix(trace, where)
                   or _init_fix(_dominant_nonlinearity(trace, series)))
            if grew and loss_unbounded(trace):
                fix = UNBOUNDED_FIRST
            if batchnorm_trained_in_eval(trace):
                fix = EVAL_MODE_FIX
            yield Hit(
                module=where.module,
                message=(f"activation RMS grows along depth{_at_step(step)}: {reference:.3g} "
                         f"in the first layers, {deep:.3g} in the last ({ratio:.3g}×, "
                         f"threshold {t.max_ratio:g}×); it first exceeds it at {where.label}"),
                fix=fix,
                evidence={"ratio": ratio, "threshold": t.max_ratio, "first_rms": reference,
                          "last_rms": deep, "step": step, "grew_in_training": grew},
            )
            return
    if trace.amp_dtype == "bfloat16":
        return
    limit = t.fp16_fraction * FP16_MAX
    overflow = ("this run computes in float16 and overflows there to Inf"
                if trace.amp_dtype == "float16" else "mixed precision would overflow to Inf")
    for lt in trace.ordered_layers():
        act = lt.activation
        if act is None or act.nonfinite:
            continue
        peak = max(abs(act.min), abs(act.max))
        if math.isfinite(peak) and peak >= limit:
            raw = large_input_into(trace, lt.module) if lt.op == "output" else None
            grown = _grown_in_training(trace, lt, peak, limit)
            if grown is not None and firing(trace, ("TL301",),
                                            lambda hit: hit.evidence.get("ratio", 0) > 1):
                grown = None  # weights initialized larger than their fan-in calls for: the init
            if grown is not None:
                (first_step, first), (step, later) = grown
                fix = (f"the magnitudes came with training (RMS {first:.3g} at step "
                       f"{first_step}, {later:.3g} at step {step}): lower the learning rate "
                       "(TL503) and clip gradients (torch.nn.utils.clip_grad_norm_("
                       "model.parameters(), max_norm=1.0)); or keep this part in "
                       "float32/bfloat16")
                if loss_unbounded(trace):
                    fix = UNBOUNDED_FIRST
            elif raw is None:
                fix = ("rescale the layer's init (Kaiming/Xavier), add a normalization layer "
                       "before it, or keep this part in float32/bfloat16")
            else:
                fix = (f"standardize the model's input {raw[0]!r} (RMS {raw[1]:.3g}) before "
                       f"{lt.module!r} takes it: x = (x - mean) / std with the training set's "
                       "statistics (TL201); or keep this part in float32/bfloat16")
            yield Hit(
                module=lt.module,
                message=(f"activations of {lt.label} reach |x| = {peak:.3g}, "
                         + (f"{peak / FP16_MAX:.0%} of" if peak < FP16_MAX else
                            f"{peak / FP16_MAX:.3g}x") +
                         f" the float16 maximum {FP16_MAX:g} (threshold "
                         f"{t.fp16_fraction:.0%}): {overflow}"),
                fix=fix,
                evidence={"max_abs": peak, "threshold": limit, "dtype": trace.amp_dtype,
                          "grew_in_training": grown is not None},
            )
            return


# A layer whose RMS at a later observed step is this many times its first one grew with
# training.
GREW = 10.0


def _grown_in_training(trace: RunTrace, lt: LayerTrace, peak: float,
                       limit: float) -> Optional[tuple]:
    """``((first step, its RMS), (a later step, its RMS))`` where the layer's RMS at a later
    observed step is past ``GREW`` x its RMS at the first (finite ones only), and the first
    step's peak, taken as the run's ``peak`` scaled by the RMS, was below ``limit`` (a layer
    past the limit at the first step is the init's, however it grew after), else None."""
    key = lt.node[1:]
    seen = []
    for s in trace.per_step:
        found = layer_columns(s.get("layers", {}), [key], ("std", "mean"))
        if found is None or None in found["std"]:
            continue
        rms = math.hypot(found["std"][0], found["mean"][0] or 0.0)
        if math.isfinite(rms):
            seen.append((s.get("step"), rms))
    if len(seen) < 2 or seen[0][1] <= 0:
        return None
    later = max(seen[1:], key=lambda item: item[1])
    first_peak = peak * seen[0][1] / later[1]
    return (seen[0], later) if later[1] > GREW * seen[0][1] and first_peak < limit else None
