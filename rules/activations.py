"""Activation health: dead units, saturation, sigmoid hidden layers."""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import median
from typing import Iterator, Optional

from trainlint.engine import Hit, Thresholds, rule
from trainlint.trace import (
    CLASSIFICATION_LOSSES,
    FORGET_GATE_CLOSED,
    SUM_OPS,
    LayerTrace,
    ModuleFacts,
    RunTrace,
    layer_columns,
)

from ._graph import (
    FUNCTIONAL_DROPOUT,
    SHAPE_OPS,
    WEIGHT_LAYERS,
    downstream,
    feeds_weight_layer,
    inside_attention,
    is_gate,
    is_model_output,
    is_norm_type,
    large_input_into,
    layer_at,
    only_shape_ops,
    output_layer,
    output_point,
    passed_on_by,
    predecessors,
    sources,
)
from .data import direct_consumers
from .gradients import hits_at_defaults
from .run import seen_from_start

# Module types whose output is a nonlinearity (beyond the relu/tanh/sigmoid kinds).
ACTIVATION_TYPES = ("GELU", "SiLU", "ELU", "LeakyReLU", "PReLU", "Mish", "SELU", "CELU",
                    "Softplus", "Hardswish", "GELUActivation", "NewGELUActivation")


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.0f}%"


@rule("TL101", "dead-relu", "warning", dead_fraction=0.5, min_units=8, alike_signal=0.5,
      alike_dead_fraction=0.9, min_values=4)
def dead_relu(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Dead ReLU units: units that output 0 for every sample and position of recent steps.

    ## What it does
    For every ReLU-family output (``nn.ReLU``, ``F.relu``, ``x.relu()`` ...) it records, per
    unit (channel of a conv map, feature of a linear output), whether the unit was ever
    positive over all samples and positions of the point's last observed steps: as many as
    hold 512 values per unit, at least 3, at most 256 (a conv map or a token sequence: 3; an
    MLP at batch 64: 8, at batch 4: 128; over 40 values a unit active for 2% of its inputs
    looks dead half of the time); all of them in a ``trainlint check``. In a Monitor run,
    units that a too-high learning rate killed mid-run count although they were active at
    its start; a layer killed since its window began (at ``every=10`` an MLP's window spans
    80-160 steps) is judged over its recent records too, those that hold 128 values per unit,
    where ``alike_dead_fraction`` of its units must be dead. GELU-family outputs (GELU, SiLU,
    Mish) count too: their unit is dead when its output is never positive nor below -1e-3
    (input below about -3.4, where the derivative is ~0; tiny outputs of both signs come from
    inputs near 0, where the slope is 0.5: that is a small signal, TL103's, not a dead unit).
    It fires when the share of dead units is at least
    ``dead_fraction`` (in layers of at least ``min_units`` units). Healthy deep ReLU nets at
    init can show 20-30% units silent on a small batch, so the default sits above that.

    A unit can only be seen dying where the samples differ at its input. When they barely do
    (the between-sample RMS of what feeds the layer before the activation is below
    ``alike_signal`` × its RMS, e.g. a squeeze-and-excitation gate or a head on globally
    pooled features at init), each unit is on or off for the whole batch by the sign of its
    offset: about half are off by chance, and the rule asks for ``alike_dead_fraction``.
    Where that input comes through unobserved ops (``x.mean((2, 3))``), the between-sample
    share of the layer's own output spread stands in for it. So too where the window holds
    fewer than ``min_values`` values per unit (a check at batch 1; an expert of a mixture of
    experts sent one token per step): a unit off for 3 values is a coin flip, not dead.

    ## Why is this bad?
    A ReLU whose input is negative everywhere outputs 0 and passes no gradient: the unit
    never learns again. A large share of dead units wastes the layer's capacity. Usual causes
    are a learning rate so high that one update pushes units negative for the whole data set,
    negative biases, or badly scaled weights.

    ## Example
    ``nn.Linear(256, 256)`` with ``bias.fill_(-5.0)`` followed by ``nn.ReLU()``.

    ## Fix
    Lower the learning rate; initialize with ``nn.init.kaiming_normal_(w, nonlinearity="relu")``
    and zero (or slightly positive) biases; normalize before the activation; or use
    ``nn.LeakyReLU(0.01)`` / ``nn.GELU()``, which keep a gradient for x < 0. A layer whose only
    input comes, through a few weight or norm layers, from a ReLU layer with every unit dead
    gets the same input for every sample: its fix names that layer first. Units dead
    from the run's first step (over every observed step, or, with a window after it, at
    ``dead_fraction`` or more in the first step's batch) died before any update: their fix
    does not name the learning rate. Where the layer feeding the units takes a model input
    that TL201 finds not normalized, the fix standardizes that input first: an offset much
    larger than the input's spread, or a spread much smaller than the bias, gives each unit's
    sum one sign for every sample, whatever the init (one raw price per sample, mean 300:
    44-56% of the units dead and an MSE of 0.43 with the default init or Kaiming's;
    standardized, 0.012).
    """
    for lt in trace.layers:
        if lt.kind not in ("relu", "gelu") or lt.unit_ever_active is None:
            continue
        recent = _recently_dead(lt, t)
        lt = recent or lt
        units = lt.unit_ever_active.size
        dead = lt.dead_fraction
        if units < t.min_units or dead is None or dead < t.dead_fraction:
            continue
        feeder = feeding_module(trace, lt)
        dead_units = lt.dead_units
        cut_from, pruned = _pruned(trace, feeder, units)
        if pruned:  # zero on purpose: judged over the units left
            dead_units = [u for u in dead_units if u not in pruned]
            dead = len(dead_units) / (units - len(pruned)) if units > len(pruned) else 0.0
            if dead < t.dead_fraction:
                continue
        spread = input_spread(trace, feeder)
        steps = lt.unit_records or trace.observed_steps
        seen = _values_per_unit(lt, steps)
        few = seen is not None and seen < t.min_values
        alike = (spread is not None and spread < t.alike_signal) or few or recent is not None
        if alike and dead < t.alike_dead_fraction:
            continue
        listed = dead_units[:10]
        more = "" if len(dead_units) <= 10 else f" (+{len(dead_units) - 10} more)"
        last = "the last " if steps < trace.observed_steps else ""
        samples = f" over {last}{steps} observed step(s)" if steps else ""
        zero = "0" if lt.kind == "relu" else "~0 (never > 0, never < -1e-3)"
        threshold = t.alike_dead_fraction if alike else t.dead_fraction
        evidence = {"dead_fraction": round(dead, 4), "dead_units": len(dead_units),
                    "units": units, "threshold": threshold}
        if pruned:
            evidence["pruned_units"] = len(pruned)
        if spread is not None:
            evidence["input_spread"] = round(spread, 4)
        if few:
            evidence["values_per_unit"] = seen
        if feeder is not None:
            evidence["feeding_module"] = feeder.name
            evidence.update(_param_state(trace, feeder))
        # Dead over every observed step from the run's first: dead before any update.
        from_init = recent is None and seen_from_start(trace) and (
            steps >= trace.observed_steps or _dead_at_first(trace, lt, t))
        fix = _dead_relu_fix(feeder, evidence, lt.kind, from_init,
                             joined=_after_sum(trace, lt))
        raw = _fed_by_input(trace, lt) if feeder is None else None
        own = _own_bias(trace, lt) if feeder is None else None
        if own is not None:
            evidence["own_bias"], evidence["own_bias_rms"] = own
            fix = (f"{'' if from_init else 'lower the learning rate; '}{own[0]!r}, a bias "
                   f"that {lt.module!r} holds itself (RMS {own[1]:.3g}), is added to these "
                   f"units' input in its forward: where it is negative it keeps them below 0, "
                   f"so initialize it at 0 (nn.init.zeros_); where it is positive, the weights "
                   f"feeding them do: re-initialize those with nn.init.kaiming_normal_("
                   f"nonlinearity='relu')" + (_DEAD_TAIL if lt.kind == "relu" else ""))
        elif raw is not None:
            evidence["input"] = raw
            fix = (f"its input is the model's input {raw!r}, not a layer's: those features are "
                   f"<= 0 in every sample, and no init or learning rate changes that; "
                   f"standardize the inputs (TL201: subtract each feature's mean and divide by "
                   f"its std in the data pipeline), or leave the activation off the raw input")
        unscaled = _unnormalized_input_into(trace, feeder) if feeder is not None else None
        if unscaled is not None and own is None:
            evidence["unnormalized_input"] = unscaled.evidence["input"]
            fix = (f"the input of {feeder.name!r} is the model's input "
                   f"{unscaled.evidence['input']!r}, which is not normalized (TL201: |mean| "
                   f"up to {unscaled.evidence['max_abs_mean']:.4g}, std up to "
                   f"{unscaled.evidence['max_std']:.4g}): each unit's input is then about the "
                   f"same for every sample (an offset far above the spread, or a spread far "
                   f"below the bias), so one sign holds for all of them whatever the init; "
                   f"standardize the input first "
                   f"(TL201's fix), then, if units stay dead: {fix}")
        starved = _starved_by(trace, lt)
        if starved is not None:
            evidence["starved_by"] = starved.module
            fix = (f"fix {starved.label} ({starved.type}) first: {_fmt_pct(starved.dead_fraction)}"
                   f" of its units are dead, so what reaches this layer through it is the same "
                   f"for every sample (0, or the biases and norm shifts after it), and its "
                   f"finding says how; then, if units stay dead here: {fix}")
        of = (f"{_fmt_pct(dead)} of the {units - len(pruned)} units of {lt.label} ({lt.type}) "
              f"left by pruning {cut_from!r}" if pruned else
              f"{_fmt_pct(dead)} of the {units} units of {lt.label} ({lt.type})")
        yield Hit(
            module=lt.module,
            message=(f"{of} output "
                     f"{zero} for every sample{samples} (threshold {_fmt_pct(threshold)}); "
                     f"dead units: {listed}{more}"),
            fix=fix,
            evidence=evidence,
        )


def _pruned(trace: RunTrace, feeder: Optional[ModuleFacts], units: int) -> tuple:
    """``(name, units)``: the weight layer feeding a layer of ``units`` units, through norm
    layers (one unit per output row), and the units ``torch.nn.utils.prune`` cut from it;
    ``(None, set())`` where none were."""
    for _ in range(3):
        if feeder is None:
            break
        pruned = set(feeder.attrs.get("pruned_units", ()))
        if pruned:
            return (feeder.name, pruned) if max(pruned) < units else (None, set())
        if not is_norm_type(feeder.type):
            break
        fed = [src for src, _ in sources(trace, feeder.name) if src[0] == "point"]
        feeder = trace.modules.get(fed[0][1]) if len(fed) == 1 else None
    return None, set()


def _starved_by(trace: RunTrace, lt: LayerTrace, hops: int = 4) -> Optional[LayerTrace]:
    """The ReLU-family layer with every unit dead that ``lt`` takes its only input from,
    through at most ``hops`` layers (weight, norm, pass-through): behind it every sample
    reaches ``lt`` alike, so ``lt``'s dead units follow from it. None where a join (a
    residual sum, a concatenation, the model's input beside it) brings another path in, or
    none is found."""
    target = ("module", lt.module) if lt.op == "output" else lt.node
    seen = {lt.node}
    for _ in range(hops):
        found = {src for src, _ in predecessors(trace, target)}
        if len(found) != 1 or next(iter(found))[0] != "point":
            return None
        src = layer_at(trace, next(iter(found)))
        if src is None or src.node in seen:
            return None
        seen.add(src.node)
        if src.kind in ("relu", "gelu") and src.dead_fraction == 1.0:
            return src
        target = ("module", src.module) if src.op == "output" else src.node
    return None


def _recently_dead(lt: LayerTrace, t: Thresholds) -> Optional[LayerTrace]:
    """``lt`` seen over its recent records, when at least ``alike_dead_fraction`` of its units
    are dead there while its full window does not reach ``dead_fraction`` (the layer died
    since that window began); else None."""
    if lt.unit_recent_active is None or not lt.unit_recent_active.size:
        return None
    if (lt.dead_fraction or 0.0) >= t.dead_fraction or \
            1.0 - lt.unit_recent_active.mean() < t.alike_dead_fraction:
        return None
    return replace(lt, unit_ever_active=lt.unit_recent_active,
                   unit_records=lt.unit_recent_records)


def _values_per_unit(lt: LayerTrace, steps: int) -> Optional[int]:
    """How many values each unit of an activation point showed over its ``steps`` observed
    records (the first call's elements per unit, times the records); None when unknown."""
    units = lt.unit_ever_active.size if lt.unit_ever_active is not None else 0
    if not lt.shape or not units or not steps:
        return None
    return math.prod(lt.shape) // units * steps


def feeding_module(trace: RunTrace, lt: LayerTrace, hops: int = 4) -> Optional[ModuleFacts]:
    """The module whose output feeds this activation, looking back through pass-through
    layers (Dropout, pooling, reshapes); None when the trace's edges do not say."""
    target = ("module", lt.module) if lt.op == "output" else lt.node
    for _ in range(hops):
        sources = [src for src, _ in predecessors(trace, target) if src[0] == "point"]
        if not sources:
            return None
        facts = trace.modules.get(sources[0][1])
        if facts is None or passed_on_by(facts) is None:
            return facts
        target = ("module", facts.name)
    return None


def input_spread(trace: RunTrace, feeder: Optional[ModuleFacts]) -> Optional[float]:
    """How much the samples differ where they enter ``feeder``: the between-sample RMS of the
    observed outputs flowing into it unchanged (through reshapes, dropout) over their RMS;
    where what flows in is made by other ops (a mean or pool over positions), the between-sample
    share of the feeder's own output spread. None where the trace does not say (batches of
    one, no edge)."""
    fed = sources(trace, feeder.name) if feeder is not None else []
    if not fed:
        return None
    if all(all(op in SHAPE_OPS or op in FUNCTIONAL_DROPOUT for op in via) for _, via in fed):
        spreads = [_spread(layer_at(trace, src), "rms") if src[0] == "point" else None
                   for src, _ in fed]
        return None if None in spreads else max(spreads)
    return _spread(output_point(trace, feeder.name), "std")


def _spread(lt: Optional[LayerTrace], scale: str) -> Optional[float]:
    """An observed output's between-sample RMS over its ``scale`` (``rms`` or ``std``)."""
    stats = lt.activation if lt is not None else None
    if stats is None or stats.signal is None or not getattr(stats, scale) > 0:
        return None
    return stats.signal / getattr(stats, scale)


def _param_state(trace: RunTrace, facts: ModuleFacts) -> dict:
    """The measured bias RMS and weight std of a module, and the Kaiming std for its fan-in."""
    state = {}
    for p in trace.params:
        if p.module != facts.name or not p.shape:
            continue
        size = math.prod(p.shape)
        if p.name.endswith(".bias") and size:
            state["feeding_bias_rms"] = p.norm / math.sqrt(size)
        elif p.name.endswith(".weight") and facts.base in WEIGHT_LAYERS:
            state["feeding_weight_std"] = p.std
        elif p.name.endswith(".weight") and is_norm_type(facts.base) and size:
            state["feeding_norm_weight_rms"] = p.norm / math.sqrt(size)
    fan_in = _fan_in(facts)
    if fan_in and "feeding_weight_std" in state:
        state["kaiming_std"] = math.sqrt(2.0 / fan_in)
    return state


def _fan_in(facts: ModuleFacts) -> Optional[int]:
    attrs = facts.attrs
    if isinstance(attrs.get("in_features"), int):
        return attrs["in_features"]
    if isinstance(attrs.get("in_channels"), int) and isinstance(attrs.get("kernel_size"), tuple):
        return attrs["in_channels"] // max(attrs.get("groups", 1), 1) * math.prod(
            attrs["kernel_size"])
    return None


# A norm layer's weight (gamma) below this RMS scales its normalized output down to ~0: the
# units after it read as dead whatever their input (transformers' EfficientNet/MobileViT init
# draws gamma from N(0, 0.02)).
NORM_WEIGHT_COLLAPSED = 0.1


# Where TL101's fix ends for a ReLU: what keeps a gradient below 0.
_DEAD_TAIL = "; or replace the ReLU with nn.LeakyReLU(0.01), which keeps a gradient for x < 0"
# A module's own bias Parameter above this RMS sets its units' sign by itself (default inits
# draw biases within ±1/sqrt(fan_in)).
OWN_BIAS_RMS = 1.0


def _own_bias(trace: RunTrace, lt: LayerTrace) -> Optional[tuple]:
    """``(name, RMS)`` of a bias Parameter that ``lt``'s module holds itself (not in a child:
    a graph conv's ``self.bias``, added before its functional ReLU) whose RMS is above
    ``OWN_BIAS_RMS``, else None."""
    if lt.op == "output":
        return None
    for p in trace.params:
        if p.module != lt.module or "bias" not in p.name.rpartition(".")[2] or p.norm is None:
            continue
        rms = p.norm / math.sqrt(math.prod(p.shape) or 1)
        if rms > OWN_BIAS_RMS:
            return p.name, rms
    return None


def _fed_by_input(trace: RunTrace, lt: LayerTrace) -> Optional[str]:
    """The model input that ``lt``'s input comes straight from (through shape ops or none: a
    functional ReLU on the batch), else None."""
    target = ("module", lt.module) if lt.op == "output" else lt.node
    return next((src[1] for src, via in predecessors(trace, target)
                 if src[0] == "input" and SHAPE_OPS.issuperset(via)), None)


def _unnormalized_input_into(trace: RunTrace, feeder: ModuleFacts) -> Optional[Hit]:
    """TL201's finding (at its defaults) on a model input that ``feeder`` takes as it is, or
    None."""
    if feeder.base not in WEIGHT_LAYERS:
        return None
    inputs = {inp.name: inp for inp in trace.inputs}
    return next((hit for hit in hits_at_defaults(trace, "TL201")
                 if hit.evidence.get("input") in inputs
                 and feeder in direct_consumers(trace, inputs[hit.evidence["input"]])), None)


def _after_sum(trace: RunTrace, lt: LayerTrace) -> bool:
    """Whether ``lt``'s input comes straight from a sum of paths (a residual join)."""
    target = ("module", lt.module) if lt.op == "output" else lt.node
    return any(any(op in SUM_OPS for op in via) for _, via in predecessors(trace, target))


def _dead_at_first(trace: RunTrace, lt: LayerTrace, t: Thresholds) -> bool:
    """Whether at the first observed step, before any update, ``dead_fraction`` or more of
    ``lt``'s units were already dead in that step's batch (a run longer than the unit window
    still shows its units dead from the init: a BatchNorm bias of -5 before a ReLU6)."""
    first = trace.per_step[0] if trace.per_step else {}
    found = layer_columns(first.get("layers", {}), [lt.node[1:]], ("dead_fraction",))
    share = found["dead_fraction"][0] if found else None
    return share is not None and share >= t.dead_fraction


def _dead_relu_fix(feeder: Optional[ModuleFacts], evidence: dict, kind: Optional[str],
                   from_init: bool = False, joined: bool = False) -> str:
    """TL101's fix: the layer feeding the units, what it measured, and the learning rate
    unless the units were dead from the first step (before any update: the init's or the
    data's). Where the units' input is a sum of paths (a residual join), each path's last
    layer is what to check."""
    rate = "" if from_init else "lower the learning rate; "
    if kind == "relu":
        tail = _DEAD_TAIL
    else:  # GELU family: ~0 out means inputs below about -3.4, or a scale collapsed to ~0
        tail = ("; a GELU/SiLU output ~0 also means its input is ~0: check that the scale of "
                "the signal does not collapse before it (TL103)")
    if feeder is None:
        return (f"{rate}re-initialize the layer feeding it with "
                "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu') and "
                "nn.init.zeros_(layer.bias)" + tail)
    measured = []
    if "feeding_bias_rms" in evidence:
        measured.append(f"bias RMS {evidence['feeding_bias_rms']:.3g}")
    if "feeding_weight_std" in evidence:
        kaiming = evidence.get("kaiming_std")
        measured.append(f"weight std {evidence['feeding_weight_std']:.3g}" +
                        (f" vs Kaiming's {kaiming:.3g}" if kaiming else ""))
    if "feeding_norm_weight_rms" in evidence:
        measured.append(f"weight RMS {evidence['feeding_norm_weight_rms']:.3g}")
    state = f" ({', '.join(measured)})" if measured else ""
    layer = f"{feeder.type} {feeder.name!r}{state}"
    if feeder.base in WEIGHT_LAYERS:
        return (f"{rate}re-initialize the layer feeding it, {layer}, with "
                f"nn.init.kaiming_normal_(layer.weight, nonlinearity='relu') and "
                f"nn.init.zeros_(layer.bias)" + tail)
    if joined and not feeder.is_leaf:
        return (f"{rate}the units' input adds up several paths (a residual "
                "join) and is negative for these units: check the last layer of each path, "
                "e.g. a shortcut projection whose bias outweighs its weights sets each unit's "
                "sign (nn.init.zeros_(layer.bias))" + tail)
    if evidence.get("feeding_norm_weight_rms", 1.0) < NORM_WEIGHT_COLLAPSED:
        return (f"re-initialize the norm layer feeding it, {layer}, with "
                f"nn.init.ones_(layer.weight) and nn.init.zeros_(layer.bias): its weight "
                f"scales every normalized output to about its own size" + tail)
    return (f"{rate}check the layer feeding it, {layer}: its outputs are "
            f"negative for these units (e.g. reset a norm layer's bias with "
            f"nn.init.zeros_(layer.bias))" + tail)


@rule("TL102", "saturated-activation", "warning", saturated_fraction=0.3)
def saturated_activation(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Saturated tanh/sigmoid: many outputs sit in the flat tails, where the derivative is ~0
    (or, at the model's output, its targets lie beyond the last activation's range).

    ## What it does
    For every tanh/sigmoid-family output that is a hidden activation (not the model's own
    output; a gate multiplied into another tensor only in a ``trainlint check``, from the init,
    where a healthy gate sits near 0.5: in a Monitor run a trained gate may settle open or
    shut), it measures the share of outputs with
    ``|tanh| > 0.99`` (for sigmoid ``|2σ - 1| > 0.99``: the local derivative is below 2% of its
    peak). It fires when that share is at least ``saturated_fraction``.

    ## Why is this bad?
    A saturated unit passes almost no gradient: learning stalls in every layer below it.
    The classic cause is weights that are too large, e.g. N(0, 1) in a wide layer.

    ## Example
    A 10-layer, 500-wide tanh MLP initialized with ``nn.init.normal_(w, std=1.0)``.

    ## Fix
    Initialize with ``nn.init.xavier_normal_(w, gain=nn.init.calculate_gain('tanh'))``, add a
    normalization layer before the activation, or use ReLU/GELU. Where the layer feeding it
    takes a model input as it is with an RMS above 10 (raw timestamps, counts), the fix is to
    standardize that input: no init keeps such values out of the tails.

    An ``nn.LSTM``'s gates are fused inside it: its forget gates are estimated from its
    weights and its observed input at the first observed step (each unit's forget bias plus
    the input's mean through its weights, against the spread its inputs and a hidden state
    of mean square 1 give it). Where ``saturated_fraction`` of the units sit below 0.05 even
    two spreads above their mean (a forget-gate bias of -5), the cell state is wiped at
    every time step: the fix initializes those biases at 1.

    The model's own output is judged in a ``trainlint check`` against the target a comparing
    loss (MSE, L1, smooth L1, Huber, BCE) sets it against, as the loss gets it (after the loss
    function's masks and rescaling): where the output the loss reads comes from a sigmoid,
    tanh or ReLU (through reshapes and pass-through modules) and ``OUT_OF_RANGE`` (10%) or
    more of that target lies beyond the activation's range, by ``OUT_OF_REACH`` (25%) of the
    targets' span or more (noise around a bound is no mismatch), the output can only
    saturate toward them (a decoder ending in sigmoid trained on images scaled to [-1, 1]):
    the fix matches the last activation to the targets. A loss that reads a mix of outputs
    or a rescaled one is not judged, nor one with ``reduction='none'`` (masked or weighted
    after).
    A gate's fix keeps the gate (its range is its job) and re-initializes what feeds it.

    A unit that saturates only once the model has fitted is confident, not stuck: where the
    observed steps at which a classification loss was still above ``FITTED_LOSS`` (10%) of
    its first observed value had less than ``saturated_fraction`` of the outputs in the tails on
    average, and the loss then fell to that level, the layer is left alone (a classifier's
    tanh pooler saturates as its loss goes to 0). So too a tanh/sigmoid that only the output
    layer reads (through pass-through modules), below ``saturated_fraction`` at the run's
    first observed step, in a run whose classification loss fell to ``LEARNED_LOSS`` (half)
    of its first value: the classifier learned through it (a fine-tuned BERT's pooler).
    """
    # The calls of one function in one module (a hand-unrolled RNN's tanh at every time step)
    # make one finding, at the worst call.
    calls: dict[tuple, list] = {}
    for lt in trace.layers:
        if lt.kind not in ("tanh", "sigmoid") or lt.activation is None:
            continue
        share = lt.activation.saturated_fraction or 0.0
        if share < t.saturated_fraction or is_model_output(trace, lt):
            continue
        if gate_layer(trace, lt) and trace.mode != "check":
            continue  # a trained gate may settle open or shut; at init it sits near 0.5
        if _saturated_once_fitted(trace, lt, t) or _saturated_by_training_head(trace, lt, t):
            continue
        calls.setdefault((lt.module, lt.op.split("#")[0]), []).append((share, lt))
    for found in calls.values():
        share, lt = max(found, key=lambda item: item[0])
        which = (f"{len(found)} calls of {lt.kind} in {lt.module!r} saturate; at the worst, "
                 f"{lt.label}, {_fmt_pct(share)} of the outputs" if len(found) > 1 else
                 f"{_fmt_pct(share)} of the outputs of {lt.label} ({lt.kind})")
        feeder = feeding_module(trace, lt)
        raw = large_input_into(trace, feeder.name) if feeder is not None else None
        evidence = {"saturated_fraction": round(share, 4), "threshold": t.saturated_fraction,
                    "std": lt.activation.std, "calls": len(found)}
        if raw is not None:
            evidence.update(raw_input=raw[0], raw_input_rms=raw[1])
            fix = (f"standardize the model's input {raw[0]!r} (RMS {raw[1]:.3g}) before "
                   f"{feeder.name!r} takes it: x = (x - mean) / std with the training set's "
                   f"statistics (TL201); no init of {feeder.name!r} keeps such values out of "
                   f"the {lt.kind}'s tails")
        elif gate_layer(trace, lt):
            # A gate's (0, 1) or (-1, 1) range is its job: its inputs are what is off.
            whose = f" ({feeder.name!r})" if feeder is not None else ""
            fix = (f"keep the {lt.kind} if it is a gate (its output multiplies another tensor "
                   f"here: a gate needs its range); bring its inputs back near 0: "
                   f"re-initialize the weights feeding it{whose}, and every layer whose output "
                   f"adds into its input, at "
                   f"the default or Xavier scale (nn.init.xavier_uniform_) and their biases at 0 "
                   f"(an LSTM's forget gate at 1), or, where that layer's own input is large, "
                   f"normalize it (nn.LayerNorm before the layer)")
        else:
            feeders = sorted({f.name for f in (feeding_module(trace, c) for _, c in found)
                              if f is not None and f.base in WEIGHT_LAYERS})
            which_layers = (f"the layers feeding them ({', '.join(map(repr, feeders))})"
                            if len(found) > 1 and feeders else
                            f"the layer feeding it{f' ({feeders[0]!r})' if feeders else ''}")
            if feeders:
                evidence["feeding_modules"] = feeders
            fix = (f"re-initialize {which_layers} with nn.init.xavier_normal_("
                   f"layer.weight, gain=nn.init.calculate_gain('{lt.kind}')), add "
                   f"nn.LayerNorm/BatchNorm before the {lt.kind}, or use a non-saturating "
                   f"activation (nn.ReLU, nn.GELU)")
        yield Hit(
            module=lt.module,
            message=(f"{which} sit in the saturated tails (derivative < 2% of its peak; "
                     f"threshold {_fmt_pct(t.saturated_fraction)}); output std "
                     f"{lt.activation.std:.3g}"),
            fix=fix, evidence=evidence,
        )
    yield from _targets_out_of_range(trace)
    for name, (share, bias, spread) in trace.forget_gates.items():
        if share >= t.saturated_fraction:
            yield Hit(
                module=name,
                message=(f"LSTM {name!r}: {share:.0%} of its units have forget gates below "
                         f"{FORGET_GATE_CLOSED:g} (sigmoid of a bias of {bias:.3g} against a "
                         f"spread of +-{spread:.2g} from its inputs): the cell state is wiped "
                         "at every time step, so nothing is remembered beyond one step"),
                fix=("initialize the forget-gate biases at 1 (each layer's bias_ih[H:2H] = 1 "
                     "and bias_hh[H:2H] = 0, H = hidden_size; PyTorch orders the gates input, "
                     "forget, cell, output), so the cell keeps its state at first"),
                evidence={"closed_fraction": round(share, 4), "forget_bias": bias,
                          "spread": spread, "threshold": t.saturated_fraction})


# A loss at or below this share of its first observed value has fitted the training data: a
# tanh/sigmoid that saturates only from then on is confident, not stuck (TL102). A tiny BERT's
# pooler tanh read 35% saturated over a 600-step run whose loss fell from ln 4 to 0.001, with
# 0-10% while it was still falling.
FITTED_LOSS = 0.1


# A classification loss whose last observed values are at most this share of its first has
# learned: a saturated tanh/sigmoid that only the model's output layer reads (a BERT pooler
# before its classifier) did not stop it (TL102). A tiny pretrained BERT's pooler went from
# 19% to 81% saturated within 40 fine-tuning steps, then its loss fell from 1.39 to 0.28
# (accuracy 0.959); re-initializing the pooler, the fix offered, gave 0.654.
LEARNED_LOSS = 0.5


def _saturated_by_training_head(trace: RunTrace, lt: LayerTrace, t: Thresholds) -> bool:
    """Whether ``lt`` feeds only the output layer, was below ``t.saturated_fraction`` at the
    run's first observed step (not saturated by its init) and the loss learned anyway."""
    if not _feeds_head(trace, lt) or not _learned(trace):
        return False
    first = trace.per_step[0].get("layers")
    found = layer_columns(first, [lt.node[1:]], ("saturated_fraction",)) if first else None
    share = found["saturated_fraction"][0] if found else None
    return share is not None and share < t.saturated_fraction


def _learned(trace: RunTrace) -> bool:
    """Whether a classification loss seen from its first step fell to ``LEARNED_LOSS`` x its
    first value (the median of the last three observed losses)."""
    if trace.loss_kind not in CLASSIFICATION_LOSSES or not seen_from_start(trace):
        return False
    losses = [s["loss"] for s in trace.per_step
              if s.get("loss") is not None and math.isfinite(s["loss"])]
    return len(losses) >= 4 and losses[0] > 0 and \
        median(losses[-3:]) <= LEARNED_LOSS * losses[0]


def _feeds_head(trace: RunTrace, lt: LayerTrace) -> bool:
    """Whether ``lt``'s output goes only into the weight layer that makes the model's output
    (through pass-through modules and reshapes)."""
    head = output_layer(trace)
    if head is None or head.base not in WEIGHT_LAYERS:
        return False
    taken = downstream(trace, lt.node)
    return bool(taken) and all(dst == ("module", head.module) and only_shape_ops(via)
                               for dst, via in taken)


def _saturated_once_fitted(trace: RunTrace, lt: LayerTrace, t: Thresholds) -> bool:
    """Whether ``lt`` saturated only at observed steps where a classification loss had fitted
    (at most ``FITTED_LOSS`` x the first observed loss, near ln C at the init): at the steps
    before, its share of saturated outputs was below ``t.saturated_fraction`` on average.
    False where no step fitted, the per-step shares are not known, or the loss is another
    kind (a regression's first loss holds the targets' offset, which the first steps learn:
    a tanh MLP at Adam 0.03 saturated at 94% once its MSE fell from 29 to 0.55, test MSE 0.075
    against 0.027 with LayerNorm before each tanh)."""
    if trace.loss_kind not in CLASSIFICATION_LOSSES:
        return False
    points = [s for s in trace.per_step if s.get("loss") is not None and s.get("layers")]
    if len(points) < 2 or not trace.per_step or trace.per_step[0].get("loss") is None:
        return False
    first = trace.per_step[0]["loss"]
    if not (math.isfinite(first) and first > 0):
        return False
    before, fitted = [], 0
    for s in points:
        found = layer_columns(s["layers"], [lt.node[1:]], ("saturated_fraction",))
        share = found["saturated_fraction"][0] if found else None
        if share is None:
            continue
        if math.isfinite(s["loss"]) and s["loss"] <= FITTED_LOSS * first:
            fitted += 1
        else:
            before.append(share)
    return fitted > 0 and bool(before) and sum(before) / len(before) < t.saturated_fraction


# Per output activation: (its range as text, the target's share beyond it, how far beyond it
# the target reaches).
OUTPUT_RANGES = {
    "sigmoid": ("(0, 1)", lambda tt: tt.below_zero + tt.above_one,
                lambda tt: max(-tt.min, tt.max - 1)),
    "tanh": ("(-1, 1)", lambda tt: tt.below_minus_one + tt.above_one,
             lambda tt: max(-1 - tt.min, tt.max - 1)),
    "relu": ("[0, inf)", lambda tt: tt.below_zero, lambda tt: -tt.min),
}
# A target with at least this share of its values beyond the output's range (TL102)...
OUT_OF_RANGE = 0.1
# ...reaching beyond it by at least this share of the targets' own span (noise around a
# bound, a ReLU head on relu(f(x)) + noise, is no mismatch).
OUT_OF_REACH = 0.25


def _bounded_origin(trace: RunTrace, origin: tuple) -> Optional[LayerTrace]:
    """The sigmoid/tanh/ReLU point a model output comes from (through reshapes and
    pass-through modules such as ``nn.Unflatten``), or None."""
    node, via = origin
    for _ in range(4):
        lt = layer_at(trace, node) if node[0] == "point" and only_shape_ops(via) else None
        if lt is None:
            return None
        if lt.kind in OUTPUT_RANGES:
            return lt
        if passed_on_by(trace.modules.get(lt.module)) is None:
            return None
        feeds = sources(trace, lt.module)
        if len(feeds) != 1:
            return None
        node, via = feeds[0]
    return None


def _targets_out_of_range(trace: RunTrace) -> Iterator[Hit]:
    """TL102 where a comparing loss (MSE, L1, BCE...) set a model output that comes from a
    bounded activation against a target that lies beyond that range in ``OUT_OF_RANGE`` of
    its values, as the loss got it (after its masks and rescaling): the output can only
    saturate toward them (a decoder's sigmoid trained on images scaled to [-1, 1])."""
    for tt in trace.targets:
        lt = _bounded_origin(trace, tt.origin) if tt.origin is not None else None
        if lt is None:
            continue
        span, beyond, reach = OUTPUT_RANGES[lt.kind]
        share = beyond(tt)
        if share < OUT_OF_RANGE or reach(tt) < OUT_OF_REACH * (tt.max - tt.min):
            continue
        yield Hit(
            module=lt.module,
            message=(f"the model's output comes from {lt.kind} ({lt.label}), whose range is "
                     f"{span}, but {_fmt_pct(share)} of {tt.name} lie outside it (min "
                     f"{tt.min:.3g}, max {tt.max:.3g}): the output can never reach them and is "
                     f"driven into the {lt.kind}'s flat tails"),
            fix=RANGE_FIXES[lt.kind],
            evidence={"output_op": lt.kind, "target": tt.name, "outside": round(share, 4),
                      "target_min": tt.min, "target_max": tt.max, "threshold": OUT_OF_RANGE},
        )
        return


RANGE_FIXES = {
    "sigmoid": "end the model in nn.Tanh() for targets in [-1, 1], in no activation for "
               "unbounded ones, or rescale the targets to [0, 1] ((y + 1) / 2 for [-1, 1])",
    "tanh": "drop the final tanh for targets beyond [-1, 1] (or rescale the targets into it)",
    "relu": "drop the final ReLU: the targets go below 0 (a ReLU output there is 0 with no "
            "gradient)",
}


def gate_layer(trace: RunTrace, lt: LayerTrace) -> bool:
    """An output multiplied into another tensor (LSTM/GLU/SE gates, tanh inside GELU)."""
    return any(e.src == lt.node and e.dst[0] == "op" for e in trace.edges)


@rule("TL105", "sigmoid-hidden-activation", "info")
def sigmoid_hidden_activation(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Sigmoid used as a hidden-layer nonlinearity.

    ## What it does
    Finds sigmoid outputs (``nn.Sigmoid``, ``torch.sigmoid``, ``x.sigmoid()``, hard sigmoid)
    that go straight (through reshapes, dropout and pooling, as modules or functional ops such
    as ``F.dropout``/``F.max_pool2d``) into another weight layer (Linear, Conv, RNN). A sigmoid
    that is the model's output, a gate multiplied into another tensor (squeeze-and-excitation,
    GLU, LSTM-style gating, a hand-written SiLU) or that sits inside an attention block is not
    reported. All such sigmoids are reported in one finding, at the first.

    ## Why is this bad?
    Sigmoid outputs are always positive (not zero-centred): the next layer's weight gradients
    share one sign per input, so updates zig-zag. Its derivative is at most 0.25 and ~0 in
    both tails, so gradients shrink through every sigmoid layer. It is fine as an output or a
    gate, not as a hidden nonlinearity.

    ## Example
    ``nn.Sequential(nn.Linear(64, 128), nn.Sigmoid(), nn.Linear(128, 10))``.

    ## Fix
    Use ``nn.ReLU()`` (with Kaiming init) or ``nn.GELU()``; ``nn.Tanh()`` if a bounded,
    zero-centred output is needed.
    """
    found = []
    for lt in trace.ordered_layers():
        if lt.kind != "sigmoid" or is_model_output(trace, lt) or is_gate(trace, lt):
            continue
        if inside_attention(trace, lt.module):
            continue
        targets = feeds_weight_layer(trace, lt)
        if targets:
            found.append((lt, targets))
    if not found:
        return
    first, targets = found[0]
    others = [lt.label for lt, _ in found[1:]]
    also = f"; {len(others)} more alike: {others[:8]}" if others else ""
    yield Hit(
        module=first.module,
        message=(f"{first.label} ({first.type}) is a sigmoid used as a hidden nonlinearity: it "
                 f"feeds {', '.join(repr(n) for n in targets[:3])}; its output is always "
                 f"positive and its derivative at most 0.25{also}"),
        fix=("replace it with nn.ReLU() (initialize the layer before it with "
             "nn.init.kaiming_normal_(w, nonlinearity='relu')) or nn.GELU()"),
        evidence={"feeds": targets, "sigmoids": [lt.label for lt, _ in found]},
    )
