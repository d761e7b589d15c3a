"""The loss over a run: not going down, or diverging."""

from __future__ import annotations

import heapq
import math
from statistics import median
from typing import Iterator, Optional

import numpy as np

from trainlint.engine import Hit, Skip, Thresholds, rule
from trainlint.trace import CLASSIFICATION_LOSSES, RunTrace

from .gradients import firing, judged_params, nice_below


def loss_points(trace: RunTrace) -> list[dict]:
    """The observed steps' records, then a Monitor's losses since its last observed step (the
    curve reaches the step the report came at)."""
    tail = trace.loss_tail
    last = trace.per_step[-1]["step"] if trace.per_step else -1
    return trace.per_step + ([tail] if tail is not None and tail["step"] > last else [])


# A loss below -``unbounded`` x its start that fell by this factor more over its last third
# falls without bound (TL604).
STILL_FALLING = 10.0
# ...or that is this far below its start, falling or not: no likelihood of a batch gets there
# (float32 densities stop ~100 below 0 per element).
FAR_BELOW = 1e9
# A loss whose lowest value goes below -this share of its typical level's size swings around
# 0: it has no floor at 0 near its level (TL603, TL604).
SIGNED_SHARE = 0.5


def signed_loss(trace: RunTrace) -> Optional[float]:
    """The lowest loss seen (a step's, or the lowest in a Monitor's window) where it is below
    0 by ``SIGNED_SHARE`` or more of the size of the typical level (the median of the
    observed losses), else None: such a loss (a policy gradient's with normalized advantages,
    around 0) has no floor at 0, so its rises and falls relative to its level say nothing. A
    Gaussian NLL at 0.44 with one batch at -0.04 still has its level judged."""
    points = loss_points(trace)
    values = [s[k] for s in points for k in ("loss", "loss_mean", "loss_min")
              if s.get(k) is not None and math.isfinite(s[k])]
    levels = [v for _, v in loss_curve(trace) if math.isfinite(v)]
    if not values or not levels:
        return None
    low = min(values)
    return low if low < 0 and low <= -SIGNED_SHARE * abs(median(levels)) else None


def no_loss(trace: RunTrace) -> str:
    """Why a rule that needs the loss has none: no loss was observed, and what to do (a check
    computes the loss itself: it stopped before one, and its errors say why)."""
    if trace.mode == "check":
        return "no loss was observed: the check stopped before its first loss (see its errors)"
    return f"no loss was observed ({trace.loss_hint or 'pass the loss to monitor.step(loss)'})"


def unknown_loss(trace: RunTrace) -> str:
    """Why a rule that needs the loss's kind has none (with the adapter's word on a loss it
    never saw)."""
    if trace.rootless:
        return ("the loss function is not known: the model's own forward did not run, so "
                "the loss could not be traced to its output")
    if trace.mode == "check" and not loss_curve(trace):
        return no_loss(trace)
    why = "the loss function is not known (no torch loss seen in the loss's graph)"
    return f"{why}; {trace.loss_hint}" if trace.loss_hint and not trace.losses else why


def loss_curve(trace: RunTrace) -> list[tuple[int, float]]:
    """(step, loss) per observed step: in a Monitor run the mean loss over the steps since the
    previous observation (every step counts, not only the observed ones), and over those after
    the last one; else the step's."""
    curve = []
    for s in loss_points(trace):
        value = s.get("loss_mean", s.get("loss"))
        if value is not None:
            curve.append((s["step"], value))
    return curve


def _ranks(values: list) -> np.ndarray:
    """Ranks of ``values`` (0 for the smallest), ties sharing their average rank."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True,
                                   return_counts=True)
    return (np.cumsum(counts) - (counts + 1) / 2.0)[inverse]


def trend_z(losses: list) -> float:
    """Spearman's rank correlation of the losses with their order, in units of its standard
    deviation when there is no trend (``rho * sqrt(n - 1)``): about -2.3 or below, the loss
    falls steadily (a 1% chance for a flat noisy curve); 0 when it cannot tell (ties only)."""
    n = len(losses)
    if n < 3:
        return 0.0
    order = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    ranks = _ranks(losses)
    ranks -= ranks.mean()
    spread = math.sqrt(float(order @ order) * float(ranks @ ranks))
    return float(order @ ranks) / spread * math.sqrt(n - 1) if spread > 0 else 0.0


# Points that measure where a run started, and how many standard errors of the noise a fall
# from them must clear (a flat noisy curve clears it about once in 700 runs).
EARLY_POINTS = 3
EARLY_SIGMAS = 3.0


def _spread(values: list) -> float:
    """A robust standard deviation of ``values``: 1.4826 times their median absolute
    deviation."""
    x = np.asarray(values, dtype=np.float64)
    return 1.4826 * float(np.median(np.abs(x - np.median(x))))


def _median_error(sigma: float, *counts: int) -> float:
    """The standard error of a difference of medians of ``counts`` points each, for noise of
    standard deviation ``sigma`` (a median of k points: about 1.2533 sigma / sqrt(k))."""
    return 1.2533 * sigma * math.sqrt(sum(1.0 / k for k in counts))


def early_fall(losses: list, third: int) -> float:
    """The relative fall from the first :data:`EARLY_POINTS` losses (their median) to the
    last third's median, or 0 when it is within :data:`EARLY_SIGMAS` standard errors of the
    noise (the last third's spread, robustly): a run that learned early and then converged
    fell, although its first third is mostly plateau already."""
    start = median(losses[:EARLY_POINTS])
    tail = losses[-third:]
    end = median(tail)
    if start - end <= EARLY_SIGMAS * _median_error(_spread(tail), EARLY_POINTS, len(tail)):
        return 0.0
    return (start - end) / (abs(start) if start else 1.0)


def median_blur(first: list, last: list) -> float:
    """How far noise alone may move the median of ``last`` from that of ``first``:
    :data:`EARLY_SIGMAS` standard errors of their difference (the two parts' spreads,
    robustly)."""
    sigma = max(_spread(first), _spread(last))
    return EARLY_SIGMAS * _median_error(sigma, len(first), len(last))


def rise_beyond_noise(first: list, last: list) -> bool:
    """Whether the median of ``last`` is above that of ``first`` by more than
    :func:`median_blur`: on a converged run's plateau, heavy-tailed batch losses move a
    third's median by 20-30%."""
    return median(last) - median(first) > median_blur(first, last)


def chance_level(trace: RunTrace) -> Optional[tuple[int, float]]:
    """``(classes, loss)`` of an uninformed classifier under the trace's loss: ln(C) for one
    averaged cross-entropy/NLL term over C classes, ln(2) for BCE with logits; None when the
    loss is not such a term or C is unknown."""
    if (trace.loss_kind not in CLASSIFICATION_LOSSES or (trace.loss_terms or 1) > 1
            or trace.loss_reduction not in (None, "mean")):
        return None
    if trace.loss_kind == "bce_with_logits":
        return 2, math.log(2.0)
    if trace.num_classes and trace.num_classes >= 2:
        return trace.num_classes, math.log(trace.num_classes)
    return None


# A Monitor whose first classification loss is below this fraction of ln(C) watches a model
# that was trained before (at init the loss is about ln(C)), whatever its optimizer holds.
TRAINED_BELOW = 0.5


def micro_batches(trace: RunTrace) -> int:
    """The micro-batches per optimizer step where ``monitor.step()`` runs per micro-batch of
    gradient accumulation: the most an observation ran on over to its optimizer step (one that
    began at a window's first micro-batch spans it all; steps a GradScaler skipped do not
    count); 1 otherwise."""
    return max([s.get("micro_batches", 1) for s in trace.per_step] or [1])


# Mid-run (a Monitor's fail_on), TL603 judges a loss curve spanning at least this many
# optimizer steps (and NOISE_POINTS observed steps): healthy runs that sat on a plateau first
# were stopped by it: a GRU seq2seq near ln(40) until step ~60 (every=10: stopped at step 50),
# an LSTM LM for ~30 steps, a VAE for 50, a multi-label BCE MLP at every=5 at step 25, and a
# tiny BERT whose monitor.step() ran per micro-batch (4 per step) after 200 micro-batches.
INTERIM_STEPS = 200


# A loss that rose over the run but whose last third is below this share of its start fell,
# then rose (TL603 info: a curriculum, a KL-annealing schedule); above it, a rate too high
# late in a run does that (Adam at 0.08: 2.12 -> 0.37 -> 1.35, accuracy 0.614 against 0.975).
FELL_BELOW_START = 0.5


# A learning rate that rose this many times over from the first observed step to its peak
# was warming up (TL603 judges the loss from the peak on).
WARMUP_RISE = 2.0


def warmup_end(trace: RunTrace) -> Optional[int]:
    """The observed step at which the learning rate (the highest over the param groups)
    first reached its peak, where it rose ``WARMUP_RISE`` x or more from the first observed
    step to it (a scheduler's warmup), else None."""
    series = []
    for s in trace.per_step:
        rates = [v for v in (s.get("lrs") or {}).values() if math.isfinite(v)]
        if rates:
            series.append((s["step"], max(rates)))
    if len(series) < 2:
        return None
    top = max(lr for _, lr in series)
    start = series[0][1]
    if top <= 0 or top < WARMUP_RISE * start:
        return None
    return next(step for step, lr in series if lr == top)


def joined_later(trace: RunTrace, curve: list) -> bool:
    """Whether the loss ``curve`` starts after training began: its first point did not begin
    at step 0 (:meth:`RunTrace.at_start`),
    the optimizer already held state (a resumed checkpoint, a second phase), or, in a Monitor
    run, its first classification loss is under :data:`TRAINED_BELOW` × ln(C) (plain SGD
    keeps no state to tell)."""
    first = next((s for s in trace.per_step if s["step"] == curve[0][0]), {"step": curve[0][0]})
    if not trace.at_start(first):
        return True
    chance = chance_level(trace)
    return (trace.mode == "monitor" and chance is not None
            and curve[0][1] < TRAINED_BELOW * chance[1])


def seen_from_start(trace: RunTrace) -> bool:
    """Whether the run was observed from its first training step: its first observed step
    began at step 0 (:meth:`RunTrace.at_start`) and its loss curve did not join later
    (:func:`joined_later`)."""
    if not trace.per_step or not trace.at_start(trace.per_step[0]):
        return False
    curve = loss_curve(trace)
    return not (curve and joined_later(trace, curve))


def weights_moved(trace: RunTrace, steps: int) -> Optional[float]:
    """How far the weights moved over ``steps`` training steps, relative to their norm: the
    median over the weight matrices of their mean ‖Δw‖/‖w‖ per observed step, times
    ``steps``; None when no update was measured (no optimizer)."""
    means = []
    for p, _ in judged_params(trace):
        ratios = [r for r in p.update_ratios if math.isfinite(r)]
        if ratios:
            means.append(sum(ratios) / len(ratios))
    return median(means) * steps if means else None


def _competing(trace: RunTrace) -> str:
    """Why a loss's level is not judged: it measures a competition between two networks."""
    if trace.foreign_params:
        return (f"the loss also depends on {trace.foreign_params} trainable tensor(s) outside "
                "the model and its optimizer (another network, such as a GAN's discriminator): "
                "its level shows how the two compete, not whether this model learns")
    if trace.alternating:
        return ("two optimizers stepped one after the other in a training step, each after a "
                "backward of its own, and one backward ran through the network the other "
                "steps (a GAN's discriminator and generator, an actor and a critic): the loss "
                "given to monitor.step() is one of losses that compete, and its level shows how "
                "they compete, not whether the model learns")
    return ("another Monitor's loss runs through this model (a GAN's generator through its "
            "discriminator): its loss level shows how the two compete, not whether it learns")


@rule("TL603", "loss-not-decreasing", "warning", min_points=6, min_drop=0.05,
      min_steady_drop=0.005, steady_z=-2.33, min_movement=0.1, chance_gap=0.05,
      stuck_rate=1e-4, stuck_floor=1e-5, typical_rate=1e-3)
def loss_not_decreasing(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Over a monitored run the loss does not go down.

    ## What it does
    Takes the loss curve of a Monitor run (the mean loss of every window between two observed
    steps), splits it into thirds and compares the median of the last third with the median of
    the first. When the Monitor saw the run from step 0 it fires if the loss fell by less than
    ``min_drop`` (relative), unless it fell steadily: a rank correlation of the loss with the
    step at or below ``steady_z`` standard deviations of a flat curve's (a slow but sure start,
    as in a transformer's warmup) and a fall of at least ``min_steady_drop``. When it joined
    later, it fires only if the loss rose by more than ``min_drop`` and by more than three
    standard errors of the noise (on a converged plateau, heavy-tailed batch losses move a
    third's median by 20-30%). Where each point is one batch's loss (observed steps one
    training step apart: ``every=1``), or the points are noisy (TL604's
    :func:`noise_window`: 20 points or more, each off by over 15% of the level), it needs at
    least 20 points and a rise from the start must clear that noise too. Where the learning
    rate rose ``WARMUP_RISE`` x or more to its peak (a warmup; each observed step keeps its
    groups' rates), the loss is judged from the peak on: a tiny BERT at chance through its
    40-step warmup, stopped by ``fail_on`` at step 50, reached accuracy 0.87-0.98. With 20 points or
    more, whatever each is, a loss that barely fell is judged only when the noise lets a
    ``min_drop`` fall show (three standard errors of the thirds' medians' difference: during
    an AdamW warmup at batch 8, 34 single batches cannot tell a 4% fall from noise; at batch
    2 and ``every=5``, 31 window means of 10 samples each read -3% for a loss that fell
    10.6%). It needs at least
    ``min_points`` observed steps with a finite loss (NaN/Inf losses are TL604's); medians
    make it robust to noisy batches. Judged mid-run to stop it (a Monitor's ``fail_on``), it
    waits for ``NOISE_POINTS`` observed steps over ``INTERIM_STEPS`` (200) optimizer steps
    (micro-batches of gradient accumulation counted as the steps they make up):
    healthy runs sit on a plateau first (a GRU seq2seq near ln(40) for ~60 steps was stopped at
    step 50, an LSTM LM's ~30 steps at step 22); the run's report judges what it saw. A
    Monitor created once training had begun (its optimizer
    already held state: a resumed checkpoint, a second phase; or its first classification
    loss is under half of ln(C)) joined later too, whatever its step count says. A run that
    learned early and then converged also fell: the median of its first three points is
    ``min_drop`` above the last third's, beyond three standard errors of the noise. A loss
    that barely fell is judged only once the weights moved at least ``min_movement`` of their
    norm over the run (a fine-tuning run at lr 2e-5 moves them ~0.1% a step: its first 20
    steps barely change the loss; a learning rate too low for them to move is TL503's),
    unless it is stuck at chance: a classifier's loss within ``chance_gap`` (relative) of ln(C)
    in the first and the last third while the weights move less than ``stuck_rate`` of their
    norm a step (SGD at lr 2e-4 on an MLP: 1.5e-5 a step, inside TL503's band yet far too
    slow to learn anything in the run), unless TL503 reports the rate itself (its measure, the
    median over the weights of each one's largest step, below ``stuck_floor``, TL503's
    ``min_ratio``), over a run long enough that weights moving
    ``typical_rate`` a step would have moved ``min_movement``. A loss that also depends on
    Parameters outside the model and its optimizer (a GAN generator's loss runs through
    the discriminator) is not judged: it rises whenever the other network gets better; nor
    is the loss of a step in which optimizers stepped after different backward passes and one
    of them ran through modules another optimizer steps (a GAN's two networks in one
    module).

    A loss that rose over the run from a low it reached, yet whose last third stays below
    ``FELL_BELOW_START`` (half) of where the run started (beyond the noise: a run seen from
    its start), fell and then rose: info, not a warning, since a change of the data or the loss
    on purpose does that (a curriculum that adds harder data at step 400: 2.09 at the start,
    0.003 before, 0.19 at the end, test accuracy 0.781 against 0.775 without it; a VAE whose
    KL weight ramps up over 400 steps: stopped by ``fail_on`` at step 321 for a +16% rise,
    its test -ELBO 10.76 against 10.74 at a constant weight). Above half its start it stays a
    warning: Adam at 0.08 went 2.12 -> 0.37 -> 1.35 (accuracy 0.614 against 0.975 at 1e-3).

    ## Why is this bad?
    A training loss that does not fall means the model is not learning: the learning rate is
    far off, the gradients do not reach the weights (frozen or not in the optimizer, detached
    graph), the labels do not match the inputs, or the loss is computed on the wrong tensor.

    ## Example
    ``SGD(model.parameters(), lr=1e-7)``: the loss stays at ln(C) for thousands of steps.

    ## Fix
    Overfit a single batch first (the loss must go to ~0); then check the learning rate
    (TL503), the gradients (TL501, TL505, TL506) and the data/label pairing.
    """
    if trace.mode != "monitor":
        raise Skip("it needs a Monitor run (the loss over many training steps)")
    observed = loss_curve(trace)
    if not observed:
        raise Skip(no_loss(trace))
    curve = [(step, loss) for step, loss in observed if math.isfinite(loss)]
    if not curve:
        raise Skip(f"none of the {len(observed)} observed losses is finite (NaN/Inf: see "
                   "TL604)")
    if trace.foreign_params or trace.adversarial or trace.alternating:
        raise Skip(_competing(trace))
    below = signed_loss(trace)
    if below is not None:
        raise Skip(f"the loss goes below 0 (to {below:.4g}): it has no floor at 0 (a policy "
                   "gradient's or a likelihood's), so a relative fall says nothing of learning; "
                   "track the task's own measure (return, accuracy)")
    from_start = not joined_later(trace, curve)
    # Points one training step apart are single batches' losses, not a window's mean.
    single = all(b - a == 1 for (a, _), (b, _) in zip(curve, curve[1:]))
    needed = max(t.min_points, NOISE_POINTS) if single else t.min_points
    warm = warmup_end(trace) if from_start else None
    if warm is not None:  # judged from the rate's peak on: a warmup's loss need not fall
        curve = [(step, loss) for step, loss in curve if step >= warm]
        if len(curve) < needed:
            raise Skip(f"the learning rate rose (a warmup) until step {warm}: the loss is "
                       f"judged over the observed steps from there, {len(curve)} so far, "
                       f"fewer than {needed}")
    if len(curve) < needed:
        per = " (each one batch's loss: every=1)" if single and needed > t.min_points else ""
        finite = "" if len(curve) == len(observed) else (
            f" finite (of {len(observed)} observed: the others NaN/Inf, see TL604)")
        raise Skip(f"it needs at least {needed} observed steps with a loss{per}; "
                   f"saw {len(curve)}{finite}")
    # Optimizer steps, where monitor.step() runs per micro-batch of gradient accumulation.
    span = (curve[-1][0] - curve[0][0]) // micro_batches(trace)
    if trace.interim and (len(curve) < NOISE_POINTS or span < INTERIM_STEPS):
        raise Skip(f"judged mid-run to stop it (fail_on), it waits for {NOISE_POINTS} observed "
                   f"steps with a loss over {INTERIM_STEPS} optimizer steps (healthy runs sit "
                   f"on a plateau for tens of steps first); so far {len(curve)} over {span}: "
                   "the run's report judges what it saw")
    third = len(curve) // 3
    first = median(loss for _, loss in curve[:third])
    last = median(loss for _, loss in curve[-third:])
    scale = abs(first) if first else 1.0
    change = (last - first) / scale
    losses = [loss for _, loss in curve]
    steady = change <= -t.min_steady_drop and trend_z(losses) <= t.steady_z
    fell = change <= -t.min_drop or early_fall(losses, third) >= t.min_drop
    noisy = single or noise_window(losses) > 1  # single batches' losses (see TL604)
    rose = change > t.min_drop and ((from_start and not noisy)
                                    or rise_beyond_noise(losses[:third], losses[-third:]))
    if rose or (from_start and not fell and not steady):
        stuck = moved = None
        if not rose:
            steps = curve[-1][0] - curve[0][0] + 1
            moved = weights_moved(trace, steps)
            if moved is not None and moved < t.min_movement:
                stuck = _stuck_at_chance(trace, first, last, moved, steps, t)
        # Stuck at chance with weights that barely move is told by the weights, not the noise.
        if not rose and stuck is None and (noisy or len(losses) >= NOISE_POINTS):
            blur = median_blur(losses[:third], losses[-third:])
            if first - last + blur >= t.min_drop * scale:
                raise Skip(
                    f"the observed losses are too noisy to tell a {t.min_drop:.0%} fall: the "
                    f"median of the first third of the {len(curve)} points is {first:.4g}, of "
                    f"the last {last:.4g}, and noise alone moves their difference by up to "
                    f"{blur / scale:.0%}; observe less often (a larger `every`: each point is "
                    f"then the mean loss of its window)")
        if not rose:
            if stuck is None and moved is not None and moved < t.min_movement:
                raise Skip(f"the loss barely fell ({change:+.1%}), but the weights moved only "
                           f"~{moved:.1%} of their norm over the run (the median update ratio "
                           f"per step times the steps): too little to expect it to fall yet "
                           f"(TL503 judges the learning rate)")
        trend = "rose" if rose else ("barely fell" if change < 0 else "did not fall")
        span = f"steps {curve[0][0]}-{curve[-1][0]}"
        points = f"the {len(curve)} observed steps"
        if trace.loss_tail is not None and curve[-1][0] == trace.loss_tail["step"] and \
                len(curve) > 1:
            points = (f"the {len(curve) - 1} observed steps and the window of "
                      f"{curve[-1][0] - curve[-2][0]} after them")
        message = (f"the loss {trend} over {span}: median {first:.4g} in the first third of "
                   f"{points}, {last:.4g} in the last ({change:+.1%}; it must fall by at "
                   f"least {t.min_drop:.0%})")
        fix = ("overfit one batch first; then check the learning rate (TL503), that every "
               "parameter gets a gradient and is in the optimizer (TL505, TL506), and that "
               "inputs and labels match")
        evidence = {"first_median": first, "last_median": last, "change": change,
                    "points": len(curve), "threshold": t.min_drop}
        if stuck is not None:
            message, fix = message + stuck[0], stuck[1]
            evidence.update(stuck[2])
        # Risen from a low it reached, yet still below half where the run started: it did go
        # down.
        start = median(losses[:EARLY_POINTS])
        if rose and from_start and start > 0 and last <= FELL_BELOW_START * start and \
                early_fall(losses, third) >= t.min_drop:
            yield Hit(module="", severity="info", evidence={**evidence, "start": start},
                      message=message + (f"; it stays below where the run started ({start:.4g}, "
                                         "the median of its first points): it fell, then "
                                         "rose"),
                      fix=("expected where the data or the loss change on purpose during the "
                           "run (a curriculum, a loss weight or KL-annealing schedule, moving "
                           "targets); otherwise the updates late in the run undo what was "
                           "learnt: decay the learning rate (TL503)"))
            return
        yield Hit(module="", message=message, fix=fix, evidence=evidence)


# The share of trainable weight matrices without a gradient (or with one of exactly 0) at
# which a loss stuck at chance is theirs, not the learning rate's (TL603).
GRADLESS_SHARE = 0.5


def _stuck_at_chance(trace: RunTrace, first: float, last: float, moved: float, steps: int,
                     t: Thresholds) -> Optional[tuple]:
    """``(message, fix, evidence)`` when a classifier's loss stays at ln(C) while its weights
    move less than ``t.stuck_rate`` of their norm a step: a learning rate too low to learn in
    the run (where TL503's measure is below ``t.stuck_floor``, TL503 says so), or, where half
    the trainable weights or more get no gradient (or one of exactly 0) and TL505 or TL501
    say where, those. None otherwise."""
    chance = chance_level(trace)
    rate = moved / max(steps, 1)
    # TL503's own measure (each weight's largest step, their median) below the floor: it
    # reports the learning rate itself. The mean step can sit below the floor while TL503's
    # measure does not (SGD with momentum at 1000x too low a rate: 1.0-1.1e-5 a step).
    largest = [r for _, r in judged_params(trace)]
    if not largest or median(largest) < t.stuck_floor:
        return None
    if chance is None or rate >= t.stuck_rate or \
            steps * t.typical_rate < t.min_movement or not all(
            abs(loss - chance[1]) <= t.chance_gap * chance[1] for loss in (first, last)):
        return None
    classes, level = chance
    message = (f"; it sits at ln({classes}) = {level:.4g}, an uninformed classifier's loss, "
               f"while the weights move only {rate:.2g} of their norm a step ({moved:.2%} over "
               f"the run; ~{t.typical_rate:g} is typical, threshold {t.stuck_rate:g}): the "
               f"learning rate is too low for the model to learn anything in this run")
    fix = (f"raise the learning rate, by about {nice_below(t.typical_rate / rate):g}x for "
           f"updates of ~{t.typical_rate:g} of the weights' norm a step (or shorten a warmup "
           f"that keeps it this low); then check that the loss falls")
    # Most of the judged weights without a gradient (or with one of exactly 0): they move by
    # weight decay alone, whatever the rate (an unused head beside weights that train is not
    # why the loss is stuck).
    weights = [p for p in trace.params if p.requires_grad and len(p.shape) >= 2]
    gradless = [p for p in weights if p.grad_steps == 0 or not p.grad_norm]
    cut = (firing(trace, ("TL505", "TL501"))
           if len(gradless) >= GRADLESS_SHARE * len(weights) else [])
    if cut:
        message = (f"; it sits at ln({classes}) = {level:.4g}, an uninformed classifier's "
                   f"loss, while the weights move only {rate:.2g} of their norm a step: the "
                   f"gradients do not reach them ({' and '.join(cut)})")
        fix = (f"fix what {' and '.join(cut)} report{'s' if len(cut) == 1 else ''} first: a "
               "weight without a gradient moves "
               "by weight decay alone, and no learning rate changes that")
    return message, fix, {"update_rate": rate, "chance_loss": level}


@rule("TL604", "loss-divergence", "error", rise_factor=3.0, settle_points=3,
      recovery=0.9, late_floor=0.5, unbounded=1000.0)
def loss_divergence(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """The loss rises sharply, falls without bound or becomes NaN/Inf.

    ## What it does
    Walks the loss of the observed steps (in a Monitor run: the mean and the maximum over
    each window between observations, and over the steps after the last one up to the
    report, so a NaN between two observations counts). It fires
    when the loss becomes NaN/Inf, or when it climbs above ``rise_factor`` × its running
    minimum and above its starting value (a noisy tail near zero is not a divergence), unless
    training got past the spike: at least ``settle_points`` points follow it and the last
    ``settle_points`` of the curve are all below ``recovery`` × the minimum before it. (A
    BatchNorm ResNet at SGD lr 0.1 without warmup, the usual CIFAR recipe, can spike 1.4 → 9
    in its first steps and be below 1.3 by step 19; an MLP that lr 1.5 knocked out settles at
    chance, ln C, which is no lower than its start.) A rise with fewer than ``settle_points``
    points after it (a 3-step check's last step, a Monitor's latest observations) cannot be
    told from such an overshoot yet: it fires only past ``rise_factor``² (a healthy pre-LN
    MLP at AdamW 1e-3 read 1.95, 1.05, 3.54 in a check, then 0.58; a rate 10x too high
    reads 1.6 -> 42). Where single points are noisy (a Monitor
    at ``every=1`` on small batches: one batch's loss, 0.05 to 2 around a level of 0.5), the
    points are the medians of :func:`noise_window` points in a row instead, so many that a
    median's noise is about 15% of its level: the lowest single batch loss is luck, not a
    level the loss reached. A classifier's first loss within 50% of ln(C) is its loss at
    init, a level whatever the batch: it starts the running minimum (a run that diverges at
    once, Adam at lr 0.3: 2.3 -> 728 at step 1, has no calm first median), and the mean of
    the same points above ``rise_factor`` × it fires too (spikes the median passes over: a
    Transformer LM at SGD lr 20 with most batches near ln(C) and one in three at 15×). For
    other losses, a median above ``rise_factor`` × exp(3 × the single points' relative noise)
    × the first step's loss does, where that noise is at most 50% (an MSE regression at Adam
    lr 0.3: 1.4 -> 3e6 at step 1; a batch-1 regression's first loss says nothing). When the
    Monitor joined later (see TL603),
    its first loss is one batch of a run already under way, not where training started, and
    the lowest of a converged run's batch losses is luck (they can span 50×: 0.006 to 0.3
    around a median of 0.06): the median of every ``settle_points`` points in a row must
    climb above ``rise_factor`` × the median of all the points before it (more points where
    they are noisy), and training got
    past it when the median of the last ``settle_points`` points is back under that (knocked
    out, a trained model's loss would sit at chance, far above). A classifier's level must
    also reach ``late_floor`` × ln(C) (0.5 x 2.30 for 10 classes): on a converged plateau at
    0.001-0.02, one hard batch is a 10× "rise" at 1% of chance, not a divergence. A Monitor
    run whose first classification loss is under half of ln(C) joined later too (its model
    was trained: plain SGD keeps no optimizer state to say so). When
    the loss is trainlint's synthetic one (a check with no ``loss_fn`` and no targets: half
    the mean of the squared outputs) only NaN/Inf counts: its level follows each batch's scale; so
    too when the loss competes with another network (a GAN: the loss runs through trainable
    tensors outside the model and its optimizer, or another Monitor's loss runs through this
    model): a generator's loss rises as its discriminator improves.

    A loss whose last level is below ``-unbounded`` × its start (its first level; at least 1
    in magnitude) and still fell 10-fold over the last third of its levels, or is below
    1e9 × its start, has no floor: it fires too (a VAE whose KL term is subtracted: 178 →
    -5.6e21 while the reconstruction error rose 68 → 4178). A likelihood that converges far
    below 0 (a summed Gaussian NLL: 4 → -7837, its variance clamped) levels off. A loss that
    swings below 0 by half its typical level or more (a policy gradient's with normalized
    advantages) has no floor at 0: its relative rises are not judged.

    ## Why is this bad?
    A diverging loss means the updates overshoot: the learning rate is too high (or warmup is
    missing), gradients spike, or a numerical problem produced NaN/Inf. Every step after it
    is wasted, and a NaN poisons the weights for good.

    ## Example
    ``SGD(params, lr=10)``: the loss goes 2.3 → 40 → NaN within a few steps.

    ## Fix
    Lower the learning rate (add warmup), clip gradients with
    ``torch.nn.utils.clip_grad_norm_``, and look for the origin of NaN/Inf (TL504).
    """
    curve = loss_curve(trace)
    if not curve:
        raise Skip(no_loss(trace))
    running = math.inf
    for s in loss_points(trace):
        values = [s[k] for k in ("loss", "loss_mean", "loss_max") if s.get(k) is not None]
        if any(not math.isfinite(v) for v in values):
            previous = "" if running == math.inf else f" (lowest before: {running:.4g})"
            # At the first step no update ran yet: the learning rate is not the cause.
            first = trace.at_start(s)
            yield Hit(
                module="",
                message=f"the loss became NaN/Inf by step {s['step']}{previous}",
                fix=("find the first NaN/Inf (TL504): at the first step, before any update, "
                     "the data, the init or the forward's own computation made it" if first
                     else "find the first NaN/Inf (TL504); lower the learning rate, clip "
                     "gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), "
                     "max_norm=1.0)); in float16 use a GradScaler or bfloat16"),
                evidence={"step": s["step"], "running_min": None if running == math.inf
                          else running},
            )
            return
        value = s.get("loss_mean", s.get("loss"))
        if value is not None:
            running = min(running, value)
    if trace.loss_kind == "synthetic" or trace.foreign_params or trace.adversarial or \
            trace.alternating:
        return  # (a competing loss: only NaN/Inf is judged, see _competing)
    signed = signed_loss(trace) is not None
    late = joined_later(trace, curve)
    losses = [loss for _, loss in curve]
    window = noise_window(losses)
    k = max(t.settle_points, window) if late else window
    if len(curve) < k:
        return
    ends, medians, means = _levels(losses, k)
    levels = [(curve[i][0], m) for i, m in zip(ends, medians)]
    start = levels[0][1]
    size = max(abs(curve[0][1]), abs(start), 1.0)
    fallen = _fallen_without_bound(levels, size, t.unbounded)
    if fallen is not None:
        of = f" (the median of the {k} points up to it)" if k > 1 else ""
        yield Hit(
            module="",
            message=(f"the loss falls without bound: {fallen[1]:.4g} at step {fallen[0]}{of}, "
                     f"below -{t.unbounded:g}× the size of its start ({size:.4g}): a loss "
                     "with a floor does not; a term enters with the wrong sign (a KL "
                     "divergence or a log-likelihood subtracted where it is added), or a "
                     "likelihood whose scale may shrink without limit"),
            fix=("check the sign of every term of the loss: a KL divergence is >= 0 and is "
                 "added, a negative log-likelihood is -log p; give a learned variance or "
                 "scale a floor (e.g. softplus(x) + 1e-3); NLLLoss takes log-probabilities "
                 "(log_softmax), never raw logits"),
            evidence={"step": fallen[0], "loss": fallen[1], "start": size,
                      "threshold": t.unbounded, "unbounded": True},
        )
        return
    if signed:  # no floor at 0: a rise relative to the level says nothing (see TL603)
        return
    chance = chance_level(trace)
    if late and chance is not None:  # a diverged classifier is back near chance
        start = max(start, t.late_floor * chance[1])
    # Late: the typical loss before each level's points (their median); else its running
    # minimum.
    typical = medians_before(losses) if late else None
    running = math.inf
    init = _init_loss(curve, chance) if k > 1 and not late else None
    if init is not None:
        start = running = init
    first = _first_loss(curve, t.rise_factor) if k > 1 and not late and init is None else None
    past = False  # inside a spike that training got past
    for i, (step, value) in enumerate(levels):
        if typical is not None:  # (the median of the points before this level's window)
            running = typical[ends[i] - (k - 1)]
        low = "typical loss before" if late else "running minimum"
        of = f" (the median of the {k} points up to it)" if k > 1 else ""
        reference, threshold, above = running, t.rise_factor, start
        spike = (running > 0 and running != math.inf and value > t.rise_factor * running
                 and value > start)
        if not spike:
            found = _from_first_loss(value, means[i], init, first, t.rise_factor)
            if found is not None:
                spike = True
                value, reference, threshold, low, averaged = found
                above = reference
                of = f" (the {'mean' if averaged else 'median'} of the {k} points up to it)"
        seen = curve if k == 1 or late else levels
        past = spike and (past or _got_past(seen, step, reference, t, late))
        if spike and not past and _too_soon(seen, step, t):
            # Too few points after it to tell an overshoot from a divergence.
            if value <= t.rise_factor ** 2 * reference:
                continue
            threshold = t.rise_factor ** 2
        if spike and not past:
            yield Hit(
                module="",
                message=(f"the loss diverges: {value:.4g} at step {step}{of}, "
                         f"{value / reference:.3g}× its {low} {reference:.4g} (threshold "
                         f"{threshold:.3g}×) and above its start {above:.4g}"),
                fix=(CARRIED_FIRST if trace.grads_carried else "") + (
                    "lower the learning rate (e.g. 10×) and add warmup; clip gradients with "
                    "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)"),
                evidence={"step": step, "loss": value, "running_min": reference,
                          "factor": value / reference, "threshold": threshold},
            )
            return
        if typical is None:
            running = min(running, value)


# TL604's fix where the gradients were never zeroed between steps (TL502): a lower rate or a
# clip does not help a sum that grows every step (SGD at lr/10 still diverged; clipped at 1.0 it
# stayed at chance; with zero_grad it reached accuracy 0.656).
CARRIED_FIRST = ("call optimizer.zero_grad() every step first (TL502: each step applies the "
                 "sum of every gradient so far); then, if it still diverges: ")


# The relative noise (standard deviation) a loss level may have before TL604 judges medians
# of several points instead of single points: levels three such deviations low and high are
# still 2.6x apart, short of a 3x rise.
LEVEL_NOISE = 0.15
# Fewer points than this tell too little of their noise (a short climb reads as noise).
NOISE_POINTS = 20
# A classifier's first loss within this fraction of ln(C) is its loss at init (TL604).
INIT_NEAR_CHANCE = 0.5
# Where single points are off by more than this (relative), the first point is no reference
# (TL604): one batch of a batch-1 regression (chi-square, one degree) is below 1/100 of the
# mean loss about once in 12 runs.
FIRST_NOISE = 0.5


def _fallen_without_bound(levels: list, size: float, unbounded: float) -> Optional[tuple]:
    """The last ``(step, level)`` where it is below ``-unbounded`` x ``size`` and either still
    fell ``STILL_FALLING``-fold over the last third of the levels or is ``FAR_BELOW`` x
    ``size`` below 0 (a likelihood that converges far below 0, a summed Gaussian NLL, levels
    off), else None."""
    if len(levels) < 3:
        return None
    step, last = levels[-1]
    earlier = levels[len(levels) - 1 - max(1, len(levels) // 3)][1]
    if last < -unbounded * size and (last < STILL_FALLING * min(earlier, -size)
                                     or last < -FAR_BELOW * size):
        return step, last
    return None


def noise_window(losses: list) -> int:
    """How many points in a row TL604 takes the median of, so that the median's relative
    noise is about :data:`LEVEL_NOISE`: 1 for a quiet curve (a Monitor's means over its
    windows, a check's few steps); more where each point is one small batch's loss (a Monitor
    at ``every=1``, batch 16: single losses spread from 0.05 to 2 around 0.5, and the running
    minimum of single points is luck). The per-point noise is estimated robustly from the
    second differences (a steady trend does not move them; a spike moves few of them), in
    each third of the curve, and the noisiest third counts (near chance a loss is quieter
    than once it has fallen); at most a third of the points."""
    n = len(losses)
    if n < NOISE_POINTS:
        return 1
    noise = max(_noise_by_thirds(losses))
    if noise <= LEVEL_NOISE:
        return 1
    wanted = math.ceil((1.2533 * noise / LEVEL_NOISE) ** 2)  # a median of w: 1.2533 / sqrt(w)
    return max(1, min(wanted, n // 3))


def _levels(losses: list, k: int) -> tuple:
    """``(ends, medians, means)`` of the windows of ``k`` points in a row of ``losses`` that
    end at ``ends``: every point for small windows; for larger ones every ``k // 4`` points
    and the last (a level moves little within a window: O(n) values, however long the
    run)."""
    n = len(losses)
    stride = max(1, k // 4)
    ends = list(range(k - 1, n, stride))
    if ends[-1] != n - 1:
        ends.append(n - 1)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(losses, dtype=np.float64),
                                                       k)[np.asarray(ends) - (k - 1)]
    return ends, np.median(windows, axis=1).tolist(), windows.mean(axis=1).tolist()


def _from_first_loss(median_level: float, mean_level: float, init: Optional[float],
                     first: Optional[tuple], rise_factor: float) -> Optional[tuple]:
    """``(level, reference, threshold, what the reference is, whether the level is the
    mean)`` when a noisy curve's level diverged from where the run started, else None: a
    classifier's mean above ``rise_factor`` × its loss at init (spikes the median passes over:
    a Transformer LM at SGD lr 20, batches at ln(C) and at 15x it), or a median above
    :func:`_first_loss`'s factor × the first loss (an MSE regression at Adam lr 0.3: 1.4 ->
    3e6 at step 1, levels near 1e3 after)."""
    if init is not None and mean_level > rise_factor * init:
        return mean_level, init, rise_factor, "loss at init", True
    if first is not None and median_level > first[1] * first[0] and median_level > first[0]:
        return median_level, first[0], first[1], "first loss", False
    return None


def _first_loss(curve: list, rise_factor: float) -> Optional[tuple]:
    """``(first loss, factor)``: a level of a noisy curve more than ``factor`` × its first
    loss diverged, the factor being ``rise_factor`` widened by how low three deviations of
    the quietest third's noise could have put that first batch; None where single points
    are noisier than ``FIRST_NOISE`` (a lucky first batch says nothing) or the first loss is
    not above 0."""
    noise = min(_noise_by_thirds([v for _, v in curve]))
    if noise > FIRST_NOISE or not curve[0][1] > 0:
        return None
    return curve[0][1], rise_factor * math.exp(3.0 * noise)


def _init_loss(curve: list, chance: Optional[tuple]) -> Optional[float]:
    """A classifier's first loss when it sits within ``INIT_NEAR_CHANCE`` of ln(C): its loss at
    init, which is near ln(C) whatever the batch (a level, not luck); else None."""
    if chance is None or abs(curve[0][1] - chance[1]) > INIT_NEAR_CHANCE * chance[1]:
        return None
    return curve[0][1]


def _noise_by_thirds(losses: list) -> list:
    """:func:`_relative_noise` of each third of ``losses``."""
    return [_relative_noise(part) for part in np.array_split(np.asarray(losses), 3)]


def _relative_noise(losses: np.ndarray) -> float:
    """The standard deviation of single points about their local trend, relative to their
    median level (1.4826 times the median absolute second difference, over sqrt(6)); 0 for a
    level of 0."""
    level = float(np.median(np.abs(losses)))
    if not level > 0:
        return 0.0
    bends = np.abs(np.diff(losses.astype(np.float64), 2))
    return 1.4826 * float(np.median(bends)) / math.sqrt(6.0) / level


def medians_before(values: list) -> list:
    """Per position ``i``, the median of ``values[:i]`` (inf for none), in O(n log n): two
    heaps, the lower half (negated) and the upper half."""
    lower: list = []
    upper: list = []
    out = []
    for value in values:
        if not lower:
            out.append(math.inf)
        elif len(lower) > len(upper):
            out.append(-lower[0])
        else:
            out.append((-lower[0] + upper[0]) / 2.0)
        if lower and value > -lower[0]:
            heapq.heappush(upper, value)
        else:
            heapq.heappush(lower, -value)
        if len(lower) > len(upper) + 1:
            heapq.heappush(upper, -heapq.heappop(lower))
        elif len(upper) > len(lower):
            heapq.heappush(lower, -heapq.heappop(upper))
    return out


def _too_soon(curve: list, step: int, t: Thresholds) -> bool:
    """Whether fewer than ``settle_points`` points of ``curve`` follow ``step``: a rise there
    cannot yet be told from an overshoot that the next steps take back (a 3-step check of a
    healthy pre-LN MLP at AdamW 1e-3: 1.95, 1.05, 3.54, then 0.58; at SGD 0.1 without warmup a
    BatchNorm ResNet: 1.4 -> 9, below 1.3 by step 19); only one past ``rise_factor``² is
    judged there (a rate 10x too high: 1.6 -> 42 at step 2)."""
    return sum(1 for at, _ in curve if at > step) < t.settle_points


def _got_past(curve: list, step: int, reference: float, t: Thresholds, late: bool) -> bool:
    """Whether training got past a spike at ``step`` above ``reference`` (the running
    minimum; joined later, the typical loss before): at least ``settle_points`` points of
    ``curve`` follow it, and the last ``settle_points`` are all below ``recovery`` ×
    ``reference`` (from the start: learning went on past it), or, when the Monitor joined
    later, their median is back under ``rise_factor`` × ``reference`` (a bump on a trained
    plateau; knocked out, the loss would sit at chance, far above)."""
    after = [loss for at, loss in curve if at > step]
    if len(after) < t.settle_points:
        return False
    last = after[-t.settle_points:]
    if late:
        return median(last) < t.rise_factor * reference
    return all(loss < t.recovery * reference for loss in last)
