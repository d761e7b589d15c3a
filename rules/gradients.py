"""Gradients and updates: vanishing/exploding gradients, the update ratio."""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import median
from typing import Callable, Iterator, Optional

from trainlint.engine import RULES, Hit, Skip, Thresholds, rule
from trainlint.trace import (
    CLASSIFICATION_LOSSES,
    LayerTrace,
    ParamTrace,
    RunTrace,
    layer_columns,
)

from ._graph import (
    EMBEDDING_TYPES,
    LARGE_FEATURES,
    RNN_TYPES,
    WEIGHT_LAYERS,
    feeds_dead_layer,
    feeds_norm,
    first_weight_norms,
    frozen_at_zero,
    in_blocks,
    inside_attention_sublayer,
    layer_scaled_branches,
    output_layer,
    output_nodes,
    quiet_branches,
    rms_of_input,
)


def gradient_series(trace: RunTrace) -> list[LayerTrace]:
    """Weight-layer outputs with a finite gradient, in forward order, without the model's
    output (its gradient is set by the loss, not by backpropagation through the network) and
    without projections inside attention blocks (at init the softmax is nearly flat, so the
    query/key gradients are orders of magnitude below the rest in every healthy transformer)
    nor layers of residual branches a zero-initialized norm or a small layer scale quiets
    (:func:`quiet_branches`, :func:`layer_scaled_branches`)."""
    out = output_layer(trace)
    quiet = quiet_branches(trace) + layer_scaled_branches(trace)
    series = []
    for lt in trace.ordered_layers():
        if lt.op != "output" or lt.base not in WEIGHT_LAYERS or lt.grad_norm is None:
            continue
        if inside_attention_sublayer(trace, lt.module) or in_blocks(lt.module, quiet):
            continue
        if lt.grad_nonfinite or not math.isfinite(lt.grad_norm):
            continue
        if out is not None and lt.node == out.node:
            continue
        series.append(lt)
    return series


# Output activations that squash their input into a bounded range: the gradient of a loss on
# their output is no measure of the backward signal (TL501 reads the layer before them).
SQUASHING_KINDS = frozenset({"sigmoid", "tanh", "softmax"})


def _profile(trace: RunTrace, window: int, min_layers: int,
             with_signal: bool = False) -> Optional[tuple]:
    """``(series, grads, early median, late median)`` along depth; ``with_signal``: only the
    layers whose gradient is not exactly 0 (a branch the loss ignores, such as an auxiliary
    head weighted 0 or an expert that got no token, carries no backward signal to compare)."""
    series = gradient_series(trace)
    if with_signal:
        series = [lt for lt in series if lt.grad_norm > 0]
    if len(series) < min_layers:
        return None
    grads = [lt.grad_norm for lt in series]
    return series, grads, median(grads[:window]), median(grads[-window:])


@rule("TL501", "vanishing-gradients", "warning", min_ratio=1e-3, zero_ratio=1e-6, window=3,
      min_layers=4, update_fade=0.1)
def vanishing_gradients(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Vanishing gradients: early layers get gradients orders of magnitude below the last ones.

    ## What it does
    Along depth (outputs of Linear/Conv/RNN layers, in forward order, the model's output, the
    projections inside attention sub-layers, and the layers of residual branches that a norm
    initialized at 0 or a layer scale of RMS <= ``LAYER_SCALE`` (1e-3: ConvNeXt's 1e-6,
    ReZero's 0) quiets by design left out) it takes the norm of the gradient of the
    loss with respect to each layer's output, over the observed steps. It fires when the median
    of the first ``window`` layers is below ``min_ratio`` × the median of the last ``window``
    (in a network of at least ``min_layers`` such layers), or below ``zero_ratio`` × the
    gradient at the model's output (~0; where the output is a sigmoid, tanh or softmax, at the
    layer before it: BCE on a sigmoid output has a gradient there of ~1/(p (1 - p)), 3.5e9 at
    a Siamese ResNet's confidently wrong outputs, which the sigmoid's backward cancels). The
    finding names the first layer, going backward from
    the output, below the threshold. Where the optimizer's updates were measured, a fade (not
    ~0) must also show in them: the median update ratio ‖Δw‖/‖w‖ of the first layers' weights
    below ``update_fade`` × the last layers'. An optimizer that scales each parameter's step by
    its own gradient's size (Adam, AdamW, Adafactor, Lion) moves the early layers as fast as
    the late ones however small their gradient (Whisper at init: 1500 audio positions behind
    cross-attention give the encoder 1e-4 of the decoder's gradient; under AdamW both move
    0.5% a step, under SGD the encoder 100x slower). A layer whose output goes into a ReLU
    layer with 90% or more of its units dead gets no gradient back through them: TL101 names
    that layer with its fix, and this rule leaves it. Gradients of exactly 0 seen at the run's
    first step alone, at every layer before a weight the optimizer steps that was exactly 0
    then (MLP-Mixer's zero head, a diffusion U-Net's zero output conv), are not judged yet: a
    zero weight off to the side (a LoRA B beside layers that get a gradient) is no cause for
    them. The first update moves
    that weight and the gradient flows behind it from the next step on (a Monitor with
    ``fail_on`` stopped such healthy runs at step 0).

    ## Why is this bad?
    The weight gradient of a layer is proportional to the gradient reaching its output: if
    that fades toward the input, the early layers barely learn. Causes: small weights
    (each layer scales the backward signal by about its weight scale × sqrt(fan-out)),
    saturated tanh/sigmoid units, dead ReLUs, very deep plain stacks.

    ## Example
    A 10-layer tanh MLP with ``nn.init.normal_(w, std=0.01)``: each layer shrinks the
    gradient about 4×.

    ## Fix
    Kaiming/Xavier init matched to the nonlinearity; ReLU/GELU instead of sigmoid/tanh;
    normalization layers; residual connections. Where the first layers' gradient is exactly
    0 (the layer named too), the signal is cut, not faded: a factor at 0 that does not train
    (a gate ``tanh(alpha)`` with ``alpha`` a plain tensor, not an ``nn.Parameter``; a zero
    conv frozen by mistake), or a ``.detach()``; no init helps.
    """
    profile = _profile(trace, t.window, t.min_layers)
    if profile is None:
        return
    series, grads, early, late = profile
    out = output_layer(trace)
    if out is not None and out.kind in SQUASHING_KINDS:
        # A loss on probabilities (BCE on a sigmoid) has a gradient there of ~1/(p (1 - p)):
        # 3.5e9 at confidently wrong outputs, all of it cancelled by the squash's backward.
        out = next((lt for lt in reversed(series) if lt.depth < out.depth), None)
    reference = out.grad_norm if out is not None and out.grad_norm else None
    near_zero = reference is not None and early <= t.zero_ratio * reference
    ratio = early / late if late > 0 else (0.0 if early == 0 else math.inf)
    if ratio >= t.min_ratio and not near_zero:
        return
    moves = _update_fade(trace, series, t.window)
    if not near_zero and moves is not None and moves >= t.update_fade:
        return
    limit = t.min_ratio * late if late > 0 else t.zero_ratio * (reference or 0.0)
    where = next((lt for lt in reversed(series) if lt.grad_norm <= limit), series[0])
    if feeds_dead_layer(trace, where):
        return  # its gradient stops at dead ReLUs: TL101 names them, with its own fix
    zero = (f"; {early:.3g} is ~0 next to the {reference:.3g} at the model's output "
            f"(threshold {t.zero_ratio:g}×)" if near_zero else "")
    fix = ("initialize weight layers with nn.init.kaiming_normal_(w, nonlinearity='relu') "
           "(ReLU) or nn.init.xavier_normal_(w, gain=nn.init.calculate_gain('tanh')) (tanh); "
           "prefer ReLU/GELU to sigmoid/tanh; add normalization layers or residual "
           "connections")
    frozen = frozen_at_zero(trace) if early == 0 and where.grad_norm == 0 else None
    if frozen == [] and _zero_init_ahead(trace, series):
        return  # the first update moves the weights at 0: the gradient flows from then on
    if frozen:
        fix = (f"the gradient at {where.label} is exactly 0, not faded: "
               f"{', '.join(repr(m) for m in frozen)} is frozen at 0 (requires_grad=False) and "
               "multiplies everything behind it by 0; let it train (requires_grad_(True), in "
               "the optimizer)")
    elif frozen is not None:  # exactly 0, with no frozen layer at 0 that ran
        fix = (f"the gradient at {where.label} is exactly 0, not faded: the backward signal is "
               "cut on its way from the loss, and no init brings it back; look there for a "
               "factor of exactly 0 that does not train (a gate or scale initialized at 0 but "
               "held as a plain tensor or buffer, not an nn.Parameter; a layer at 0 frozen with "
               "requires_grad_(False)), a .detach()/.data/torch.no_grad(), or an op without a "
               "gradient (round, sign, argmax, a comparison: a straight-through estimator, "
               "x + (round(x) - x).detach(), passes one)")
    yield Hit(
        module=where.module,
        message=(f"gradient norms fade toward the input: median {early:.3g} at the first "
                 f"{t.window} layers vs {late:.3g} at the last {t.window} ({ratio:.3g}×, "
                 f"threshold {t.min_ratio:g}×){zero}; going backward it first drops below the "
                 f"threshold at {where.label} ({series.index(where) + 1} of {len(series)})"),
        fix=fix,
        evidence={"ratio": ratio, "first_grad_norm": early, "last_grad_norm": late,
                  "output_grad_norm": reference, "threshold": t.min_ratio,
                  "layers": len(series), "update_fade": moves},
    )


def _zero_init_ahead(trace: RunTrace, series: list) -> bool:
    """Whether only the run's first step was observed and a weight layer whose weight the
    optimizer steps was exactly 0 before it, with every layer of ``series`` (the gradient's
    path along depth) before it in forward order at a gradient of exactly 0 (MLP-Mixer's
    zero head, a diffusion U-Net's zero output conv): everything behind it gets a gradient of
    exactly 0 at that step only, by design (a Monitor with ``fail_on`` stopped such runs at
    step 0). A zero weight off to the side (a LoRA B beside a decoder whose layers get a
    gradient) does not excuse a cut before them, such as a ``round`` without a
    straight-through estimator."""
    if [s["step"] for s in trace.per_step] != [0]:
        return False
    order = {lt.node: i for i, lt in enumerate(trace.ordered_layers())}
    for name, norm in first_weight_norms(trace).items():
        at = [order[node] for node in output_nodes(trace, name) if node in order]
        if norm != 0 or not at:
            continue
        before = [lt for lt in series if order.get(lt.node, len(order)) < min(at)]
        if before and all(lt.grad_norm == 0 for lt in before):
            return True
    return False


def _update_fade(trace: RunTrace, series: list, window: int) -> Optional[float]:
    """The median update ratio of the weights of the first ``window`` layers of ``series``
    over that of the last ``window`` (each weight's largest ratio over the observed steps);
    None when either side has no measured update or the last layers' is 0."""
    ratios: dict = {}
    for p in trace.params:
        if len(p.shape) >= 2 and p.update_ratios:
            ratios.setdefault(p.module, []).append(update_ratio_of(p))
    early = [r for lt in series[:window] for r in ratios.get(lt.module, [])]
    late = [r for lt in series[-window:] for r in ratios.get(lt.module, [])]
    if not early or not late or not median(late) > 0:
        return None
    return median(early) / median(late)


def nice_below(x: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above ``x``."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    power = 10.0 ** math.floor(math.log10(x))
    return max(m * power for m in (1, 2, 5) if m * power <= x * (1 + 1e-9))


# The max_norm suggested when the measured gradients are smaller (a run that converged
# early: its last steps' gradients are ~0, and clipping to them would freeze training).
MIN_CLIP = 1.0


def _usual_grad_norm(trace: RunTrace, p: ParamTrace) -> Optional[float]:
    """A parameter's usual gradient norm: the median of its finite, non-zero norms over the
    observed steps that kept them (its last one where none did), or None."""
    norms = [s["param_grad_norms"].get(p.name) for s in trace.per_step
             if s.get("param_grad_norms")]
    norms = [g for g in norms if g is not None and math.isfinite(g) and g > 0]
    if not norms and p.grad_norm is not None and math.isfinite(p.grad_norm) and p.grad_norm > 0:
        norms = [p.grad_norm]
    return median(norms) if norms else None


def suggested_max_norm(trace: RunTrace) -> tuple[float, float, int]:
    """A clip_grad_norm_ max_norm: the total norm the gradient would have with every
    parameter's gradient at the median of their usual levels. Returns (max_norm, median,
    count)."""
    norms = [g for g in (_usual_grad_norm(trace, p) for p in trace.params) if g is not None]
    if not norms:
        return 1.0, 0.0, 0
    typical = median(norms)
    return nice_below(typical * math.sqrt(len(norms))), typical, len(norms)


def _clip_fix(trace: RunTrace, t: Thresholds) -> tuple[str, float]:
    clip, typical, count = suggested_max_norm(trace)
    if count and clip < MIN_CLIP:
        basis = (f" (the usual default: at the measured median {typical:.3g} over the steps, "
                 f"the gradients would total only {clip:g}, "
                 f"too little to clip to)")
        clip, scale = MIN_CLIP, ""
    elif count and clip <= t.max_norm:
        basis = (f" (the total norm if every parameter's gradient were at the measured median "
                 f"{typical:.3g} over the steps, over {count} parameter"
                 f"{'s' if count != 1 else ''})")
        scale = ""
    else:
        clip, basis = 1.0, ""
        if trace.loss_kind in CLASSIFICATION_LOSSES:  # its per-sample gradient is bounded
            scale = ("; the gradients are large everywhere: the weights are too large for "
                     "their fan-in (check TL301 and TL104) or the loss is summed, not averaged "
                     "(reduction='mean')")
        else:
            scale = ("; the gradients are large everywhere, so the loss itself is too large: "
                     "standardize regression targets, use reduction='mean'")
    targets = _target_scale(trace)
    if targets:
        scale = ""  # (the targets say why the gradients are large everywhere)
    return (f"{targets}clip between loss.backward() and optimizer.step(): "
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={clip:g}){basis}"
            f"{scale}; also lower the learning rate and use Kaiming/Xavier init or "
            f"normalization layers"), clip


# A first mean squared error at or above this is the targets' scale, not the model's: with
# standardized targets it starts near 1 (their variance plus the outputs').
TARGET_MSE = 100.0


# Outputs whose own spread (std) at the first step is at least this share of their distance
# to the targets (the first MSE's root) are what is far off, not the targets.
OUTPUT_SHARE = 0.5


def _first_output_spread(trace: RunTrace) -> Optional[float]:
    """The std of the model's output at the first observed step that measured it, or None
    (its spread, not its RMS: a head whose bias starts at the targets' mean is offset, not
    far off)."""
    out = output_layer(trace)
    if out is None:
        return None
    for step in trace.per_step:
        found = layer_columns(step.get("layers", {}), [out.node[1:]], ("std",))
        if found is not None and found["std"][0] is not None:
            return found["std"][0]
    return None


def _target_scale(trace: RunTrace) -> str:
    """The fix's first words when the loss is one MSE term whose first value is at least
    ``TARGET_MSE``: the regression targets are far from unit scale, and the loss's gradient
    scales with them; or, when the outputs themselves start that far off (at least
    ``OUTPUT_SHARE`` of the distance), a raw model input (RMS above ``LARGE_FEATURES``), or,
    without one, the signal growing inside the model. An empty string otherwise."""
    if trace.loss_kind != "mse" or (trace.loss_terms or 1) > 1 or not trace.losses:
        return ""
    first = trace.losses[0]
    if not (math.isfinite(first) and first >= TARGET_MSE):
        return ""
    distance = math.sqrt(first)
    outputs = _first_output_spread(trace)
    if outputs is None or outputs < OUTPUT_SHARE * distance:
        return (f"standardize the regression targets (y - y.mean()) / y.std() and scale the "
                f"predictions back: the first MSE is {first:.3g}, so the outputs start "
                f"~{distance:.3g} (RMS) from the targets and every gradient scales with "
                f"that; or ")
    raw = max(((rms_of_input(i), i.name) for i in trace.inputs), default=None)
    if raw is None or raw[0] <= LARGE_FEATURES:
        recurrent = any(f.base in RNN_TYPES for f in trace.modules.values())
        return (f"the model's outputs start with a std of {outputs:.3g}, ~{distance:.3g} from the "
                f"targets (first MSE {first:.3g}), and every gradient scales with that: the "
                f"signal grows inside the model (check TL104 and TL301"
                + ("; a recurrent weight_hh above 1 grows the state at every time step: "
                   "nn.init.orthogonal_(weight_hh)" if recurrent else "") + "); then ")
    return (f"standardize the model's input {raw[1]!r} (RMS {raw[0]:.3g}) with the training "
            f"set's mean and std (TL201): the outputs start with a std of {outputs:.3g}, "
            f"~{distance:.3g} from the targets (first MSE {first:.3g}), and every gradient "
            f"scales with that; or ")


def scale_invariant_weights(trace: RunTrace) -> set:
    """Names of weights whose layer's output goes straight into a normalization layer (an
    embedding table too: RWKV starts its own at ~1e-4 before a LayerNorm, and the table's
    gradient is then ~1/scale large by design)."""
    names = set()
    for p in trace.params:
        facts = trace.modules.get(p.module)
        if len(p.shape) >= 2 and facts is not None and \
                facts.base in WEIGHT_LAYERS + EMBEDDING_TYPES and feeds_norm(trace, p.module):
            names.add(p.name)
    return names


def total_grad_norm(step: dict, skip: set) -> Optional[float]:
    """One observed step's gradient norm over the parameters not in ``skip``."""
    norms = step.get("param_grad_norms")
    if norms is None:
        return step.get("grad_norm")
    kept = [g for name, g in norms.items() if name not in skip]
    return math.sqrt(sum(g * g for g in kept)) if kept else None


def _largest_grad(trace: RunTrace, step: int, skip: set) -> Optional[tuple]:
    """``(name, norm)`` of the largest finite parameter gradient at observed step ``step``
    (the last observed gradients when the step kept no per-parameter norms)."""
    at = next((s.get("param_grad_norms") for s in trace.per_step if s["step"] == step), None)
    if at is None:
        at = {p.name: p.grad_norm for p in trace.params if p.grad_norm is not None}
    finite = [(name, g) for name, g in at.items() if math.isfinite(g) and name not in skip]
    return max(finite, key=lambda pair: pair[1]) if finite else None


@rule("TL502", "exploding-gradients", "warning", max_ratio=1e3, max_norm=1e3, window=3,
      min_layers=4, settle_steps=2, settle_rise=1.5)
def exploding_gradients(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Exploding gradients: huge, or growing by orders of magnitude toward the input.

    ## What it does
    Fires when the median gradient norm at the first ``window`` weight layers' outputs exceeds
    ``max_ratio`` × that of the last ``window`` (at least ``min_layers`` layers; layers whose
    gradient is exactly 0, such as an auxiliary head weighted 0 or an expert that got no
    token, carry no backward signal and are left out), or when the total gradient norm
    over the parameters exceeds ``max_norm`` at an observed step (per sample when the loss
    adds up its samples' terms with no average, ``reduction="sum"``: the pytorch/examples
    VAE's gradients are batch-size times an averaged loss's, which its learning rate or
    Adam's scaling absorbs). Weights
    of layers that feed a normalization layer directly are left out of that total: the norm
    cancels their scale, so their gradient's norm is about 1/‖w‖ (large for a small init such
    as transformers' std 0.02 before a BatchNorm) whatever the backward signal does; their
    effective step is TL503's to judge. A total above ``max_norm`` at the run's first step
    alone is a transient of the init that training got past when at least ``settle_steps``
    steps follow, each below ``max_norm`` with a loss at most ``settle_rise`` × the first
    (DeiT's zero-initialized class and position tokens reach a LayerNorm of eps 1e-12 as zero
    vectors at step 0: a total norm near 1e4 that step, ~10 after).

    ## Why is this bad?
    Huge gradients make huge updates: the loss jumps or diverges, and in mixed precision they
    overflow to Inf. Gradients that grow toward the input make the early layers' updates
    dominate and the training unstable.

    ## Example
    A deep MLP or RNN with weights too large for its fan-in (``nn.init.normal_(w, std=1.0)``).

    ## Fix
    Clip the gradient norm between ``loss.backward()`` and ``optimizer.step()``:
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=...)`` (the finding suggests
    the total norm the gradients would have with every parameter's at the median of their
    usual levels over the observed steps; at least ``MIN_CLIP``, 1: a run that converged early
    has gradients of ~0 at its last steps, and clipping to those would freeze training);
    lower the learning rate; fix the init; add normalization.
    With one MSE loss whose first value is at least ``TARGET_MSE`` (100), the finding says
    first to standardize the regression targets: the outputs start that far from them, and
    every gradient scales with it (targets ~500, as in house prices, give ~1e3). When the
    outputs themselves start at least ``OUTPUT_SHARE`` (half) of that distance off, the
    targets are not the cause: a raw model input (RMS above ``LARGE_FEATURES``) is named
    instead, where there is one. Where the loss falls without bound (TL604), the fix is the
    loss (a term's sign, a scale without a floor): the gradients grow with it, and clipping
    does not stop it. Where the batch of the step it names holds values at least
    ``OUTLIER_BATCH`` (1000) times their size at the other observed steps (each batch
    tensor's min and max are read exactly at every observed step), a bad sample made the
    gradient: the fix drops it first (TL503's and TL504's fixes then name that batch too).

    In a Monitor run it also fires when gradients are carried from one optimizer step to the
    next: after each observed step it watches up to four parameters of the optimizer that
    stepped (the first, the last and between), until that optimizer's next step, for whether
    each one's ``.grad`` was reset (to ``None``, to zeros by ``zero_grad(set_to_none=False)``,
    or assigned anew, as after ``torch.autograd.grad``) before the next gradient was added. When it
    never was, ``optimizer.zero_grad()`` is not called between steps: each step applies the sum
    of every gradient so far, a step that grows without bound (an AdamW fine-tune reached
    accuracy 0.506 against 0.957, its gradient norm at the step growing from 3 to 138; SGD
    diverged, where a lower rate or clipping did not help). Gradient accumulation resets
    ``.grad`` after each optimizer step, and a GAN generator's backward that adds to the
    discriminator's ``.grad`` is reset by the discriminator's ``zero_grad()`` in time: neither
    fires. The fix is ``optimizer.zero_grad()`` once per step.
    """
    if trace.grads_carried:
        steps = trace.grads_carried
        # Among several optimizers, the ones whose zero_grad() is missing.
        whose = " and ".join(trace.carried_by)
        yield Hit(
            module="",
            message=(f"gradients accumulate across optimizer steps: the gradients a step applied "
                     f"were still in .grad, never reset, when the optimizer "
                     f"{f'({whose}) ' if whose else ''}stepped next, after "
                     f"{len(steps)} observed step(s) (first at step {steps[0]}), so each step "
                     "applies the sum of every gradient so far"),
            fix=((f"also call zero_grad() on the {whose}" if whose else
                  "call optimizer.zero_grad()") + " once per training step, before "
                 "loss.backward() (under gradient accumulation, after each optimizer.step())"),
            evidence={"carried_steps": list(steps),
                      **({"optimizers": list(trace.carried_by)} if whose else {})},
        )
        return
    fix, clip = _clip_fix(trace, t)
    if loss_unbounded(trace):
        fix = UNBOUNDED_FIRST
    profile = _profile(trace, t.window, t.min_layers, with_signal=True)
    if profile is not None:
        series, grads, early, late = profile
        ratio = early / late if late > 0 else math.inf
        if ratio > t.max_ratio:
            limit = t.max_ratio * late
            where = next((lt for lt in reversed(series) if lt.grad_norm > limit), series[0])
            yield Hit(
                module=where.module,
                message=(f"gradient norms grow toward the input: median {early:.3g} at the "
                         f"first {t.window} layers vs {late:.3g} at the last {t.window} "
                         f"({ratio:.3g}×, threshold {t.max_ratio:g}×); going backward it first "
                         f"exceeds the threshold at {where.label}"),
                fix=fix,
                evidence={"ratio": ratio, "first_grad_norm": early, "last_grad_norm": late,
                          "threshold": t.max_ratio, "suggested_max_norm": clip},
            )
            return
    invariant = scale_invariant_weights(trace)
    totals = [(s["step"], total_grad_norm(s, invariant)) for s in trace.per_step]
    totals = [(step, g) for step, g in totals if g is not None and math.isfinite(g)]
    if not totals:
        return
    step, total = max(totals, key=lambda pair: pair[1])
    # A loss that adds up its samples' terms (reduction="sum") has gradients batch-size times
    # an averaged loss's: judged per sample, as its learning rate or Adam's scaling takes them.
    samples = trace.batch_size if trace.loss_summed and (trace.batch_size or 0) > 1 else 1
    judged = total / samples
    if judged <= t.max_norm or _init_transient(trace, totals, samples, t):
        return
    biggest = _largest_grad(trace, step, invariant)
    largest = f"; the largest is {biggest[0]!r} ({biggest[1]:.3g})" if biggest else ""
    norm = (f"{total:.3g}" if samples == 1 else
            f"{total:.3g}, {judged:.3g} per sample (the loss sums its {samples} samples),")
    outlier = outlier_batch(trace, step)
    evidence = {"total_grad_norm": total, "per_sample": judged, "step": step,
                "threshold": t.max_norm, "largest_param": biggest[0] if biggest else None,
                "suggested_max_norm": clip}
    bad = ""
    if outlier is not None:
        _, name, size, usual = outlier
        evidence["outlier_batch"] = name
        bad = (f"; that step's batch holds values up to {size:.3g} in {name!r}, "
               f"{size / usual:.3g}x their size at the other observed steps ({usual:.3g}): a "
               "bad sample made this gradient")
        fix = (f"find and drop the bad sample of step {step} (the data there: a corrupt or "
               f"unscaled record; e.g. keep samples with x.abs().amax(dim=1) below a bound), or "
               f"clip the data in the input pipeline; then: {fix}")
    yield Hit(
        module="",
        message=(f"the total gradient norm reaches {norm} at step {step} (threshold "
                 f"{t.max_norm:g}){largest}{bad}"),
        fix=fix, evidence=evidence,
    )


# A batch tensor whose largest |value| at an observed step is at least this many times its
# median over the other observed steps holds an outlier the data let through (one sample of
# 1e30 in standardized features: gradient norm 7e28 that step, NaN the next) (TL502, TL503).
OUTLIER_BATCH = 1e3


def outlier_batch(trace: RunTrace, step: Optional[int] = None) -> Optional[tuple]:
    """``(step, name, largest |value|, its median at the other observed steps)`` of a batch
    tensor (model input, a check's target) whose values at ``step`` (else at any observed
    step, the first such), and at no other observed step, are at least ``OUTLIER_BATCH``
    times their usual size, with three other observed steps at least to tell; None
    otherwise."""
    sizes: dict = {}
    for s in trace.per_step:
        for name, (lo, hi) in (s.get("batch_range") or {}).items():
            sizes.setdefault(name, []).append((s["step"], max(abs(lo), abs(hi))))
    for at in [step] if step is not None else [s["step"] for s in trace.per_step]:
        for name, series in sizes.items():
            here = [v for st, v in series if st == at and math.isfinite(v)]
            others = [v for st, v in series if st != at and math.isfinite(v)]
            if not here or len(others) < 3 or median(others) <= 0:
                continue
            usual = median(others)
            # One step only: values that large at other steps too are the data's own (a
            # sentinel of -1e4 for "missing", masked in the forward).
            if here[0] >= OUTLIER_BATCH * usual and all(
                    v < OUTLIER_BATCH * usual for v in others):
                return at, name, here[0], usual
    return None


def _init_transient(trace: RunTrace, totals: list, samples: int, t: Thresholds) -> bool:
    """Whether only the first step of a run observed from its start had a total gradient norm
    above ``max_norm`` (``totals``: ``(step, norm)``, finite, in order), and at least
    ``settle_steps`` steps followed, each below it with a finite loss at most ``settle_rise``
    × the first."""
    later = totals[1:]
    if (trace.resumed or len(later) < t.settle_steps or not trace.per_step
            or totals[0][0] != trace.per_step[0]["step"]
            or any(norm / samples > t.max_norm for _, norm in later)):
        return False
    losses = trace.losses
    return (len(losses) > len(later) and all(math.isfinite(v) for v in losses)
            and max(losses[1:]) <= t.settle_rise * losses[0])


# A rate too high whose typical step calls for at least this factor (a cut by less than half)
# is too high only in its largest steps: warmup, not a lower rate, is the fix.
WORTH_CUTTING = 0.5

# Optimizers whose steps shrink as 1/sqrt(t) by design (the sum of squared gradients divides
# them): their first steps, lr per weight, do not say the rate is too high (TL503).
SHRINKING_STEPS = frozenset({"Adagrad"})

# Optimizers whose first steps move every weight by about the learning rate (a step of
# lr * m / sqrt(v), its sign at the first): there a sound rate's ratio is lr / RMS(w), ~0.01-0.1
# (a ConvNeXt at AdamW 4e-3: 0.14; an MLP at Adam 1e-3: 0.027). A check's few steps are such
# steps: a rate out of the band is moved toward FIRST_STEPS_TARGET, not toward ``target`` (a
# ConvNeXt at 0.4 was told x7e-5, lr 2.8e-5, which reached a loss of 1.7 where 4e-3 reached
# 0.0016; a BiGRU at Adam 1e-7 was told x840, lr 8.4e-5: a loss of 2.03 after 150 steps where
# 1e-3 reached 0.11 and 4.2e-3 0.002).
SIGN_LIKE_STEPS = frozenset({"Adam", "AdamW", "Adamax", "NAdam", "Lion"})
FIRST_STEPS_TARGET = 0.05
# A rate too low is raised toward the low end of that range: a rate raised past a sound one
# diverges, one raised short of it trains (an MLP at Adam 1e-7 told x9.6e4, lr 9.6e-3, ended
# at 0.12 where 1e-3 reached 0.0007; a BiGRU trained well from 1e-3 to 1e-2).
FIRST_STEPS_RAISE = 0.01

# A weight whose norm before an observed step grew past this many times its first one was
# blown up by the updates: its typical step is measured against the first norm.
INFLATED = 10.0


def update_ratio_of(p: ParamTrace) -> Optional[float]:
    """The largest ‖Δw‖/‖w‖ over the observed optimizer steps (0 when none changed the
    parameter), or None."""
    ratios = [r for r in p.update_ratios if math.isfinite(r)]
    return max(ratios) if ratios else None


def typical_ratio_of(p: ParamTrace, diverged: bool = False) -> float:
    """The median ‖Δw‖/‖w‖ over the observed optimizer steps (0 when none changed it). In a
    run whose loss diverged (``diverged``: TL604), where the steps inflated the weight past
    ``INFLATED`` times its norm at the first of them, each update is measured against that
    first norm: against the blown-up weight the same update looks small, and so would the
    rate. (Weights that start small and grow as they learn are no blow-up, also on a plateau
    before the loss falls: a loss that does not fall is no sign of one.)"""
    first = p.norms_before[0] if p.norms_before else 0.0
    if diverged and math.isfinite(first) and first > 0 and any(
            math.isfinite(n) and n > INFLATED * first for n in p.norms_before):
        ratios = [u / first for u in p.update_norms if math.isfinite(u)]
    else:
        ratios = [r for r in p.update_ratios if math.isfinite(r)]
    return median(ratios) if ratios else 0.0


def had_gradient(trace: RunTrace, p: ParamTrace) -> bool:
    """Whether the parameter's gradient was non-zero at an observed step."""
    norms = [s.get("param_grad_norms", {}).get(p.name) for s in trace.per_step]
    return any(g is not None and g > 0 for g in norms + [p.grad_norm])


def judged_params(trace: RunTrace) -> list[tuple[ParamTrace, float]]:
    """Weight matrices/kernels with a measured update ratio: not biases or norm scales (1-D),
    not embedding tables (only the rows in the batch move), not zero-initialized ones (their
    relative update is undefined at first); one that no step changed only when it had a
    gradient (ratio 0)."""
    judged = []
    quiet = quiet_branches(trace) + layer_scaled_branches(trace)
    for p in trace.params:
        facts = trace.modules.get(p.module)
        if not p.requires_grad or len(p.shape) < 2 or (facts and facts.base in EMBEDDING_TYPES):
            continue
        if in_blocks(p.name, quiet):  # a zero norm or a small layer scale ends its branch
            continue
        if not p.norms_before or p.norms_before[0] == 0 or p.grad_steps == 0:
            continue
        ratio = update_ratio_of(p)
        if ratio is not None and (ratio > 0 or had_gradient(trace, p)):
            judged.append((p, ratio))
    return judged


@rule("TL503", "update-ratio", "warning", min_ratio=1e-5, max_ratio=0.5, target=1e-3,
      stall_points=8, stall_share=0.25, lr_fall=1e-4)
def update_ratio(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """The size of the optimizer's updates against the weights, ‖Δw‖/‖w‖, is far from ~1e-3.

    ## What it does
    Measures, for every weight matrix/kernel, ‖Δw‖/‖w‖ of each observed optimizer step (the
    real step, so momentum and Adam's scaling count; ‖w‖ before the step) and takes its largest
    value over the steps. It fires when the median over the weights is above ``max_ratio`` (learning
    rate too high) or below ``min_ratio`` (too low), lists the weights outside the band, and
    suggests a learning-rate factor toward ``target``. The learning rate is one number for all
    the layers of a param group, so one layer out of the band (e.g. behind vanishing gradients)
    does not decide it; with several param groups (a head at its own rate when fine-tuning)
    each group with a judged weight is judged on its own median, and the finding names the
    group and its learning rate.
    Biases, norm scales, embedding tables, zero-initialized weights and the weights of residual
    branches quieted by design (as TL501 says) are not judged. A
    weight whose gradient was not 0 but that no observed step changed has ratio 0 (learning
    rate 0, or updates below the precision of bfloat16/float16 weights, which round them
    away); a median of 0 is reported as such, without a factor. The band is wide on purpose:
    Adam's first steps move every weight by about the learning rate, a ratio of lr / RMS(w)
    (~0.01-0.1 for lr=1e-3 on standard layers), and SGD with momentum starts slowly.

    ## Why is this bad?
    Around 1e-3 each step changes a weight by a small fraction of itself. Far above, updates
    overwrite the weights (the loss jumps or diverges, ReLUs die); far below, the network
    barely moves and training wastes its budget.

    ## Example
    ``torch.optim.SGD(params, lr=10)`` (ratios ~1), or ``Adam(params, lr=1e-7)`` (~1e-6).

    ## Fix
    Multiply the learning rate by the factor the finding suggests (and use warmup for large
    rates); if the ratio is low because the gradients vanish, fix that first (TL501): where
    TL103 or TL501 fire (at their defaults) on the same trace, the fix names them instead of a
    factor, which would blow up once the signal is restored; likewise, for a rate too high,
    where TL201 (raw inputs) or TL104 (activations growing along depth from the first
    observed step: growth that came with training is the rate's) fire, and for a rate too
    low where TL201 fires, but for Adam-like optimizers, whose steps do not follow the
    gradients' scale (a raw column's scale skews the other weights' gradients: a tabular
    ResNet under SGD with one column at ~1e5, its rate raised 340x as told, went to NaN; an
    MLP at Adam 1e-6 beside a raw age column gained nothing from standardizing, and 7e-3
    trained best). For a
    rate too high the factor comes from a typical step (the median over the weights of each
    one's median ratio over the steps), not from the largest ratio that decides the finding:
    in a long run Adam's first step, at lr / RMS(w), would call for a rate 10-100× too low
    (where the loss diverged (TL604) and the steps blew a weight up past 10× its first norm,
    its updates are measured against that first norm: against the inflated weight they look
    small). In a ``trainlint check`` with Adam, AdamW, Adamax, NAdam or
    Lion, whose first steps move every weight by about the rate, the factor comes from the
    first step (lr / RMS(w), which scales with the rate) toward ``FIRST_STEPS_TARGET``
    (0.05), what a sound rate's first steps give (~0.01-0.1), not toward ``target``: a
    ConvNeXt at AdamW 0.4 was told x7e-5 (lr 2.8e-5, a loss of 1.7 after 150 steps where
    4e-3 reached 0.0016); now x0.0025. So too for a rate too low, toward the low end of that
    range, ``FIRST_STEPS_RAISE`` (0.01: a rate raised past a sound one diverges; a BiGRU at
    Adam 1e-7 was told x840, to 8.4e-5, which barely trained; now x8.4e3, to 8.4e-4). When
    a typical step calls for cutting the rate by less than half, only the largest steps are too
    large (the rate suits the run once under way): the fix is warmup and clipping, where the
    loss falls; where it fell by less than ``LEARNING_DROP`` (5%) over the run, the first steps
    threw the weights where the run does not learn, and the fix cuts the rate by the geometric
    mean of what the first steps and a typical step call for. Updates
    of 0: set a learning rate above 0; for 16-bit weights keep float32 master weights
    (``torch.autocast`` instead of ``model.bfloat16()``).

    Where a group's weights are all bfloat16 (or float16) and a typical update (each
    weight's median ratio over the steps, their median) is below ``ROUNDED_AWAY`` (2^-10;
    float16: 2^-13), inside the band or not, most entries' updates round to no change: an
    MLP in ``model.bfloat16()`` at Adam 1e-4 changed 9% of its entries a step (typical ratio
    4e-4) and stood at loss 2.22 after 600 steps, 1.66 in float32; at 1e-3 (2.7e-3) 44%
    changed and it trained as float32 did (0.31 against 0.29). The fix keeps float32 master
    weights.

    Where a group's learning rate rose ``RATE_JUMP`` (10) x or more between two observed
    steps, a rate too high says where (a schedule bug that multiplied it by 100 at step 300
    was told only to cut it).

    In a Monitor run the updates can also stop partway: when at least ``stall_points`` updates
    were observed, the median ratio of the last ``stall_share`` of them (and at least 3) all
    sit below ``min_ratio`` after the first was inside the band, and the learning rate itself
    fell below ``lr_fall`` × its peak, it fires too: the rate decayed to ~0 long before the
    run's end (``StepLR(step_size=1, gamma=0.9)`` stepped per batch instead of per epoch).
    A cosine or linear decay to 0 over the run sits below ``min_ratio`` for its last few
    percent only; a converged model whose gradients shrank keeps its learning rate; a step
    decay by 10× twice or three times (SGD on a converged model there updates by less than
    ``min_ratio``) keeps it above ``lr_fall`` × its peak.

    For ``Adagrad`` a rate too high is judged from each weight's typical (median) step in a
    Monitor run, and not in a ``trainlint check``: its first step moves every weight by the
    learning rate and its later ones ever less (the sum of squared gradients divides them), so
    its early ratios overstate the rate (an MLP at Adagrad 0.05 read 0.97 and was told x0.024;
    measured: 0.05 trained best, 0.0015 reached half the accuracy; at 2.0 its typical step
    stays far above the band).

    In a ``trainlint check`` a group at learning rate 0 whose ``initial_lr`` is above 0 sits
    at an LR scheduler's warmup start (check does not step the scheduler): not judged.
    An optimizer whose step runs its closure several times (LBFGS) is not judged: each of its
    steps is a line-searched solve, not a learning rate's update. Updates of 0 with every
    param group at learning rate 0 are judged only once a second optimizer step was observed:
    the first step of a warmup that starts at 0 (transformers'
    ``get_linear_schedule_with_warmup``) runs at 0, and a Monitor with ``fail_on`` reports
    at it. (One group at 0 beside others that train is judged at once.)

    Weights left exactly unchanged by steps that ran while no parameter had a gradient, with
    gradients there by ``monitor.step()``, are told as what they are: ``optimizer.step()``
    called before ``loss.backward()``.
    """
    if trace.closure_optimizer is not None:
        raise Skip(f"the optimizer ({trace.closure_optimizer}) runs a line-searched solve per "
                   "step: its update size does not measure a learning rate")
    judged = judged_params(trace)
    if not judged:
        if any(p.update_norms for p in trace.params):
            return
        raise Skip("no optimizer step was observed (the update ratio needs one)")
    groups: dict = {}
    for p, r in judged:
        groups.setdefault(p.group, []).append((p, r))
    skipped, fired = None, False
    for group in sorted(groups, key=lambda g: (g is None, g or 0)):
        try:
            named = group if len(groups) > 1 else None
            hit = _ratio_hit(trace, t, groups[group], named) or _stall_hit(
                trace, t, groups[group], named) or _rounded_hit(groups[group], named)
        except Skip as why:
            skipped = why
            continue
        if hit is not None:
            fired = True
            yield replace(hit, location=hit.location or trace.optimizer_location)
    if skipped is not None and not fired:
        raise skipped


def _ratio_hit(trace: RunTrace, t: Thresholds, judged: list,
               group: Optional[int]) -> Optional[Hit]:
    """TL503's finding on the judged weights of one param group (``group`` None: of the whole
    optimizer), or None when their median is inside the band."""
    typical = median(r for _, r in judged)
    if t.min_ratio <= typical <= t.max_ratio:
        return None
    direction = "high" if typical > t.max_ratio else "low"
    if direction == "high" and all(p.optimizer in SHRINKING_STEPS for p, _ in judged):
        # Its first steps move each weight by lr, its later ones ever less: a check's few
        # steps say nothing; a Monitor run judges its typical step instead.
        if trace.mode == "check" or median(typical_ratio_of(p) for p, _ in judged) <= \
                t.max_ratio:
            return None
    starved = [p.name for p in trace.params if len(p.shape) >= 2 and p.norms_before
               and p.norms_before[0] == 0]
    if direction == "low" and typical > 0 and starved:
        raise Skip(f"{starved[0]} starts at zero, which starves the layers before it of "
                   "gradient in the first steps: their small updates do not measure the "
                   "learning rate")
    threshold = t.max_ratio if direction == "high" else t.min_ratio
    bad = [(p, r) for p, r in judged if (r > threshold if direction == "high" else r < threshold)]
    bad.sort(key=lambda pr: pr[1], reverse=direction == "high")
    listed = ", ".join(f"{p.name} {r:.3g}" for p, r in bad[:5])
    more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
    # Too high: the factor from a typical step's ratio (each weight's median over the steps),
    # not the largest: Adam's first steps move every weight by about lr / RMS(w) whatever the
    # rate is worth later, so a factor from them overshoots by 10-100x in a long run.
    diverged = direction == "high" and bool(firing(trace, ("TL604",)))
    step_typical = typical if direction == "low" else median(
        typical_ratio_of(p, diverged) for p, _ in judged)
    # A check's Adam steps: each weight's largest, its first (lr / RMS(w)), scales with the rate.
    first_steps = (trace.mode == "check"
                   and all(p.optimizer in SIGN_LIKE_STEPS for p, _ in judged))
    if first_steps:
        step_typical = typical
    target = (t.target if not first_steps else
              FIRST_STEPS_TARGET if direction == "high" else FIRST_STEPS_RAISE)
    factor = target / step_typical if step_typical > 0 else None
    # Typical steps that look right while the loss does not fall: the rate's first steps threw
    # the weights where it cannot learn. Adam's first step calls for far too low a rate in a
    # long run, the typical step for none: the geometric mean of the two.
    stalled = (direction == "high" and factor is not None and factor >= WORTH_CUTTING
               and _not_learning(trace))
    if stalled:
        factor = math.sqrt(t.target / typical * min(factor, 1.0))
    lr = judged[0][0].lr
    whose = "the learning rate" + ("" if group is None else f" of param group {group}")
    where = "" if group is None else (
        f"param group {group}" + ("" if lr is None else f" (lr {lr:g})") + ": ")
    if factor is None:
        # At a scheduler's start: the rate it was built on (initial_lr) is above 0.
        warming = [p.initial_lr for p, _ in judged if p.initial_lr and p.initial_lr > 0]
        if lr == 0 and trace.mode == "check" and warming:
            raise Skip(f"the learning rate is 0 where an LR scheduler's warmup starts (its "
                       f"initial_lr is {warming[0]:g}), and trainlint check does not step the "
                       f"scheduler: a Monitor run judges the update ratio from the steps after")
        if lr == 0 and all(len(p.update_ratios) == 1 for p, _ in judged) and all(
                not q.lr for q in trace.params if q.lr is not None):
            raise Skip("the one optimizer step observed so far ran at learning rate 0 in "
                       "every param group (a warmup that starts at 0, as transformers' linear "
                       "schedule does): the update ratio is judged from an observed step after "
                       "it")
        still = sum(r == 0 for _, r in judged)
        early = [s["step"] for s in trace.per_step if s.get("stepped_before_backward")]
        if early:
            return Hit(
                module="",
                message=(f"the optimizer steps left {still} of {len(judged)} weights exactly "
                         f"unchanged ({listed}{more}): at {len(early)} of "
                         f"{len(trace.per_step)} observed step(s) (first at step {early[0]}) "
                         "optimizer.step() ran while no parameter had a gradient, and the "
                         "backward came after it: each step applies nothing, and the next "
                         "zero_grad() clears the gradients the backward made"),
                fix=("call loss.backward() before optimizer.step(): zero_grad(), forward, "
                     "loss, backward, step"),
                evidence={"direction": "low", "median_ratio": 0.0, "lr_factor": None,
                          "params": [p.name for p, _ in bad], "threshold": threshold,
                          "stepped_before_backward": early})
        zero_lr = (f"{whose} is 0 (a config or scheduler bug, a warmup that starts at 0)"
                   if not lr else "")
        low_precision = any(p.dtype in ("bfloat16", "float16") for p, _ in judged)
        rounded = "" if lr == 0 else (
            "the updates are below the weights' precision (bfloat16/float16 weights round "
            "small updates away)" if low_precision else
            "the updates are below float32's precision: the gradients are vanishingly small "
            "(check TL501 and the init; Adam's second moment of a ~1e-20 gradient underflows)")
        cause = " or ".join(c for c in (zero_lr, rounded) if c)
        message = (f"{where}the optimizer steps left {still} of {len(judged)} weights exactly "
                   f"unchanged although their gradient was not 0 (update ratio ‖Δw‖/‖w‖: "
                   f"median 0, threshold {threshold:g}; {listed}{more}): {cause}")
        zero_fix = (f"set {whose} above 0 (check optimizer.param_groups[i]['lr'] after the "
                    "scheduler is built)" + ("" if group is None else
                                            "; to freeze the group on purpose, set "
                                            "requires_grad=False on its parameters instead")
                    if not lr else "")
        rounded_fix = "" if lr == 0 else (
            "keep float32 master weights: train the float32 model under "
            "torch.autocast(device_type, dtype=torch.bfloat16) instead of calling "
            "model.bfloat16()/.half()" if low_precision else
            "fix the vanishing gradients first (TL501: the init, normalization layers)")
        fix = "; ".join(f for f in (zero_fix, rounded_fix) if f)
    else:
        message, fix = _factor_texts(trace, t, direction, typical, step_typical, factor,
                                     judged, bad, whose, where, group, lr, stalled,
                                     first_steps)
    evidence = {"direction": direction, "median_ratio": typical, "lr_factor": factor,
                "typical_step_ratio": step_typical,
                "params": [p.name for p, _ in bad], "threshold": threshold}
    if group is not None:
        evidence.update(group=group, lr=lr)
    return Hit(module="", message=message, fix=fix, evidence=evidence)


# A param group's learning rate that rose by this factor or more between two observed steps
# jumped (TL503 says where: a schedule bug, x100 at step 300, read as "cut the rate x0.05").
RATE_JUMP = 10.0


def rate_jump(trace: RunTrace, group: Optional[int]) -> Optional[tuple]:
    """``(step before, step, lr before, lr after)`` of the first pair of observed steps between
    which param group ``group``'s (None: the only one's) learning rate rose ``RATE_JUMP`` x or
    more; None otherwise."""
    key = 0 if group is None else group
    series = [(s["step"], s["lrs"][key]) for s in trace.per_step if key in s.get("lrs", {})]
    for (a, before), (b, after) in zip(series, series[1:]):
        if before > 0 and after >= RATE_JUMP * before:
            return a, b, before, after
    return None


def _factor_texts(trace: RunTrace, t: Thresholds, direction: str, typical: float,
                  step_typical: float, factor: float, judged: list, bad: list, whose: str,
                  where: str, group: Optional[int], lr: Optional[float],
                  stalled: bool = False, first_steps: bool = False) -> tuple[str, str]:
    """TL503's message and fix for a median ratio out of the band with a factor toward the
    target; the cause named first where the ratio follows from another fault: a signal that
    vanishes (TL103, TL501), raw inputs or a signal that grows (TL201, TL104), or a rate too
    high only in its largest steps (warmup)."""
    threshold = t.max_ratio if direction == "high" else t.min_ratio
    listed = ", ".join(f"{p.name} {r:.3g}" for p, r in bad[:5])
    more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
    head = (f"{where}update ratio ‖Δw‖/‖w‖ too {direction}: median {typical:.3g} per step "
            f"over {len(judged)} weights (threshold {threshold:g}); {len(bad)} are "
            f"{'above' if direction == 'high' else 'below'} it: {listed}{more}. ")
    whose_cap = whose[0].upper() + whose[1:]
    # A vanishing signal makes small updates whatever the rate: raising it is no fix.
    vanishing = firing(trace, ("TL103", "TL501")) if direction == "low" else []
    if vanishing:
        what = " and ".join(w for code, w in (("TL103", "activations"), ("TL501", "gradients"))
                            if code in vanishing)
        verb = "finds" if len(vanishing) == 1 else "find"
        return (head + f"{whose_cap} is too low: {' and '.join(vanishing)} {verb} the {what} "
                f"vanishing along depth, which makes small updates whatever the rate",
                f"fix the vanishing signal first ({', '.join(vanishing)}: the init, "
                f"normalization layers), then judge {whose} again: raised {factor:.2g}x now, "
                f"it would blow up once the signal is restored")
    # One batch holding an outlier (a sample of 1e30) makes updates whatever the rate.
    outlier = outlier_batch(trace) if direction == "high" else None
    if outlier is not None:
        step, name, size, usual = outlier
        return (head + f"The largest updates are the data's: the batch of step {step} holds "
                f"values up to {size:.3g} in {name!r}, {size / usual:.3g}x their size at the "
                f"other observed steps (TL502)",
                f"drop the bad sample of step {step} first (TL502), then judge {whose} again: "
                f"cut {factor:.2g}x now, it would be far too low for the other batches")
    # TL104 names the init only where the growth was there from the start; one that came with
    # training is this rate's doing.
    upstream = firing(trace, ("TL201", "TL104"), lambda hit: hit.evidence.get(
        "grew_in_training", False) is False) if direction == "high" else []
    if direction == "low" and not all(p.optimizer in SIGN_LIKE_STEPS for p, _ in judged) \
            and firing(trace, ("TL201",)):
        # A raw feature's scale swamps the signal the other weights learn from: their small
        # updates measure the inputs, and a rate raised to suit them blows up once they are
        # standardized (a tabular ResNet with one column at ~1e5, told x340: NaN). (Adam's
        # steps do not follow the gradients' scale: there the rate is what is low.)
        return (head + f"{whose_cap} is too low for this model as it is: the model's inputs "
                "are not normalized (TL201), which skews the gradients' scales whatever the "
                "rate",
                f"fix that first (TL201: standardize the inputs), then judge {whose} again: "
                f"raised {factor:.2g}x now, it would blow up once the inputs are in range")
    if upstream:
        cause = ("the model's inputs are not normalized (TL201)" if upstream[0] == "TL201"
                 else "the activations grow along depth (TL104: the init)")
        return (head + f"{whose_cap} is too high for this model as it is: {cause}, which makes "
                f"the gradients and the updates large whatever the rate",
                f"fix that first ({upstream[0]}: "
                + ("standardize the inputs" if upstream[0] == "TL201" else
                   "Kaiming/Xavier init matched to the nonlinearity")
                + f"), then judge {whose} again: cut {factor:.2g}x now, training would crawl "
                "once the signal is in range")
    if stalled:  # (the factor: see _ratio_hit)
        first_factor = t.target / typical
        to = "" if group is None or not lr else f", to about {lr * factor:.2g}"
        return (head + f"{whose_cap} is too high: a typical step's ratio is {step_typical:.3g}, "
                f"yet the loss does not fall ({LEARNING_DROP:.0%} or more from the first "
                "third of the observed steps to the last)",
                f"cut {whose} by about {factor:.2g}{to} (between what the first steps call "
                f"for, {first_factor:.2g}x, and a typical step, ~1x); add warmup and gradient "
                "clipping")
    if direction == "high" and factor >= WORTH_CUTTING:
        # The largest steps overwrite the weights, a typical one does not: the rate suits the
        # run once it is under way (Adam's first steps move each weight by ~lr/RMS(w)).
        return (head + f"{whose_cap} is too high for its largest steps: a typical step's "
                f"ratio is {step_typical:.3g}, near ~{t.target:g}",
                f"warm {whose} up instead of cutting it (a typical step is near "
                f"~{t.target:g}): linearly from ~1% over the first few hundred steps, e.g. "
                "torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, "
                "total_iters=500) stepped per batch; and clip gradients "
                "(torch.nn.utils.clip_grad_norm_)")
    cause = "" if direction == "high" else " (or the gradients vanish: check TL501 and the init)"
    jump = rate_jump(trace, group) if direction == "high" else None
    if jump is not None:
        a, b, before, after = jump
        cause = (f" (it rose {after / before:.3g}x between steps {a} and {b}, from {before:.3g} "
                 f"to {after:.3g}: check what set it there, a schedule, a restart or a rate set "
                 f"by hand)")
    to = "" if group is None or not lr else f", to about {lr * factor:.2g}"
    per_step = ("" if step_typical == typical else
                f" at a typical step, whose ratio is {step_typical:.3g}")
    aim = FIRST_STEPS_TARGET if direction == "high" else FIRST_STEPS_RAISE
    toward = (f"toward an update ratio of ~{aim:g} at its first step, where it "
              f"is {step_typical:.3g}: {judged[0][0].optimizer} moves each weight by about "
              f"the rate at first, and a sound rate's lr/RMS(w) is ~0.01-0.1" if first_steps
              else f"toward an update ratio of ~{t.target:g}{per_step}")
    return (head + f"{whose_cap} is too {direction}{cause}",
            f"multiply {whose} by about {factor:.2g}{to} ({toward})"
            + ("; add warmup and gradient clipping" if direction == "high" else ""))


# A loss whose last third is not this much below its first third (medians) is not learning
# (TL503's warmup advice needs a run that learns once under way).
LEARNING_DROP = 0.05


def _not_learning(trace: RunTrace) -> bool:
    """Whether the loss, over at least six observed points (a Monitor's window means, else
    each step's), fell by less than ``LEARNING_DROP`` from its first third to its last
    (medians); False where it cannot tell."""
    losses = [s.get("loss_mean", s.get("loss")) for s in trace.per_step]
    losses = [v for v in losses if v is not None and math.isfinite(v)]
    if len(losses) < 6:
        return False
    third = len(losses) // 3
    first, last = median(losses[:third]), median(losses[-third:])
    return first > 0 and last > (1 - LEARNING_DROP) * first


def hits_at_defaults(trace: RunTrace, code: str) -> list[Hit]:
    """What rule ``code`` finds in this trace at its default thresholds ([] when it is not
    registered or skips)."""
    registered = RULES.get(code)
    if registered is None:
        return []
    try:
        return list(registered.func(trace, Thresholds(dict(registered.defaults))))
    except Skip:
        return []


def firing(trace: RunTrace, codes: tuple,
           counts: Callable[[Hit], bool] = lambda hit: True) -> list[str]:
    """Of ``codes``, those whose rule finds something in this trace at its defaults (a hit
    that ``counts``)."""
    return [code for code in codes if any(counts(hit) for hit in hits_at_defaults(trace, code))]


def loss_unbounded(trace: RunTrace) -> bool:
    """Whether TL604 finds the loss falling without bound (a term with the wrong sign): the
    weights and gradients then grow with it, and a lower rate or clipping does not stop that."""
    return bool(firing(trace, ("TL604",), lambda hit: bool(hit.evidence.get("unbounded"))))


# The first words of a growth finding's fix where the loss falls without bound.
UNBOUNDED_FIRST = ("the loss falls without bound (TL604) and this growth follows it: fix the "
                   "loss first (a term with the wrong sign, a KL divergence or a log-likelihood "
                   "subtracted where it is added; a learned scale without a floor: TL604 says "
                   "how); a lower rate or clipping does not stop it")


# A typical update below this share of a 16-bit weight's norm mostly rounds to no change:
# bfloat16 keeps 8 significant bits (neighbouring values 2^-8 to 2^-7 apart, relative), so an
# entry moves only when its update reaches half that; float16 keeps 11.
ROUNDED_AWAY = {"bfloat16": 2.0 ** -10, "float16": 2.0 ** -13}


def _rounded_hit(judged: list, group: Optional[int]) -> Optional[Hit]:
    """TL503's finding when one param group's weights are all 16-bit and a typical update
    (each weight's median ratio over the steps, their median) is below ``ROUNDED_AWAY`` for
    that dtype: most entries' updates round to no change (a rate sound in float32 stalls in
    ``model.bfloat16()``); or None."""
    dtypes = {p.dtype for p, _ in judged}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ROUNDED_AWAY:
        return None
    dtype = next(iter(dtypes))
    typical = median(typical_ratio_of(p) for p, _ in judged)
    floor = ROUNDED_AWAY[dtype]
    if not 0 < typical < floor:
        return None
    where = "" if group is None else f"param group {group}: "
    bits = 8 if dtype == "bfloat16" else 11
    return Hit(
        module="",
        message=(f"{where}the weights are {dtype}, which keeps {bits} significant bits: a "
                 f"typical update moves them by {typical:.3g} of their norm, below {floor:.3g}, "
                 "so most entries' updates round to no change at all and the model barely "
                 "trains (a rate that suits float32 weights stalls in 16 bits)"),
        fix=("keep float32 master weights: leave the model in float32 and run the forward "
             f"under torch.autocast(device_type=..., dtype=torch.{dtype}) instead of "
             f"model.to(torch.{dtype}) (or an optimizer that keeps a float32 copy of the "
             "weights, or rounds stochastically); a higher rate only hides it"),
        evidence={"direction": "rounded", "dtype": dtype, "typical_ratio": typical,
                  "threshold": floor, **({} if group is None else {"group": group})},
    )


def _stall_hit(trace: RunTrace, t: Thresholds, judged: list,
               group: Optional[int]) -> Optional[Hit]:
    """TL503's finding when one param group's updates stopped partway: its learning rate
    decayed to ~0 long before the run's end (see :func:`update_ratio`), or fell with a new
    optimizer the loop built (``RunTrace.replaced_optimizers``); or None."""
    series = [p.update_ratios for p, _ in judged]
    n = min(len(s) for s in series)
    lr, peak = judged[0][0].lr, judged[0][0].peak_lr
    if n < t.stall_points or not peak or lr is None or lr > t.lr_fall * peak:
        return None
    medians = [median(s[len(s) - n + i] for s in series) for i in range(n)]
    stalled = next((i for i in range(n) if all(m < t.min_ratio for m in medians[i:])), n)
    if medians[0] < t.min_ratio or n - stalled < max(3, math.ceil(t.stall_share * n)):
        return None
    whose = "the learning rate" + ("" if group is None else f" of param group {group}")
    where = "" if group is None else f"param group {group}: "
    found = (f"{where}the updates stopped partway: the median update ratio ‖Δw‖/‖w‖ went "
             f"from {medians[0]:.3g} at the first observed update to {medians[-1]:.3g} at "
             f"the last, below {t.min_ratio:g} for the last {n - stalled} of {n}, as "
             f"{whose} fell from {peak:.3g} to {lr:.3g}")
    message = found + (": it decayed to ~0 long before the run's end, and training no longer "
                       "moves the weights")
    fix = ("step the scheduler as it is meant to be stepped (StepLR, MultiStepLR and "
           "ExponentialLR once per epoch, not per batch), or give it a schedule that spans "
           "the run (step_size, gamma, T_max in steps when stepped per batch); watch "
           "optimizer.param_groups[0]['lr'] over the run")
    if trace.replaced_optimizers:
        step, before, now = trace.replaced_optimizers[-1]
        message = found + (f", with the optimizer the training loop built at step {step} "
                           f"({now}, after {before}): training no longer moves the weights")
        fix = (f"build the optimizer of step {step} with the learning rate the run needs "
               f"(about {peak:.3g}, as before it, or what its own schedule calls for), or keep "
               "the one that trains and change its param_groups' 'lr' instead of replacing it")
    return Hit(
        module="",
        message=message,
        fix=fix,
        evidence={"direction": "stalled", "first_ratio": medians[0], "last_ratio": medians[-1],
                  "stalled_updates": n - stalled, "updates": n, "lr": lr, "peak_lr": peak,
                  "threshold": t.min_ratio, **({} if group is None else {"group": group})},
    )
