"""TL603 loss-not-decreasing and TL604 loss-divergence on hand-built traces."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from trainlint.rules import gradients, run

from tests.rules.tracekit import defaults, hits, param, steps, trace
from trainlint.engine import RULES, Skip

NAN = float("nan")


def _monitor(*losses, first=0, key="loss_mean"):
    return trace([], mode="monitor", per_step=steps(*losses, first=first, every=50, key=key))


def _curve(first_level: float, last_level: float, n: int = 9) -> list:
    third = n // 3
    return [first_level] * third + [(first_level + last_level) / 2] * (n - 2 * third) + \
        [last_level] * third


def _noisy(first_level: float, last_level: float) -> list:
    """Thirds with these medians whose values interleave (no steady trend)."""
    f, m, last = first_level, (first_level + last_level) / 2, last_level
    return [f, f - 0.1, f + 0.1, m + 0.05, m - 0.05, m, last, last - 0.1, last + 0.2]


@pytest.mark.parametrize("factor, fires", [(1.02, False), (0.98, True)])
def test_tl603_from_the_start_the_loss_must_fall(factor, fires):
    drop = defaults("TL603")["min_drop"]
    last = 2.0 * (1 - factor * drop)
    found = hits("TL603", _monitor(*_noisy(2.0, last)))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["change"] == pytest.approx(-factor * drop)


@pytest.mark.parametrize("factor, fires", [(1.02, False), (0.98, True)])
def test_tl603_a_steady_slow_fall_is_learning(factor, fires):
    """A transformer's first steps (a warmup): the loss falls at every step, by less than
    min_drop in all. It is not stuck, down to min_steady_drop (below it: lr=1e-7)."""
    steady = defaults("TL603")["min_steady_drop"]
    # 20 points, thirds of 6: their medians sit at points 2.5 and 16.5, 14 steps apart
    losses = [2.0 * (1 - factor * steady * i / 14) for i in range(20)]
    found = hits("TL603", _monitor(*losses))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["change"] == pytest.approx(-factor * steady, rel=1e-2)


def _converged(start: float, end: float = 1.0, wobble: float = 0.01, n: int = 30) -> list:
    """Three points at ``start``, then a plateau at ``end`` that wobbles by +-``wobble`` (the
    last third's robust sigma is 1.4826 * wobble)."""
    return [start] * 3 + [end + (wobble if i % 2 else -wobble) for i in range(n - 3)]


def test_tl603_a_run_that_learned_early_and_converged_fell():
    """Observed every 100 steps, the loss fell from 2.3 to 0.3 by the second point: the first
    third's median is plateau already, yet the run learned."""
    assert hits("TL603", _monitor(*_converged(2.3, 0.3, 0.003))) == []
    assert hits("TL603", _monitor(*[2.3, 0.8] + [0.3 + 0.003 * (-1) ** i for i in range(40)])) == []


@pytest.mark.parametrize("factor, fell", [(0.98, False), (1.02, True)])
def test_tl603_an_early_fall_must_clear_the_noise(factor, fell):
    """An early fall within three standard errors of the noise is no fall; with noise that
    large (3 standard errors far above min_drop), nor can a barely-falling loss be told from
    one that fell: not judged."""
    wobble = 0.05  # 3 standard errors of it are far above min_drop: the noise decides
    sigma = 1.4826 * wobble
    error = 1.2533 * sigma * math.sqrt(1 / run.EARLY_POINTS + 1 / 10)
    start = 1.0 + factor * run.EARLY_SIGMAS * error
    assert (start - 1.0) / start > 2 * defaults("TL603")["min_drop"]
    curve = _monitor(*_converged(start, 1.0, wobble))
    if fell:
        assert hits("TL603", curve) == []
    else:
        with pytest.raises(Skip, match="too noisy to tell a 5% fall"):
            hits("TL603", curve)


@pytest.mark.parametrize("factor, judged", [(0.98, True), (1.02, False)])
def test_tl603_window_means_too_noisy_to_tell_a_fall_are_not_judged(factor, judged):
    """Batch 2 at every=5 (each point the mean of 10 samples): a healthy MLP whose loss on the
    whole training set fell 2.301 -> 2.058 (-10.6%) read -3.0% between the thirds' medians of
    its 31 window means, the last third's spread 0.21, and got 'barely fell' (measured). With
    20 points or more, a loss that did not fall by ``min_drop`` is judged only where noise
    alone (three standard errors of the medians' difference) cannot make up the rest."""
    drop = defaults("TL603")["min_drop"]
    edge = drop * 2.0 / (run.EARLY_SIGMAS * 1.2533 * 1.4826 * math.sqrt(2 / 10))
    wobble = factor * edge
    flat = _monitor(*[2.0 + (wobble if i % 2 else -wobble) for i in range(30)])
    if judged:
        assert hits("TL603", flat)
    else:
        with pytest.raises(Skip, match="too noisy to tell a 5% fall"):
            hits("TL603", flat)


@pytest.mark.parametrize("factor, fires", [(0.98, True), (1.02, False)])
def test_tl603_an_early_fall_must_clear_min_drop(factor, fires):
    drop = defaults("TL603")["min_drop"]
    start = 1.0 / (1 - factor * drop)  # (start - end) / start = factor * drop
    assert bool(hits("TL603", _monitor(*_converged(start, 1.0, 1e-4)))) is fires


@pytest.mark.parametrize("factor, judged", [(0.98, False), (1.02, True)])
def test_tl603_judges_a_barely_falling_loss_once_the_weights_moved(factor, judged):
    """A fine-tuning run's first steps (lr 2e-5: ~1e-3 of the weights a step) barely change
    the loss; it is judged once the weights moved min_movement of their norm."""
    t = defaults("TL603")
    losses = _noisy(2.0, 2.0 * (1 - 0.5 * t["min_drop"]))
    steps_run = 50 * (len(losses) - 1) + 1  # every=50
    per_step = factor * t["min_movement"] / steps_run
    params = [param(f"l{i}.weight", (4, 4), ratios=(per_step,) * 3) for i in range(3)]
    run = trace([], mode="monitor", params=params,
                per_step=steps(*losses, every=50, key="loss_mean"))
    if judged:
        assert hits("TL603", run)
    else:
        with pytest.raises(Skip, match="moved only"):
            hits("TL603", run)
    rising = trace([], mode="monitor", params=params,  # a rise is judged whatever moved
                   per_step=steps(*_noisy(2.0, 2.0 * (1 + 2 * t["min_drop"])), every=50,
                                  key="loss_mean"))
    assert hits("TL603", rising)


def _slow_classifier(level: float, rate: float, classes: int = 10, every: int = 50):
    """A Monitor run (9 observed steps) of a classifier whose loss stays at ``level`` while
    its weights move ``rate`` of their norm a step."""
    params = [param(f"l{i}.weight", (4, 4), ratios=(rate,) * 3) for i in range(3)]
    return _classifier(trace([], mode="monitor", params=params,
                             per_step=steps(*[level] * 9, every=every, key="loss_mean")), classes)


def test_tl603_a_run_too_short_to_expect_learning_is_not_stuck():
    """At ln(C) with weights moving half of stuck_rate a step: judged once the run is long
    enough that a typical rate would have moved the weights min_movement."""
    t = defaults("TL603")
    needed = t["min_movement"] / t["typical_rate"]  # steps
    short, long = math.floor((needed - 1) / 8), math.ceil((needed - 1) / 8)  # 8 * every + 1
    assert 8 * short + 1 < needed <= 8 * long + 1
    with pytest.raises(Skip, match="moved only"):
        hits("TL603", _slow_classifier(math.log(10), 0.5 * t["stuck_rate"], every=short))
    assert hits("TL603", _slow_classifier(math.log(10), 0.5 * t["stuck_rate"], every=long))


@pytest.mark.parametrize("gap, rate, fires", [
    (0.0, ("stuck_rate", 0.98), True), (0.0, ("stuck_rate", 1.02), False),  # the update rate
    (0.0, ("stuck_floor", 1.02), True), (0.0, ("stuck_floor", 0.98), False),  # TL503's below
    (0.98, ("stuck_rate", 0.5), True), (1.02, ("stuck_rate", 0.5), False),  # the gap to ln(C)
    (-0.98, ("stuck_rate", 0.5), True), (-1.02, ("stuck_rate", 0.5), False),
])
def test_tl603_a_loss_stuck_at_chance_with_weights_that_barely_move_is_reported(gap, rate,
                                                                                fires):
    """SGD at lr 2e-4 on an MLP: the loss sits at ln(10) for 400 steps while the weights move
    1.1e-5 of their norm a step, inside TL503's band: too slow to learn in the run. Off ln(C),
    or at a rate that only needs more steps (a fine-tune's first ones), it is not judged."""
    t = defaults("TL603")
    level = math.log(10) * (1 + gap * t["chance_gap"])
    per_step = rate[1] * t[rate[0]]
    run = _slow_classifier(level, per_step)
    if not fires:
        with pytest.raises(Skip, match="moved only"):
            hits("TL603", run)
        return
    [found] = hits("TL603", run)
    assert "ln(10) = 2.303, an uninformed classifier's loss" in found.message
    assert found.message.startswith("the loss did not fall")
    assert found.evidence["update_rate"] == pytest.approx(per_step)
    assert f"by about {gradients.nice_below(t['typical_rate'] / per_step):g}x" in found.fix


@pytest.mark.parametrize("gradless, cut", [(0, False), (2, False), (3, True)])
def test_tl603_stuck_at_chance_with_weights_without_a_gradient_names_that(gradless, cut):
    """A ControlNet whose zero conv was frozen: the branch's weights got no gradient and moved
    3e-5 a step, AdamW's weight decay (lr 3e-3 x wd 0.01); TL603 said to raise the rate 20x,
    and at 10x and 100x the loss stayed at ln(10) (measured). Where half the trainable weights
    or more get no gradient, and TL505 (or TL501) says where, the fix is theirs; an unused
    head beside weights that train is not why the loss is stuck (a rate too low, measured:
    removing the head left the loss at 2.308, raising the rate reached 2.19)."""
    slow = _slow_classifier(math.log(10), 0.5 * defaults("TL603")["stuck_rate"])
    slow.params += [param(f"branch{i}.weight", (4, 4), grad_norm=None, grad_steps=0)
                    for i in range(gradless)]  # 3 weights that train beside them
    slow.observed_steps = 9
    assert (gradless >= run.GRADLESS_SHARE * (gradless + 3)) is cut  # 3 of 6: at the share
    [found] = hits("TL603", slow)
    assert ("raise the learning rate" in found.fix) is not cut
    assert ("fix what TL505 reports first" in found.fix) is cut
    assert ("the gradients do not reach them (TL505)" in found.message) is cut


def test_tl603_a_loss_stuck_at_chance_is_told_by_the_weights_however_noisy_the_points():
    """SGD at lr 2e-4, every=5, batch 2: window means too noisy to tell a 5% fall, yet the
    loss sat at ln(10) while the weights barely moved (the training-set loss 2.3116 ->
    2.3105; 20x the rate fell to 2.2917; measured). The weights tell it, not the noise."""
    t = defaults("TL603")
    wobble = 0.1  # three standard errors of it are far above 5% of ln(10)
    levels = [math.log(10) + (wobble if i % 2 else -wobble) for i in range(30)]
    params = [param(f"l{i}.weight", (4, 4), ratios=(0.5 * t["stuck_rate"],) * 3)
              for i in range(3)]
    run = _classifier(trace([], mode="monitor", params=params,
                            per_step=steps(*levels, every=50, key="loss_mean")), 10)
    [found] = hits("TL603", run)
    assert "an uninformed classifier's loss" in found.message
    assert "raise the learning rate" in found.fix


@pytest.mark.parametrize("last, fires", [(1.1, True), (0.95, False)])
def test_tl603_stuck_at_chance_defers_only_to_what_tl503_reports(last, fires):
    """SGD with momentum at 1000x too low a rate on a wide ResNet: 1.0-1.1e-5 a step, the mean
    below TL503's floor, each weight's largest step (TL503's measure) above it, so TL503 is
    silent: TL603 must report the loss stuck at ln(C). With every step below the floor TL503
    reports the rate and TL603 leaves it."""
    t = defaults("TL603")
    floor = t["stuck_floor"]
    ratios = (0.9 * floor, 0.9 * floor, last * floor)
    assert sum(ratios) / 3 < floor
    params = [param(f"l{i}.weight", (4, 4), ratios=ratios) for i in range(3)]
    run = _classifier(trace([], mode="monitor", params=params,
                            per_step=steps(*[math.log(10)] * 9, every=50, key="loss_mean")), 10)
    assert bool(hits("TL503", run)) is not fires
    if fires:
        [found] = hits("TL603", run)
        assert "the learning rate is too low for the model to learn" in found.message
    else:
        with pytest.raises(Skip, match="moved only"):
            hits("TL603", run)


@pytest.mark.parametrize("start, end", [(1.014, 1.0), (1.0, 0.98)])
def test_tl603_a_classifiers_steady_fall_near_chance_is_learning(start, end):
    """A 1000-class classifier's first 240 steps at a constant AdamW rate (6.908 -> 6.81, then
    5.07 by step 1440), a 3-class task whose best possible loss is 1.073 against ln 3 = 1.099:
    a slow, steady fall that stays near ln(C) is learning. (A post-LN transformer collapsed
    at chance settles there the same way; nothing in the loss or the layers' gradients told
    the two apart, so it is not judged.)"""
    level = math.log(1000)
    losses = [level * (start + (end - start) * i / 19) for i in range(20)]
    params = [param(f"l{i}.weight", (4, 4), ratios=(0.05,) * 12) for i in range(3)]
    t = _classifier(trace([], mode="monitor", params=params,
                          per_step=steps(*losses, every=10, key="loss_mean")), 1000)
    assert hits("TL603", t) == []


def test_tl603_a_fall_within_the_noise_is_no_steady_fall():
    assert hits("TL603", _monitor(*_noisy(2.0, 2.0 * (1 - 0.04))))


@pytest.mark.parametrize("factor, fires", [(0.98, False), (1.02, True)])
def test_tl603_joined_later_only_a_rise_counts(factor, fires):
    drop = defaults("TL603")["min_drop"]
    curve = _curve(1.0, 1.0 * (1 + factor * drop))
    assert bool(hits("TL603", _monitor(*curve, first=500))) is fires
    assert hits("TL603", _monitor(*_curve(1.0, 1.0), first=500)) == []


@pytest.mark.parametrize("spread, fires", [(0.4, False), (0.004, True)])
def test_tl603_joined_later_a_rise_must_clear_the_noise(spread, fires):
    """A third's median on a converged plateau moves with its heavy-tailed batches: a 10%
    rise counts only beyond three standard errors of that noise."""
    drop = defaults("TL603")["min_drop"]
    shape = [0.0, -1.0, 1.0, -0.5, 0.5, 0.0]
    first = [1.0 + spread * d for d in shape]
    last = [1.0 + 2 * drop + spread * d for d in shape]
    found = hits("TL603", _monitor(*first, *[1.0 + drop] * 6, *last, first=500))
    assert bool(found) is fires


@pytest.mark.parametrize("resumed, fires", [(False, True), (True, False)])
def test_tl603_a_monitor_created_mid_training_joined_later(resumed, fires):
    """Its steps count from its creation (step 0), but an optimizer that already held state
    says training had begun (a resumed checkpoint): a flat loss is no finding then."""
    t = _monitor(*_curve(1.0, 1.0))
    t.resumed = resumed
    assert bool(hits("TL603", t)) is fires


def test_tl603_robust_to_one_noisy_window():
    curve = _curve(2.0, 1.0)
    curve[-1] = 5.0
    assert hits("TL603", _monitor(*curve)) == []


def test_tl603_needs_a_monitor_run_and_enough_points():
    points = defaults("TL603")["min_points"]
    with pytest.raises(Skip):
        hits("TL603", trace([], mode="check", per_step=steps(2.0, 2.0, 2.0)))
    with pytest.raises(Skip):
        hits("TL603", _monitor(*[2.0] * (points - 1)))
    assert hits("TL603", _monitor(*[2.0] * points))


def test_tl603_does_not_judge_a_loss_that_runs_through_another_network():
    rising = _curve(0.7, 1.5)
    assert hits("TL603", _monitor(*rising))
    adversarial = trace([], mode="monitor", per_step=steps(*rising, every=50, key="loss_mean"),
                        foreign_params=6)
    with pytest.raises(Skip, match="6 trainable tensor.*outside the model.*compete"):
        hits("TL603", adversarial)


def test_tl603_does_not_judge_a_gan_discriminators_loss():
    rising = _curve(0.7, 1.5)
    adversarial = trace([], mode="monitor", per_step=steps(*rising, every=50, key="loss_mean"),
                        adversarial=True)
    with pytest.raises(Skip, match="another Monitor's loss runs through this model"):
        hits("TL603", adversarial)


@pytest.mark.parametrize("competing", [{"foreign_params": 6}, {"adversarial": True}])
def test_tl604_judges_only_nan_in_a_loss_that_competes_with_another_network(competing):
    """A GAN generator's loss climbs as its discriminator improves (DCGAN: 1.29 -> 3.9 over 50
    steps), and the discriminator's swings from 0.015 to 2 when the generator fools it."""
    top = 1.3 * (defaults("TL604")["rise_factor"] + 0.3)  # above the threshold
    climbing = [1.3, 1.3, 2.0, 0.9 * top, 2.5, top, top, top, top]
    assert hits("TL604", _monitor(*climbing))
    gan = trace([], mode="monitor", per_step=steps(*climbing, every=50, key="loss_mean"),
                **competing)
    assert hits("TL604", gan) == []
    broken = trace([], mode="monitor", per_step=steps(1.3, 1.3, NAN, every=50,
                                                      key="loss_mean"), **competing)
    assert [h.message for h in hits("TL604", broken)] == [
        "the loss became NaN/Inf by step 100 (lowest before: 1.3)"]


@pytest.mark.parametrize("first", [0, 50])
def test_tl604_a_nan_loss_at_the_first_step_is_not_the_learning_rates(first):
    """No update ran before step 0: the fix points at TL504 without the learning rate."""
    [found] = hits("TL604", _monitor(*([1.3] * (first // 50)), NAN))
    assert found.message.startswith(f"the loss became NaN/Inf by step {first}")
    assert ("learning rate" in found.fix) is (first > 0)


def test_tl603_says_when_every_observed_loss_is_nonfinite():
    with pytest.raises(Skip, match="none of the 3 observed losses is finite.*TL604"):
        hits("TL603", _monitor(NAN, NAN, float("inf")))
    with pytest.raises(Skip, match="no loss was observed"):
        hits("TL603", trace([], mode="monitor", per_step=[{"step": 0, "layers": {}}]))


@pytest.mark.parametrize("factor, fires", [(0.99, False), (1.01, True)])
def test_tl604_rise_over_the_running_minimum(factor, fires):
    """A rise past ``rise_factor`` that the points after it do not take back."""
    t = defaults("TL604")
    high = factor * t["rise_factor"] * 1.0
    losses = (2.0, 1.0, high, *[high] * t["settle_points"])
    found = hits("TL604", trace([], per_step=steps(*losses)))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["step"] == 2
        assert found[0].evidence["running_min"] == 1.0
        assert found[0].evidence["threshold"] == t["rise_factor"]


@pytest.mark.parametrize("factor, fires", [(0.99, False), (1.01, True)])
def test_tl604_a_rise_too_late_to_tell_must_pass_rise_factor_squared(factor, fires):
    """With fewer than ``settle_points`` points after it (a 3-step check) a rise may be an
    overshoot the next steps take back (measured: a healthy pre-LN MLP at AdamW 1e-3, 1.95,
    1.05, 3.54, then 0.58): only one past ``rise_factor``² is judged there."""
    t = defaults("TL604")
    losses = (2.0, 1.0, factor * t["rise_factor"] ** 2)
    found = hits("TL604", trace([], per_step=steps(*losses)))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["step"] == 2
        assert found[0].evidence["threshold"] == t["rise_factor"] ** 2


@pytest.mark.parametrize("below, after, spike, fires", [
    (0.99, 0, 2, False),  # the last settle_points points all under recovery x the minimum
    (1.01, 0, 2, True),   # one of them just above it
    (0.99, -1, 2, False),  # too few points after the spike to tell, and under rise_factor²
    (0.99, -1, 4, True),  # too few to tell, but past rise_factor²
])
def test_tl604_forgives_a_spike_that_training_got_past(below, after, spike, fires):
    """A spike followed by at least ``settle_points`` points, the last ``settle_points`` of
    them all below ``recovery`` x the minimum before it, is not a divergence."""
    t = defaults("TL604")
    low = 1.0
    settled = [t["recovery"] * low * 0.5] * (t["settle_points"] - 1) + \
        [t["recovery"] * low * below]
    losses = [2.0, low, spike * t["rise_factor"] * low] + settled[:len(settled) + after]
    found = hits("TL604", trace([], per_step=steps(*losses)))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["step"] == 2


def test_tl604_a_loss_that_settles_back_at_its_old_level_still_diverged():
    """lr 1.5 knocks an MLP out: the loss spikes, then sits at chance (ln 4), where it began:
    training never got past the spike."""
    t = defaults("TL604")
    losses = [1.49, 1.33, 6.1, 3.1, 1.54, 1.66, 1.59, 1.55, 1.47]
    [found] = hits("TL604", trace([], mode="monitor", per_step=steps(*losses, key="loss_mean")))
    assert found.evidence["step"] == 2 and found.evidence["threshold"] == t["rise_factor"]


def _joined(*losses):
    """A Monitor run created on a resumed checkpoint: one point per step."""
    return trace([], mode="monitor", resumed=True, per_step=steps(*losses, key="loss_mean"))


def test_tl604_joined_later_a_converged_runs_lucky_batches_are_no_baseline():
    """Its first loss (one lucky batch, 0.01) and a lucky streak sit far below the typical
    0.06: judged from the start, 0.06 would be 6x the running minimum."""
    plateau = [0.01, 0.06, 0.08, 0.05, 0.07, 0.02, 0.02, 0.03, 0.06, 0.07, 0.12, 0.11, 0.13,
               0.06, 0.07, 0.05, 0.08]
    assert hits("TL604", trace([], mode="monitor", per_step=steps(*plateau, key="loss_mean")))
    assert hits("TL604", _joined(*plateau)) == []


@pytest.mark.parametrize("factor, fires", [(0.99, False), (1.01, True)])
def test_tl604_joined_later_the_median_of_settle_points_must_climb(factor, fires):
    t = defaults("TL604")
    k = t["settle_points"]
    high = factor * t["rise_factor"] * 1.0
    found = hits("TL604", _joined(*[1.0] * 6, *[high] * (2 * k)))  # (seen to stay there)
    assert bool(found) is fires
    if fires:  # the first window whose median is high: its last point
        assert found[0].evidence["step"] == 6 + k // 2
        assert found[0].evidence["running_min"] == 1.0


def test_tl604_joined_later_a_real_divergence_fires_at_once():
    """At the first level past rise_factor² x the typical loss before (0.5 is 8x 0.06, with
    two points after it: too soon to tell; 2.0 is 33x)."""
    found = hits("TL604", _joined(0.06, 0.05, 0.07, 0.06, 0.05, 0.07, 0.5, 2.0, 6.0, 9.0))
    assert found and found[0].evidence["step"] == 8 and found[0].evidence["loss"] == 2.0


@pytest.mark.parametrize("plateau, after, fires", [(1.0, 1.0, False), (0.1, 2.3, True)])
def test_tl604_joined_later_a_bump_back_to_the_plateau_is_forgiven(plateau, after, fires):
    """Back at the plateau's level training got past it; at chance (ln 10) the model was
    knocked out."""
    k = defaults("TL604")["settle_points"]
    found = hits("TL604", _joined(*[plateau] * 6, *[5.0] * k, *[after] * k))
    assert bool(found) is fires


def _classifier(t, classes=10):
    t.loss_kind, t.num_classes, t.loss_reduction = "cross_entropy", classes, "mean"
    return t


@pytest.mark.parametrize("factor, fires", [(0.99, False), (1.01, True)])
def test_tl604_joined_later_a_classifier_must_climb_to_late_floor_of_chance(factor, fires):
    """On a converged plateau at 0.002, a median of 0.02 is 10x the typical loss at 1% of
    ln(10): no divergence. The level must also reach late_floor x ln(C)."""
    t = defaults("TL604")
    high = factor * t["late_floor"] * math.log(10)
    found = hits("TL604", _classifier(_joined(*[0.002] * 6, *[high] * t["settle_points"])))
    assert bool(found) is fires
    assert hits("TL604", _joined(*[0.002] * 6, *[0.02] * t["settle_points"]))  # no chance known


@pytest.mark.parametrize("factor, late", [(0.99, True), (1.01, False)])
def test_a_monitor_whose_first_classification_loss_is_far_below_chance_joined_later(factor,
                                                                                    late):
    """Plain SGD keeps no optimizer state: a model that starts under half of ln(C) was
    trained before. Flat from there is no finding; flat from near chance is TL603's."""
    first = factor * run.TRAINED_BELOW * math.log(10)
    flat = _classifier(_monitor(*[first] * 9))
    assert run.joined_later(flat, [(0, first)]) is late
    assert bool(hits("TL603", flat)) is not late


def test_tl604_a_noisy_tail_below_the_start_is_not_divergence():
    rise = defaults("TL604")["rise_factor"]
    assert hits("TL604", trace([], per_step=steps(2.0, 0.01, 0.01 * rise * 2))) == []


def test_tl604_nonfinite_loss_fires():
    found = hits("TL604", trace([], per_step=steps(2.0, 1.5, NAN)))
    assert found and found[0].evidence["step"] == 2


def test_tl604_nan_between_two_monitor_observations_counts():
    per_step = steps(2.0, 1.5, 1.2, key="loss_mean")
    per_step[1]["loss_max"] = float("inf")
    found = hits("TL604", trace([], mode="monitor", per_step=per_step))
    assert found and found[0].evidence["step"] == per_step[1]["step"]


def test_tl604_judges_trainlints_synthetic_loss_by_nan_only():
    """The synthetic loss of a check without targets (the mean of the squared outputs) follows
    each batch's scale: a rise past the factor is no divergence, a NaN still is."""
    rise = defaults("TL604")["rise_factor"]
    rising = trace([], per_step=steps(1.0, 1.0, 2 * rise, 2 * rise, 2 * rise, 2 * rise))
    assert hits("TL604", rising)
    rising.loss_kind = "synthetic"
    assert hits("TL604", rising) == []
    broken = trace([], per_step=steps(1.0, 2 * rise, NAN))
    broken.loss_kind = "synthetic"
    [nan] = hits("TL604", broken)
    assert nan.evidence["step"] == 2


def test_tl604_without_losses_is_a_note():
    with pytest.raises(Skip):
        hits("TL604", trace([], mode="monitor", per_step=[{"step": 0, "layers": {}}]))


def test_the_losses_after_the_last_observed_step_count():
    """report() between observations: a loss that became NaN since, or fell since, is read
    from the Monitor's window after the last observed step; a tail at or before it is not."""
    healthy = _monitor(*[2.0] * 9)
    assert hits("TL604", healthy) == []
    last = healthy.per_step[-1]["step"]
    healthy.loss_tail = {"step": last + 30, "loss_mean": NAN, "loss_max": NAN}
    [nan] = hits("TL604", healthy)
    assert nan.evidence["step"] == last + 30
    healthy.loss_tail["step"] = last  # already the last observed step's
    assert hits("TL604", healthy) == []
    drop = defaults("TL603")["min_drop"]
    stuck = _monitor(*_noisy(2.0, 2.0 * (1 - 0.5 * drop)))
    assert hits("TL603", stuck)
    stuck.loss_tail = {"step": stuck.per_step[-1]["step"] + 40,
                       "loss_mean": 2.0 * (1 - 3 * drop), "loss_max": 2.0}
    assert run.loss_curve(stuck)[-1] == (stuck.loss_tail["step"], stuck.loss_tail["loss_mean"])
    stuck.loss_tail["loss_mean"] = 2.0 * (1 - 0.5 * drop)  # still stuck: said with its window
    [found] = hits("TL603", stuck)
    assert f"the {len(stuck.per_step)} observed steps and the window of 40 after" in found.message


def test_medians_before_match_a_direct_median_of_each_prefix():
    values = [0.3, 0.1, 0.1, 2.0, -1.0, 0.5, 0.5, 7.0, 0.2, 0.2, 0.9]
    assert run.medians_before(values) == [math.inf] + [statistics.median(values[:i])
                                                       for i in range(1, len(values))]
    assert run.medians_before([]) == []


def _batch_losses(levels, spread: float = 0.6, seed: int = 0) -> list:
    """One small batch's loss per step: ``levels`` times heavy-tailed (log-normal) noise, as a
    Monitor at ``every=1`` records it."""
    rng = np.random.default_rng(seed)
    return [float(v) for v in np.asarray(levels) * rng.lognormal(0.0, spread, len(levels))]


def _every_step(*losses):
    return trace([], mode="monitor", per_step=steps(*losses, key="loss_mean"))


@pytest.mark.parametrize("seed", range(3))
def test_tl604_a_noisy_falling_curve_of_single_batches_is_no_divergence(seed):
    """A healthy run at every=1, batch 16: single losses spread 0.05-2 around a level that
    falls from 1.6 to 0.5; the lowest single loss is luck, and 3x it is an ordinary batch."""
    losses = _batch_losses(np.geomspace(1.6, 0.5, 300), seed=seed)
    assert max(losses[100:]) > 3 * min(losses[:100])  # single points would read as a rise
    assert run.noise_window(losses) > 1
    assert hits("TL604", _every_step(*losses)) == []


def test_tl604_a_noisy_curve_whose_level_rises_diverges():
    """The same noise on a level that climbs from 0.5 to 2.5 at step 200 (a learning rate
    raised mid-run): the median of the window's points climbs past 3x the lowest level."""
    levels = np.r_[np.geomspace(1.6, 0.5, 200), np.full(100, 2.5)]
    losses = _batch_losses(levels)
    [found] = hits("TL604", _every_step(*losses))
    k = run.noise_window(losses)
    assert 200 <= found.evidence["step"] < 200 + k
    assert f"the median of the {k} points up to it" in found.message


@pytest.mark.parametrize("factor, window", [(0.99, 1), (1.01, 2)])
def test_noise_window_takes_medians_once_single_points_are_noisier_than_level_noise(factor,
                                                                                     window):
    """Points alternating 1 +- a (thirds of 8: median 1) have second differences of 4a: a
    relative noise of 1.4826 * 4a / sqrt(6)."""
    a = factor * run.LEVEL_NOISE * math.sqrt(6.0) / (1.4826 * 4)
    losses = [1.0 + a * (-1) ** i for i in range(24)]
    assert run.NOISE_POINTS <= 24
    assert run.noise_window(losses) == window
    assert run.noise_window(losses[:run.NOISE_POINTS - 1]) == 1  # too few to tell their noise


def test_noise_window_follows_the_noisiest_third():
    """Near chance a loss is quiet; once it has fallen, noisy: the noisy third sets it."""
    quiet = [1.6 + 0.01 * (-1) ** i for i in range(40)]
    noisy = _batch_losses(np.full(20, 0.5))
    assert run.noise_window(quiet) == 1
    assert run.noise_window(quiet + noisy) > 1


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_tl603_too_noisy_single_batches_are_not_judged_barely_falling(seed):
    """Online training (every=1, batch 1): single losses spread over orders of magnitude
    around a level that falls 10% over 300 steps. The thirds' medians move by more than that
    by noise alone: "rose" or "barely fell" would be a guess, so TL603 says why it cannot tell."""
    losses = _batch_losses(np.geomspace(1.0, 0.9, 300), spread=1.0, seed=seed)
    with pytest.raises(Skip, match=f"too noisy to tell a {defaults('TL603')['min_drop']:.0%} fall"):
        hits("TL603", _every_step(*losses))


def test_tl603_a_noisy_curve_is_judged_where_its_noise_lets_a_fall_show():
    """Stuck at chance (labels that do not match the inputs) with 20% noise per point: over
    3000 points the thirds' medians are precise to ~3%, so a flat loss is reported; a rise far
    beyond the noise is reported from a few hundred points."""
    flat = _batch_losses(np.full(3000, 1.6), spread=0.2)
    assert run.noise_window(flat) > 1
    [found] = hits("TL603", _every_step(*flat))
    assert abs(found.evidence["change"]) < defaults("TL603")["min_drop"]
    rising = _batch_losses(np.geomspace(0.5, 1.5, 300), spread=0.6)
    [found] = hits("TL603", _every_step(*rising))
    assert found.message.startswith("the loss rose")


def _classifier_steps(*losses, classes=10):
    return _classifier(_every_step(*losses), classes)


def test_tl604_a_noisy_classifier_that_diverges_at_once_fires():
    """Adam at lr 0.3: 2.3 (ln 10, at init) -> 728 at step 1, then decaying with noise. The
    first median of k points already holds the spike; the loss at init is the reference."""
    spike = np.r_[2.3, np.geomspace(700, 3, 60)]
    losses = [2.3] + _batch_losses(spike[1:], spread=0.8)
    assert run.noise_window(losses) > 1
    [found] = hits("TL604", _classifier_steps(*losses))
    assert found.evidence["running_min"] == 2.3


@pytest.mark.parametrize("factor, fires", [(0.99, True), (1.01, False)])
def test_tl604_a_noisy_curve_far_above_its_first_loss_diverged(factor, fires):
    """Any loss: a level above rise_factor x exp(3 x noise) x the first loss, where single
    points are off by at most FIRST_NOISE (an MSE regression at Adam lr 0.3: 1.4 -> 3e6 at
    step 1). Noisier than that, one lucky first batch says nothing. Points alternate 20(1 +-
    a): a relative noise of 1.4826 * 4a / sqrt(6)."""
    noise = factor * run.FIRST_NOISE
    a = noise * math.sqrt(6.0) / (1.4826 * 4)
    assert 20 > defaults("TL604")["rise_factor"] * math.exp(3 * noise)
    losses = [1.0] + [20.0 * (1 + a * (-1) ** i) for i in range(60)]
    assert run.noise_window(losses) > 1
    found = hits("TL604", _every_step(*losses))
    assert bool(found) is fires
    if fires:
        assert "its first loss 1 " in found[0].message


def test_tl604_spikes_the_median_passes_over_diverge_by_their_mean():
    """A Transformer LM at SGD lr 20: most batches near ln(C), one in three at 15x it. The
    median stays near ln(C); the mean is 5.7x the loss at init."""
    chance = math.log(200)
    losses = [chance] + [chance * (15.0 if i % 3 == 0 else 1.0 + 0.1 * (i % 2))
                         for i in range(1, 90)]
    [found] = hits("TL604", _classifier_steps(*losses, classes=200))
    assert "the mean of the" in found.message and "loss at init" in found.message
    assert found.evidence["factor"] > defaults("TL604")["rise_factor"]


@pytest.mark.parametrize("seed", range(3))
def test_tl604_a_noisy_classifier_falling_from_ln_c_stays_silent(seed):
    losses = _batch_losses(np.geomspace(math.log(5), 0.5, 300), seed=seed)
    losses[0] = math.log(5)
    assert hits("TL604", _classifier_steps(*losses, classes=5)) == []


@pytest.mark.parametrize("n, k", [(10, 1), (10, 3), (100, 8), (103, 33)])
def test_levels_are_the_median_and_mean_of_each_window(n, k):
    values = [float((i * 7919) % 101) for i in range(n)]
    ends, medians, means = run._levels(values, k)
    assert ends[0] == k - 1 and ends[-1] == n - 1
    assert all(b - a <= max(1, k // 4) for a, b in zip(ends, ends[1:]))
    for end, m, a in zip(ends, medians, means):
        window = values[end + 1 - k:end + 1]
        assert m == pytest.approx(statistics.median(window))
        assert a == pytest.approx(sum(window) / k)


def test_tl603_single_batch_points_need_noise_points():
    """At every=1 each point is one batch's loss: six of them tell nothing of a trend."""
    flat = [2.0] * (run.NOISE_POINTS - 1)
    with pytest.raises(Skip, match=f"at least {run.NOISE_POINTS} observed steps.*every=1"):
        hits("TL603", _every_step(*flat))
    assert hits("TL603", _every_step(*flat, 2.0))  # flat and quiet: judged, and stuck
    assert hits("TL603", _monitor(*flat[:defaults("TL603")["min_points"]]))  # window means


def test_tl603_a_warmup_of_single_batches_is_not_judged_on_a_fall_noise_hides():
    """AdamW warming up at batch 8, every=1: 34 single batches about 8% apart, the level 4%
    lower at the end. Quiet enough for TL604's windows, but thirds of 11 such points cannot
    tell that from a 5% fall: a note, not a finding (with fail_on the run would have
    stopped at step 33)."""
    losses = _batch_losses(np.geomspace(1.6, 1.6 * 0.96, 34), spread=0.08, seed=2)
    assert run.noise_window(losses) == 1
    with pytest.raises(Skip, match=f"too noisy to tell a {defaults('TL603')['min_drop']:.0%} fall"):
        hits("TL603", _every_step(*losses))


@pytest.mark.parametrize("start, share, fires", [
    (178.0, 0.99, False), (178.0, 1.01, True), (0.01, 0.99, False), (0.01, 1.01, True)])
def test_tl604_a_loss_falling_without_bound(start, share, fires):
    """A VAE whose KL term is subtracted: the loss went 178 -> -5.6e21 while its
    reconstruction error rose 68 -> 4178 (measured), with no NaN. Below -``unbounded`` x its
    start (at least 1 in magnitude) the loss has no floor."""
    floor = defaults("TL604")["unbounded"] * max(start, 1.0)
    curve = [start, start * 0.5, -floor * share / 20, -floor * share]
    found = hits("TL604", _monitor(*curve))
    assert bool(found) is fires
    if fires:
        assert "falls without bound" in found[0].message
        assert "sign of every term" in found[0].fix


@pytest.mark.parametrize("last, fires", [(-run.STILL_FALLING * 5000 * 1.01, True),
                                         (-run.STILL_FALLING * 5000 * 0.99, False)])
def test_tl604_a_likelihood_that_levels_off_far_below_zero_is_no_fall_without_bound(last, fires):
    """A Gaussian NLL summed over 2048 targets with zero-initialized heads starts at 4.07
    and converges to -7837 (its variance clamped at 1e-6; calibrated, RMSE at the noise
    level: measured). Below -1000x its start, but it levels off: only a loss still falling
    ``STILL_FALLING``-fold over its last third falls without bound."""
    assert bool(hits("TL604", _monitor(4.07, -2000.0, -5000.0, last))) is fires
    # A VAE's KL subtracted: -5.3e15 by step 70, -5.6e21 at 200, slowing down: far below.
    far = 4.07 * run.FAR_BELOW
    assert bool(hits("TL604", _monitor(4.07, -far / 2, -far / 2, -far * 1.01)))
    assert not hits("TL604", _monitor(4.07, -far / 2, -far / 2, -far * 0.99))


@pytest.mark.parametrize("share, signed", [(run.SIGNED_SHARE * 1.01, True),
                                           (run.SIGNED_SHARE * 0.99, False)])
def test_a_loss_that_swings_below_zero_is_not_judged_by_relative_rises(share, signed):
    """Actor-critic on CartPole with normalized advantages: the loss wanders around 0 (0.01,
    0.039, -0.016, ...) while the episode length goes 66 -> 199 (measured); TL604 read a
    '4.1x rise' and TL603 a '+82.8%' one. A loss whose lowest value (a point, or a window's
    lowest) is below 0 by ``SIGNED_SHARE`` of its typical level has no floor at 0: neither
    rule judges its rises; NaN/Inf still counts. A Gaussian NLL at 0.44 with one batch at
    -0.04 that then diverged (to 2.9e5, no NaN) is still judged."""
    rise = defaults("TL604")["rise_factor"] * 1.5
    curve = [0.01, 0.01, 0.01, 0.01 * rise, 0.01 * rise, 0.01 * rise] * 2
    t = _monitor(*curve)
    level = statistics.median(curve)
    t.per_step[1]["loss_min"] = -share * level
    assert bool(hits("TL604", t)) is not signed
    if signed:
        with pytest.raises(Skip, match="goes below 0"):
            hits("TL603", t)
    else:
        assert hits("TL603", t)
    t.per_step[-1]["loss_mean"] = NAN
    assert "NaN/Inf" in hits("TL604", t)[0].message


@pytest.mark.parametrize("peak, fires", [(1.99, True), (2.01, False)])
def test_tl603_judges_the_loss_from_the_end_of_a_warmup(peak, fires):
    """A loss flat at its start while the learning rate still rises (a linear warmup: a tiny
    BERT sat at ln 4 through its 40 steps, then learned) is judged from the rate's peak on:
    six flat points with the rate rising WARMUP_RISE x are too few after its peak; a rate
    that rose less is no warmup."""
    from trainlint.rules.run import WARMUP_RISE

    t = _monitor(*[1.386] * 6)
    rates = [1e-4 * (1 + (peak * WARMUP_RISE / 2.0 - 1) * i / 5) for i in range(6)]
    for s, lr in zip(t.per_step, rates):
        s["lrs"] = {0: lr}
    if fires:
        assert hits("TL603", t)
    else:
        with pytest.raises(Skip, match="warmup"):
            hits("TL603", t)
        flat = _monitor(*[1.386] * 12)  # the same rise, then six flat points at the peak
        for i, s in enumerate(flat.per_step):
            s["lrs"] = {0: rates[min(i, 5)]}
        assert hits("TL603", flat)


@pytest.mark.parametrize("points, every, judged", [
    # NOISE_POINTS points spanning just past INTERIM_STEPS (209 at 200), just short (190),
    # and one point fewer spanning past it (216).
    (run.NOISE_POINTS, run.INTERIM_STEPS // (run.NOISE_POINTS - 1) + 1, True),
    (run.NOISE_POINTS, run.INTERIM_STEPS // (run.NOISE_POINTS - 1), False),
    (run.NOISE_POINTS - 1, run.INTERIM_STEPS // (run.NOISE_POINTS - 2) + 1, False),
])
def test_tl603_mid_run_it_waits_for_enough_of_the_run(points, every, judged):
    """Judged to stop a run (fail_on), a flat loss fires only over INTERIM_STEPS steps and
    NOISE_POINTS points: healthy runs sit on plateaus for tens of steps first. The run's own
    report judges from min_points on."""
    flat = trace([], mode="monitor", per_step=steps(*[2.0] * points, every=every,
                                                    key="loss_mean"))
    assert hits("TL603", flat)
    flat.interim = True
    if judged:
        assert hits("TL603", flat)
    else:
        with pytest.raises(Skip, match="mid-run"):
            hits("TL603", flat)


# Micro-batches per optimizer step, and a spacing of NOISE_POINTS points that spans just short
# of INTERIM_STEPS optimizer steps (760 micro-batches, 190 steps, at 200) or just past it (817).
MICRO = 4
SHORT = MICRO * (run.INTERIM_STEPS // (run.NOISE_POINTS - 1))


@pytest.mark.parametrize("every, judged", [(SHORT, False), (SHORT + MICRO - 1, True)])
def test_tl603_mid_run_counts_optimizer_steps_under_micro_batch_monitoring(every, judged):
    """monitor.step() per micro-batch, 4 per optimizer step (an observation began at a
    window's first micro-batch ran on over 4): 20 points spanning 760 micro-batches are 190
    optimizer steps, too few to stop a run; 817 are 204."""
    flat = trace([], mode="monitor", per_step=steps(*[2.0] * run.NOISE_POINTS, every=every,
                                                    key="loss_mean"))
    flat.per_step[1]["micro_batches"] = MICRO
    flat.interim = True
    assert run.micro_batches(flat) == MICRO
    if judged:
        assert hits("TL603", flat)
    else:
        with pytest.raises(Skip, match="optimizer steps"):
            hits("TL603", flat)


def test_tl603_too_few_losses_says_the_others_were_not_finite():
    """20 observed steps, all NaN after the first (lr 30): the note said 'saw 1' as if one step
    had been observed."""
    t = _monitor(2.3, *[math.nan] * 19)
    with pytest.raises(Skip, match=r"saw 1 finite \(of 20 observed: the others NaN/Inf"):
        hits("TL603", t)
    with pytest.raises(Skip, match=r"saw 3$"):
        hits("TL603", _monitor(2.3, 2.2, 2.1))


@pytest.mark.parametrize("end, severity", [(0.99 * 2.0 * run.FELL_BELOW_START, "info"),
                                           (1.01 * 2.0 * run.FELL_BELOW_START, "warning"),
                                           (2.4, "warning")])
def test_tl603_a_rise_below_the_start_is_info(end, severity):
    """A curriculum that adds harder data at a third of the run: 2.0 at the start, 0.01 on
    the easy data, then up to ``end`` (measured: 2.09 -> 0.003 -> 0.19, test accuracy 0.781
    against 0.775 without the curriculum, and stopped by fail_on as 'the loss rose'). Below
    half its start, it fell and then rose: info. Above it (Adam at 0.08: 2.12 -> 0.37 ->
    1.35, accuracy 0.614 against 0.975), or back at the start, a warning."""
    losses = [2.0, 2.0, 2.0] + [0.01] * 27 + list(np.linspace(0.01, end, 30)) + [end] * 30
    [found] = hits("TL603", _monitor(*losses))
    assert found.message.startswith("the loss rose")
    assert (found.severity or RULES["TL603"].severity) == severity
    if severity == "info":
        assert "below where the run started (2" in found.message
        assert "curriculum" in found.fix
