"""TL101-TL104 on hand-built traces, at the edges of their thresholds."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import numpy as np
import pytest
from trainlint.rules._graph import LARGE_FEATURES, MOSTLY_DEAD
from trainlint.rules.activations import (
    FITTED_LOSS,
    LEARNED_LOSS,
    NORM_WEIGHT_COLLAPSED,
    OUT_OF_RANGE,
    OUT_OF_REACH,
)
from trainlint.rules.depth import GREW, IDENTICAL, RESCALED

from tests.rules.tracekit import param
from trainlint.engine import RULES, Selection, load_rules, run_rules, set_thresholds
from trainlint.errors import ConfigError
from trainlint.trace import (
    ActivationStats,
    Edge,
    InputTrace,
    LayerTrace,
    Location,
    ModuleFacts,
    ParamTrace,
    RunTrace,
    TargetTrace,
)

load_rules()
FP16_MAX = 65504.0


def act(rms: float = 1.0, *, mean: float = 0.0, saturated: Optional[float] = None,
        peak: Optional[float] = None) -> ActivationStats:
    peak = 3 * rms if peak is None else peak
    return ActivationStats(count=1000, mean=mean, std=math.sqrt(max(rms * rms - mean * mean, 0)),
                           min=-peak, max=peak, zero_fraction=0.0,
                           saturated_fraction=saturated, rms=rms)


def point(module: str, type_: str, depth: int, *, kind: Optional[str] = None,
          op: str = "output", activation: Optional[ActivationStats] = None,
          ever_active: Optional[np.ndarray] = None) -> LayerTrace:
    units = None if ever_active is None else ever_active.size
    return LayerTrace(module=module, type=type_, op=op, depth=depth, kind=kind,
                      activation=activation or act(), unit_ever_active=ever_active,
                      unit_dim=None if ever_active is None else -1,
                      node=("point", module, op, units))


def facts(name: str, type_: str, **attrs: object) -> ModuleFacts:
    return ModuleFacts(name=name, type=type_, training=True, is_leaf=True,
                       location=Location("model.py", 10 + len(name)), attrs=dict(attrs))


def run(code: str, trace: RunTrace, **overrides: object) -> list:
    selection = Selection(select={code})
    if overrides:
        set_thresholds(selection, {code: overrides})
    findings, _notes = run_rules(trace, selection)
    assert all(f.code == code for f in findings)
    return findings


def edge_sizes(threshold: float, low: int) -> tuple[int, int]:
    """A unit count n >= low where k = threshold * n dead units give exactly ``threshold``."""
    for n in range(max(low, 2), 5000):
        k = round(threshold * n)
        if k / n == threshold and 1.0 - (n - k) / n == threshold and 0 < k < n:
            return n, k
    raise AssertionError(f"no unit count represents {threshold} exactly")


# ------------------------------------------------------------------------------ TL101

def relu_trace(dead: int, units: int, *, kind: str = "relu", functional: bool = False,
               through_dropout: bool = False) -> RunTrace:
    """Linear 'fc' (bias all -5) -> [Dropout 'drop'] -> ReLU ('act', or F.relu in 'block')."""
    ever = np.ones(units, dtype=bool)
    ever[:dead] = False
    fc = point("fc", "Linear", 0)
    layers = [fc]
    modules = {"fc": facts("fc", "Linear", in_features=64, out_features=units)}
    src = fc.node
    if through_dropout:
        drop = point("drop", "Dropout", 1)
        layers.append(drop)
        modules["drop"] = facts("drop", "Dropout")
        edges = [Edge(src, ("module", "drop"))]
        src = drop.node
    else:
        edges = []
    if functional:
        relu = point("block", "Block", 2, kind=kind, op="relu", ever_active=ever)
        modules["block"] = facts("block", "Block")
        edges.append(Edge(src, relu.node))
    else:
        relu = point("act", "ReLU" if kind == "relu" else "GELU", 2, kind=kind, ever_active=ever)
        modules["act"] = facts("act", relu.type)
        edges.append(Edge(src, ("module", "act")))
    layers.append(relu)
    params = [ParamTrace("fc.weight", "fc", (units, 64), True, True, norm=1.0, std=0.05,
                         grad_norm=0.1),
              ParamTrace("fc.bias", "fc", (units,), True, True, norm=5.0 * math.sqrt(units),
                         std=0.0, grad_norm=0.0)]
    return RunTrace(layers=layers, modules=modules, params=params, edges=edges,
                    observed_steps=3)


@pytest.mark.parametrize("first, records, from_init", [
    (0, 3, True), (1, 3, False), (0, 2, False)])
def test_tl101_units_dead_from_the_first_step_get_no_learning_rate_advice(first, records,
                                                                           from_init):
    """Dead over every observed step from the run's first, the units were dead before any
    update: the init's or the data's. A TCN whose 1x1 shortcut conv had its default bias
    against weights of 0.01 was told to lower the rate; at lr/10 and lr/100 the units stayed
    50% dead and the loss got worse (1.03, 1.10 against 0.47; measured). Seen from a later
    step, or over a window after the first, the rate may have killed them."""
    t = relu_trace(30, 32)
    t.per_step = [{"step": first + i, "layers": {}} for i in range(3)]
    t.layers[-1].unit_records = records
    [found] = run("TL101", t)
    assert ("lower the learning rate" in found.fix) is not from_init
    assert "kaiming_normal_" in found.fix
    # A Monitor whose first classification loss is far below ln C came in mid-run (plain SGD
    # keeps no state to tell): what killed the units may have been the rate.
    t.mode, t.loss_kind, t.num_classes = "monitor", "cross_entropy", 10
    for s in t.per_step:
        s["loss_mean"] = 0.2
    [later] = run("TL101", t)
    assert "lower the learning rate" in later.fix


@pytest.mark.parametrize("from_init", [True, False])
def test_tl101_a_window_after_the_first_step_with_the_units_dead_at_it_is_from_the_init(
        from_init):
    """A 150-step Monitor at every=10 reads its units over the last 3 observed steps: where
    the first observed step's batch already had dead_fraction of them dead, they died before
    any update (a MobileNet with BatchNorm biases of -5 before ReLU6 was told to lower the
    rate; measured: lr/10 left the loss at 1.97 against 0.010 with the biases at 0)."""
    edge = RULES["TL101"].defaults["dead_fraction"]
    at_first = edge if from_init else np.nextafter(edge, 0)
    t = relu_trace(30, 32)
    key = t.layers[-1].node[1:]
    t.per_step = [{"step": 10 * i, "layers": {key: {"dead_fraction": at_first if i == 0
                                                    else 0.9}}} for i in range(15)]
    t.observed_steps = 15
    t.layers[-1].unit_records = 3
    [found] = run("TL101", t)
    assert ("lower the learning rate" in found.fix) is not from_init


def test_tl101_units_after_a_residual_join_point_at_each_paths_last_layer():
    """F.relu(h + shortcut(x)) in a block: the units' feeder is the block itself, and the fix
    read 'check the layer feeding it, TemporalBlock'; it names the join's paths instead."""
    t = relu_trace(30, 32, functional=True)
    t.modules["block"].is_leaf = False
    inner = point("block", "Block", 1, kind="relu", op="relu#1",
                  ever_active=np.ones(32, dtype=bool))
    t.layers.insert(1, inner)
    t.edges[-1] = Edge(inner.node, t.edges[-1].dst, ("dropout", "add"))
    [found] = run("TL101", t)
    assert "adds up several paths (a residual join)" in found.fix
    t.edges[-1] = Edge(inner.node, t.edges[-1].dst, ("dropout",))
    [plain] = run("TL101", t)
    assert "residual join" not in plain.fix and "Block 'block'" in plain.fix


def _recently_killed(dead_before: int, dead_recent: int, units: int) -> RunTrace:
    """``relu_trace`` whose unit window (16 records) finds ``dead_before`` units dead, and
    whose recent window (4 records) finds ``dead_recent``."""
    t = relu_trace(dead_before, units)
    act = t.layers[-1]
    act.unit_records, act.unit_recent_records = 16, 4
    act.unit_recent_active = np.arange(units) >= dead_recent
    act.shape = (32, units)
    t.observed_steps = 30
    return t


def test_tl101_a_layer_killed_since_its_window_began_is_judged_over_its_recent_records():
    """At every=10 an MLP's window holds 16 records (160 steps); a learning-rate spike that
    killed its ReLUs 40 steps before the end shows over the recent 4: judged there against
    alike_dead_fraction."""
    d = RULES["TL101"].defaults
    n, k = edge_sizes(d["alike_dead_fraction"], d["min_units"])
    assert run("TL101", _recently_killed(0, k - 1, n)) == []
    [found] = run("TL101", _recently_killed(0, k, n))
    assert found.evidence["threshold"] == d["alike_dead_fraction"]
    assert found.evidence["dead_units"] == k
    assert "over the last 4 observed step(s)" in found.message
    full = run("TL101", _recently_killed(n // 2 + 1, n, n))  # the full window fires itself
    assert "over the last 16 observed step(s)" in full[0].message
    assert full[0].evidence["threshold"] == d["dead_fraction"]


def test_tl101_at_the_edges_of_dead_fraction() -> None:
    d = RULES["TL101"].defaults["dead_fraction"]
    n, k = edge_sizes(d, RULES["TL101"].defaults["min_units"])
    assert run("TL101", relu_trace(k - 1, n)) == []
    at = run("TL101", relu_trace(k, n))
    above = run("TL101", relu_trace(k + 1, n))
    assert [f.module for f in at] == ["act"] and [f.module for f in above] == ["act"]
    finding = at[0]
    assert finding.severity == RULES["TL101"].severity == "warning"
    assert finding.evidence["dead_fraction"] == pytest.approx(d)
    assert finding.evidence["dead_units"] == k and finding.evidence["units"] == n
    assert f"{100 * d:.0f}%" in finding.message and f"of the {n} units" in finding.message
    assert finding.location == Location("model.py", 13)


def test_tl101_needs_min_units() -> None:
    m = RULES["TL101"].defaults["min_units"]
    assert run("TL101", relu_trace(m - 1, m - 1)) == []
    assert len(run("TL101", relu_trace(m, m))) == 1


def test_tl101_fix_names_the_feeding_layer_and_its_state() -> None:
    [finding] = run("TL101", relu_trace(60, 64))
    assert "Linear 'fc'" in finding.fix and "bias RMS 5" in finding.fix
    assert "kaiming_normal_" in finding.fix and "LeakyReLU" in finding.fix
    assert finding.evidence["feeding_module"] == "fc"
    assert finding.evidence["feeding_bias_rms"] == pytest.approx(5.0)
    assert finding.evidence["kaiming_std"] == pytest.approx(math.sqrt(2 / 64))


def test_tl101_looks_back_through_dropout_to_the_weight_layer() -> None:
    [finding] = run("TL101", relu_trace(60, 64, through_dropout=True))
    assert finding.evidence["feeding_module"] == "fc"


def _behind_dead(upstream_dead: float, join: str = "") -> RunTrace:
    """``relu_trace`` (act: 60 of 64 units dead) fed through conv2 and bn2 by 'up', a ReLU
    with ``upstream_dead`` of its 64 units dead; ``join``: a second path into conv2 (another
    layer, or the model's input)."""
    t = relu_trace(60, 64)
    ever = np.arange(64) >= round(upstream_dead * 64)
    up = point("up", "ReLU", -3, kind="relu", ever_active=ever)
    conv = point("conv2", "Conv1d", -2)
    bn = point("bn2", "BatchNorm1d", -1)
    t.layers = [up, conv, bn] + t.layers
    t.modules.update({"up": facts("up", "ReLU"), "conv2": facts("conv2", "Conv1d"),
                      "bn2": facts("bn2", "BatchNorm1d")})
    t.edges += [Edge(up.node, ("module", "conv2")), Edge(conv.node, ("module", "bn2")),
                Edge(bn.node, ("module", "fc"))]
    if join == "layer":
        other = point("skip", "Linear", -4)
        t.layers.insert(0, other)
        t.modules["skip"] = facts("skip", "Linear")
        t.edges.append(Edge(other.node, ("module", "conv2")))
    elif join == "input":  # the raw input concatenated beside it
        t.edges.append(Edge(("input", "x"), ("module", "conv2"), ("cat",)))
    return t


@pytest.mark.parametrize("share, starved", [(1.0, True), (63 / 64, False)])
def test_tl101_behind_a_dead_layer_points_at_it_first(share: float, starved: bool) -> None:
    """A 1D-CNN with one BatchNorm's shift at -5: its ReLU is 100% dead, so the next block's
    BatchNorm outputs exactly 0 and that block's ReLU is dead too. Fixing the first alone
    revives both (measured); the second's fix must not blame its BatchNorm's shift. With one
    unit alive upstream the samples differ again: this layer's deadness is its own."""
    found = {f.module: f for f in run("TL101", _behind_dead(share))}
    assert ("fix up (ReLU) first" in found["act"].fix) is starved
    assert (found["act"].evidence.get("starved_by") == "up") is starved
    for join in ("layer", "input"):  # another path feeds it too
        joined = {f.module: f for f in run("TL101", _behind_dead(1.0, join=join))}
        assert "first" not in joined["act"].fix


def test_tl101_fed_by_a_norm_layer_points_at_its_shift() -> None:
    trace = relu_trace(60, 64)
    trace.modules["fc"] = facts("fc", "BatchNorm1d", num_features=64)
    [finding] = run("TL101", trace)
    assert "BatchNorm1d 'fc'" in finding.fix and "bias RMS 5" in finding.fix
    assert "kaiming_std" not in finding.evidence and "feeding_weight_std" not in finding.evidence


@pytest.mark.parametrize("factor, collapsed", [(0.99, True), (1.01, False)])
def test_tl101_fed_by_a_norm_layer_with_a_collapsed_weight_points_at_it(
        factor: float, collapsed: bool) -> None:
    """A norm layer whose weight (gamma) is ~0 scales its output to ~0: the GELU/SiLU units
    after it read as dead; the fix is its weight, not the learning rate or the activation."""
    gamma_rms = factor * NORM_WEIGHT_COLLAPSED
    trace = relu_trace(60, 64, kind="gelu")
    trace.modules["fc"] = facts("fc", "BatchNorm2d", num_features=64)
    trace.params[0] = ParamTrace("fc.weight", "fc", (64,), True, True, norm=gamma_rms * 8.0,
                                 std=gamma_rms, grad_norm=0.1)
    [finding] = run("TL101", trace)
    assert finding.evidence["feeding_norm_weight_rms"] == pytest.approx(gamma_rms)
    assert ("nn.init.ones_(layer.weight)" in finding.fix) is collapsed
    assert "LeakyReLU" not in finding.fix and "TL103" in finding.fix


def test_tl101_without_a_known_feeder_gives_the_generic_fix() -> None:
    trace = relu_trace(60, 64)
    trace.edges = []
    [finding] = run("TL101", trace)
    assert "feeding_module" not in finding.evidence and "kaiming_normal_" in finding.fix


def test_tl101_functional_relu_is_reported_on_the_calling_module() -> None:
    [finding] = run("TL101", relu_trace(60, 64, functional=True))
    assert finding.module == "block" and "block:relu" in finding.message
    assert finding.evidence["feeding_module"] == "fc"


def test_tl101_counts_gelu_family_but_not_other_kinds() -> None:
    assert len(run("TL101", relu_trace(60, 64, kind="gelu"))) == 1
    trace = relu_trace(60, 64)
    trace.layers[-1].kind = "tanh"
    assert run("TL101", trace) == []


def test_tl101_thresholds_can_be_overridden() -> None:
    d = RULES["TL101"].defaults["dead_fraction"]
    n, k = edge_sizes(d, RULES["TL101"].defaults["min_units"])
    trace = relu_trace(k, n)
    assert run("TL101", trace, dead_fraction=min(1.0, d + 2 / n)) == []
    assert len(run("TL101", relu_trace(k - 1, n), dead_fraction=(k - 1) / n)) == 1
    assert run("TL101", trace, min_units=n + 1) == []
    with pytest.raises(ConfigError):
        run("TL101", trace, no_such_threshold=1)


def alike_trace(dead: int, units: int, spread: Optional[float], via: tuple = (),
                own_spread: Optional[float] = None) -> RunTrace:
    """relu_trace with 'fc' fed by a pooled output 'pool' whose between-sample RMS is
    ``spread`` × its RMS (None: not measured), through ``via``; 'fc''s own output has a
    between-sample RMS of ``own_spread`` × its std."""
    trace = relu_trace(dead, units)
    pool = point("pool", "AdaptiveAvgPool2d", 0, activation=act(2.0, mean=1.0))
    pool.activation.signal = None if spread is None else spread * pool.activation.rms
    fc = trace.layers[0]
    fc.activation = act(1.0, mean=-0.5)
    if own_spread is not None:
        fc.activation.signal = own_spread * fc.activation.std
    trace.layers.insert(0, pool)
    trace.modules["pool"] = facts("pool", "AdaptiveAvgPool2d")
    trace.edges.append(Edge(pool.node, ("module", "fc"), via))
    return trace


def test_tl101_asks_more_where_the_samples_are_alike_at_the_layers_input() -> None:
    """Where the samples barely differ (a squeeze-and-excitation gate on pooled features),
    half the units are off by chance: ``alike_dead_fraction`` is asked instead."""
    t = RULES["TL101"].defaults
    n, k = edge_sizes(t["alike_dead_fraction"], t["min_units"])
    below, above = t["alike_signal"] * 0.99, t["alike_signal"] * 1.01
    assert run("TL101", alike_trace(k - 1, n, below)) == []
    [finding] = run("TL101", alike_trace(k, n, below))
    assert finding.evidence["threshold"] == t["alike_dead_fraction"]
    assert finding.evidence["input_spread"] == pytest.approx(below, abs=1e-4)
    assert f"threshold {100 * t['alike_dead_fraction']:.0f}%" in finding.message
    half = round(t["dead_fraction"] * n)
    assert run("TL101", alike_trace(half, n, below)) == []
    [finding] = run("TL101", alike_trace(half, n, above))
    assert finding.evidence["threshold"] == t["dead_fraction"]
    assert len(run("TL101", alike_trace(half, n, None))) == 1  # not measured: as before


def test_tl101_through_a_mean_judges_the_spread_of_the_layers_own_output() -> None:
    """``x.mean((2, 3))`` between the observed output and the layer: the pooled values are not
    observed, so the between-sample share of the layer's own output spread stands in."""
    t = RULES["TL101"].defaults
    n = 64
    half = round(t["dead_fraction"] * n)
    low, high = t["alike_signal"] * 0.99, t["alike_signal"] * 1.01
    assert run("TL101", alike_trace(half, n, 1.0, ("mean",), own_spread=low)) == []
    assert len(run("TL101", alike_trace(half, n, 1.0, ("mean",), own_spread=high))) == 1
    assert len(run("TL101", alike_trace(half, n, 1.0, ("mean",), own_spread=None))) == 1
    # Through reshapes only, the input's own spread counts, not the layer's output's.
    assert len(run("TL101", alike_trace(half, n, 1.0, ("flatten",), own_spread=low))) == 1
    assert run("TL101", alike_trace(half, n, low, ("flatten",), own_spread=1.0)) == []


def test_tl101_asks_more_where_each_unit_showed_few_values() -> None:
    """One sample per step (a check at batch 1, an expert sent one token) over 3 steps: a
    unit off for its 3 values is a coin flip, so ``alike_dead_fraction`` is asked; at
    ``min_values`` values per unit, ``dead_fraction`` again."""
    t = RULES["TL101"].defaults
    n, k = edge_sizes(t["alike_dead_fraction"], t["min_units"])
    half = round(t["dead_fraction"] * n)
    steps = 3
    rows = -(-t["min_values"] // steps)  # the fewest rows per call that reach min_values

    def shaped(dead: int, rows_per_call: int) -> RunTrace:
        trace = relu_trace(dead, n)
        trace.layers[-1].shape = (rows_per_call, n)
        trace.observed_steps = steps
        return trace

    assert run("TL101", shaped(half, rows - 1)) == []
    assert run("TL101", shaped(k - 1, rows - 1)) == []
    [finding] = run("TL101", shaped(k, rows - 1))
    assert finding.evidence["threshold"] == t["alike_dead_fraction"]
    assert finding.evidence["values_per_unit"] == (rows - 1) * steps
    [finding] = run("TL101", shaped(half, rows))
    assert finding.evidence["threshold"] == t["dead_fraction"]
    assert "values_per_unit" not in finding.evidence


def test_tl101_alike_thresholds_can_be_overridden() -> None:
    t = RULES["TL101"].defaults
    n = 64
    half = round(t["dead_fraction"] * n)
    trace = alike_trace(half, n, t["alike_signal"] / 2)
    assert run("TL101", trace) == []
    assert len(run("TL101", trace, alike_signal=t["alike_signal"] / 4)) == 1
    assert len(run("TL101", trace, alike_dead_fraction=half / n)) == 1


# ------------------------------------------------------------------------------ TL102

def tanh_trace(share: float, kind: str = "tanh") -> RunTrace:
    fc = point("fc", "Linear", 0)
    tanh = point("act", "Tanh" if kind == "tanh" else "Sigmoid", 1, kind=kind,
                 activation=act(0.9, saturated=share, peak=1.0))
    head = point("head", "Linear", 2)
    return RunTrace(layers=[fc, tanh, head],
                    modules={n: facts(n, t) for n, t in
                             [("fc", "Linear"), ("act", tanh.type), ("head", "Linear")]},
                    edges=[Edge(fc.node, ("module", "act")), Edge(tanh.node, ("module", "head"))],
                    output_ops=((head.node, ()),))


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_tl102_at_the_edges_of_saturated_fraction(kind: str) -> None:
    s = RULES["TL102"].defaults["saturated_fraction"]
    assert run("TL102", tanh_trace(np.nextafter(s, 0), kind)) == []
    [at] = run("TL102", tanh_trace(s, kind))
    assert len(run("TL102", tanh_trace(np.nextafter(s, 1), kind))) == 1
    assert at.module == "act" and at.evidence["saturated_fraction"] == pytest.approx(s)
    assert f"threshold {100 * s:.0f}%" in at.message
    assert f"calculate_gain('{kind}')" in at.fix


def raw_input(rms: float) -> InputTrace:
    """A (32, 96) float input of timestamps: every feature at mean ``rms``, std 0."""
    return InputTrace(name="ts", shape=(32, 96), dtype="float32", channel_dim=1,
                      mean=np.full(96, rms), std=np.zeros(96), min=np.full(96, rms),
                      max=np.full(96, rms))


@pytest.mark.parametrize("scale, blamed", [(0.99, False), (1.01, True)])
def test_tl102_a_raw_input_into_the_layer_is_the_fix(scale: float, blamed: bool) -> None:
    """Timestamps (~3.5e9) into Linear -> tanh: no init keeps them out of the tails; the fix
    names the input from RMS LARGE_FEATURES on, through reshapes and joins."""
    for via in ((), ("unsqueeze",), ("cat",)):
        trace = tanh_trace(0.9)
        trace.inputs = [raw_input(scale * LARGE_FEATURES)]
        trace.edges.append(Edge(("input", "ts"), ("module", "fc"), via))
        [found] = run("TL102", trace)
        assert ("standardize the model's input 'ts'" in found.fix) is blamed, via
        assert ("xavier_normal_" in found.fix) is not blamed
        assert found.evidence.get("raw_input") == ("ts" if blamed else None)
    computed = tanh_trace(0.9)
    computed.inputs = [raw_input(2 * LARGE_FEATURES)]
    computed.edges.append(Edge(("input", "ts"), ("module", "fc"), ("log",)))
    [found] = run("TL102", computed)
    assert "xavier_normal_" in found.fix


def test_tl102_skips_model_outputs_trained_gates_and_other_kinds() -> None:
    """A gating MLP whose sigmoid sits 87% in its tails at init (measured: its weight gradient
    0.021, 0.12 after reset_parameters) is reported by a check; in a Monitor run, gates are
    left alone."""
    trace = tanh_trace(0.9)
    trace.output_ops = ((trace.layers[1].node, ("view",)),)
    assert run("TL102", trace) == []
    gated = tanh_trace(0.9)
    gated.mode = "monitor"  # a trained gate may settle open or shut
    gated.edges.append(Edge(gated.layers[1].node, ("op", "mul")))
    assert run("TL102", gated) == []
    gated.mode = "check"  # from the init, where a healthy gate sits near 0.5
    [found] = run("TL102", gated)
    assert found.module == "act"
    # A gate keeps its range: the fix is what feeds it (a hand-written GRU cell with gate
    # weights x8 and biases in +-6 was told to use ReLU; measured: accuracy 0.63 against 0.69
    # with Xavier and zero biases, 0.76 at the default init, no finding at either).
    assert "keep the tanh" in found.fix and "nn.ReLU" not in found.fix
    [plain] = run("TL102", tanh_trace(0.9))
    assert "keep the" not in plain.fix and "nn.ReLU" in plain.fix
    relu = tanh_trace(0.9)
    relu.layers[1].kind = "relu"
    assert run("TL102", relu) == []


def test_tl102_the_calls_of_one_function_in_one_module_are_one_finding() -> None:
    """A hand-unrolled RNN calls tanh at each time step: one finding at the worst call, with
    the number of calls that saturate (a call below the threshold is not counted)."""
    s = RULES["TL102"].defaults["saturated_fraction"]
    worst = (1 + s) / 2
    fc = point("fc", "Linear", 0)
    calls = [point("", "Net", i + 1, op="tanh" if i == 0 else f"tanh#{i}", kind="tanh",
                   activation=act(0.9, saturated=share, peak=1.0))
             for i, share in enumerate([np.nextafter(s, 1), worst, (s + worst) / 2, s / 2])]
    trace = RunTrace(layers=[fc, *calls], modules={"": facts("", "Net"),
                                                   "fc": facts("fc", "Linear")},
                     edges=[Edge(c.node, ("module", "head")) for c in calls])
    [found] = run("TL102", trace)
    assert found.evidence["calls"] == 3
    assert found.evidence["saturated_fraction"] == pytest.approx(worst)
    assert found.message.startswith("3 calls of tanh in '' saturate; at the worst, ")
    assert "tanh#1" in found.message


def test_tl102_threshold_override() -> None:
    s = RULES["TL102"].defaults["saturated_fraction"]
    assert run("TL102", tanh_trace(s), saturated_fraction=np.nextafter(s, 1)) == []
    selection = Selection(select={"TL102"})
    set_thresholds(selection, {"saturated-activation": {"saturated_fraction": s / 2}})
    findings, _ = run_rules(tanh_trace(s / 2), selection)
    assert len(findings) == 1


def _fitting(before: float, fitted_at: float, head_reads: bool = False) -> RunTrace:
    """A Monitor run's tanh at 0.9 saturated over the run: its share ``before`` at the two
    observed steps before the loss fell to ``fitted_at`` x its first value, 0.9 at the two
    after. Unless ``head_reads``, a hidden Linear (not the output layer) reads the tanh."""
    trace = tanh_trace(0.9)
    trace.mode, trace.loss_kind = "monitor", "cross_entropy"
    if not head_reads:
        trace.modules["mid"] = facts("mid", "Linear")
        trace.edges = [Edge(trace.layers[1].node, ("module", "mid")) if e.dst[1] == "head"
                       else e for e in trace.edges]
    key = trace.layers[1].node[1:]
    trace.per_step = [{"step": 10 * i, "loss": loss, "layers": {key: {"saturated_fraction": s}}}
                      for i, (loss, s) in enumerate([(1.4, before), (0.7, before),
                                                     (1.4 * fitted_at, 0.9), (0.1, 0.9)])]
    return trace


def test_tl102_saturation_only_once_the_loss_fitted_is_confidence() -> None:
    """A tanh that saturates only at steps where the loss is at most FITTED_LOSS x its first
    (a tiny BERT's pooler: 35% over 600 steps whose loss fell from ln 4 to 0.001) is left
    alone; one already saturated before, or a loss that never fitted, is not."""
    s = RULES["TL102"].defaults["saturated_fraction"]
    assert run("TL102", _fitting(np.nextafter(s, 0), FITTED_LOSS)) == []
    assert len(run("TL102", _fitting(s, FITTED_LOSS))) == 1
    unfit = _fitting(0.0, np.nextafter(FITTED_LOSS, 1))
    unfit.per_step[-1]["loss"] = unfit.per_step[-2]["loss"]
    assert len(run("TL102", unfit)) == 1
    unknown = _fitting(0.0, FITTED_LOSS)
    for step in unknown.per_step:
        del step["layers"]
    assert len(run("TL102", unknown)) == 1
    regression = _fitting(0.0, FITTED_LOSS)  # a first loss that holds the targets' offset
    regression.loss_kind = "mse"
    assert len(run("TL102", regression)) == 1


def test_tl102_a_tanh_only_the_output_layer_reads_is_judged_by_whether_the_run_learned() -> None:
    """Below the threshold at the first observed step and the loss at LEARNED_LOSS x its first
    (the median of the last three observed losses): the classifier learned through it (a
    fine-tuned BERT pooler)."""
    s = RULES["TL102"].defaults["saturated_fraction"]

    def learning(first_share: float, last_loss: float) -> RunTrace:
        trace = _fitting(first_share, 0.5, head_reads=True)
        for step in trace.per_step[1:]:  # never fitted: only the head exception can apply
            step["loss"] = max(step["loss"], FITTED_LOSS * 1.4 * 1.01)
        for step in trace.per_step[-3:]:
            step["loss"] = last_loss
        return trace
    assert run("TL102", learning(np.nextafter(s, 0), LEARNED_LOSS * 1.4)) == []
    assert len(run("TL102", learning(s, LEARNED_LOSS * 1.4))) == 1
    assert len(run("TL102", learning(0.0, np.nextafter(LEARNED_LOSS * 1.4, 2)))) == 1
    hidden = learning(0.0, LEARNED_LOSS * 1.4)
    hidden.edges = [Edge(hidden.layers[1].node, ("module", "mid")) if e.dst[1] == "head" else e
                    for e in hidden.edges]
    hidden.modules["mid"] = facts("mid", "Linear")
    assert len(run("TL102", hidden)) == 1


# ------------------------------------------------------------------------------ TL103/104

def depth_trace(scales: list, kind: str = "tanh", head: Optional[float] = None) -> RunTrace:
    """Alternating Linear / activation outputs with the given RMS values, in forward order."""
    layers, modules = [], {}
    for i, rms in enumerate(scales):
        is_act = i % 2 == 1
        type_ = {"tanh": "Tanh", "relu": "ReLU", "sigmoid": "Sigmoid"}[kind] if is_act else "Linear"
        layers.append(point(str(i), type_, i, kind=kind if is_act else None,
                            activation=act(rms)))
        modules[str(i)] = facts(str(i), type_)
    output_ops: tuple = ()
    if head is not None:
        name = str(len(scales))
        layers.append(point(name, "Linear", len(scales), activation=act(head)))
        modules[name] = facts(name, "Linear")
        output_ops = ((layers[-1].node, ()),)
    edges = [Edge(a.node, ("module", b.module)) for a, b in zip(layers, layers[1:])]
    return RunTrace(layers=layers, modules=modules, edges=edges, output_ops=output_ops)


def profile(code: str, deep: float) -> list:
    """``window`` layers at RMS 1, then layers at RMS ``deep`` (at least min_layers in all)."""
    t = RULES[code].defaults
    n = max(t["min_layers"], 2 * t["window"])
    return [1.0] * t["window"] + [deep] * (n - t["window"])


def test_tl103_at_the_edges_of_min_ratio() -> None:
    r = RULES["TL103"].defaults["min_ratio"]
    assert run("TL103", depth_trace(profile("TL103", r))) == []
    [below] = run("TL103", depth_trace(profile("TL103", np.nextafter(r, 0))))
    first_small = RULES["TL103"].defaults["window"]
    assert below.module == str(first_small)
    assert below.evidence["ratio"] < r and below.evidence["threshold"] == r
    assert f"threshold {r:g}" in below.message
    assert "xavier_normal_" in below.fix and "calculate_gain('tanh')" in below.fix
    [relu] = run("TL103", depth_trace(profile("TL103", r / 10), kind="relu"))
    assert "kaiming_normal_" in relu.fix
    # Hidden sigmoids fade whatever the init (measured on a 12-layer MLP: Xavier at the
    # sigmoid's gain left the first layer's gradient at 8e-8 of the last; ReLU + Kaiming 0.8).
    [sigmoid] = run("TL103", depth_trace(profile("TL103", r / 10), kind="sigmoid"))
    assert sigmoid.fix.startswith("replace the hidden sigmoids (TL105) with ReLU")
    assert "calculate_gain('sigmoid')" not in sigmoid.fix.split(";")[0]


@pytest.mark.parametrize("trainable, model_training, told", [
    (True, False, True), (True, True, True), (False, False, False)])
def test_tl103_with_batchnorm_trained_in_eval_names_the_mode(trainable: bool,
                                                            model_training: bool,
                                                            told: bool) -> None:
    """An EfficientNet trained with model.eval() left on: its BatchNorms normalize with their
    running statistics and the scale decays (fc 7.8e-5 against 0.58 in train mode, measured);
    the fix is model.train(), not an init. A BatchNorm frozen on purpose (no trainable
    parameter) is not that fault."""
    from trainlint.rules.depth import EVAL_MODE_FIX

    trace = depth_trace(profile("TL103", RULES["TL103"].defaults["min_ratio"] / 10))
    trace.modules["bn"] = facts("bn", "BatchNorm2d", num_features=8)
    trace.params = [ParamTrace("bn.weight", "bn", (8,), trainable, True, norm=1.0, std=0.0,
                               grad_norm=0.1)]
    trace.train_flags = [{"step": 0, "model_training": model_training, "eval_modules": ["bn"]}]
    [found] = run("TL103", trace)
    assert (found.fix == EVAL_MODE_FIX) is told
    if told:  # kept in eval on purpose: inside a frozen submodule then, or by a train() override
        trace.train_flags[0]["frozen_eval"] = ["bn"]
        assert run("TL103", trace)[0].fix != EVAL_MODE_FIX
        trace.train_flags[0]["frozen_eval"] = []
        trace.modules["bn"].attrs["overrides_train"] = True
        assert run("TL103", trace)[0].fix != EVAL_MODE_FIX


@pytest.mark.parametrize("scale, named", [(NORM_WEIGHT_COLLAPSED * 0.99, True),
                                          (NORM_WEIGHT_COLLAPSED * 1.01, False), (0.0, False)])
def test_tl103_names_norm_layers_whose_scale_starts_near_zero(scale: float, named: bool) -> None:
    """transformers' EfficientNet draws its BatchNorm weights from N(0, 0.02): each norm
    scales its output down ~50x, and no single drop stands out. Measured: Kaiming on every
    conv (the generic fix) leaves the last block at 2e-10 of the stem; BatchNorm weights at 1
    train. A scale of exactly 0 is a residual branch's zero init, not this."""
    trace = depth_trace(profile("TL103", RULES["TL103"].defaults["min_ratio"] / 10))
    trace.modules["bn"] = facts("bn", "BatchNorm2d", num_features=16)
    trace.layers.insert(1, point("bn", "BatchNorm2d", 0))  # on the path, before the decay
    bn_weight = ParamTrace("bn.weight", "bn", (16,), True, True, norm=scale * 4.0, std=0.0,
                           grad_norm=0.1, norms_before=[scale * 4.0])  # RMS: norm / sqrt(16)
    trace.params = [bn_weight]
    [found] = run("TL103", trace)
    assert ("nn.init.ones_(norm.weight)" in found.fix) is named
    assert ("xavier_normal_" in found.fix) is not named
    late = trace.layers.pop(1)  # after the decay (before a head): not its cause
    late.depth = 100
    trace.layers.append(late)
    assert "xavier_normal_" in run("TL103", trace)[0].fix


def test_tl103_fix_matches_the_init_to_the_hidden_nonlinearity_not_to_gates() -> None:
    """SE blocks' sigmoid gates, multiplied into the features, may outnumber the ReLUs: the
    init fix follows the hidden layers' ReLUs all the same."""
    trace = depth_trace(profile("TL103", RULES["TL103"].defaults["min_ratio"] / 10),
                        kind="relu")
    for i in range(4):  # one more gate than ReLUs, early in the profile
        gate = point(f"g{i}", "Sigmoid", 0, kind="sigmoid")
        trace.layers.insert(1, gate)
        trace.modules[gate.module] = facts(gate.module, "Sigmoid")
        trace.edges.append(Edge(gate.node, ("op", "mul")))
    [found] = run("TL103", trace)
    assert "kaiming_normal_" in found.fix


def test_tl103_says_nothing_of_layers_all_nan() -> None:
    """A NaN made mid-network fills every layer after it: their finite moments are of no
    value at all (RMS 0), which is TL504's, not a decay (merged over the run, as a check's
    steps that all held NaN leave them)."""
    t = RULES["TL103"].defaults
    trace = depth_trace(profile("TL103", 0.0))
    for lt in trace.layers[t["window"]:]:
        lt.activation.nonfinite = lt.activation.count
    assert run("TL103", trace) == []
    partly = depth_trace(profile("TL103", t["min_ratio"] / 10))
    for lt in partly.layers[t["window"]:]:
        lt.activation.nonfinite = 1  # a few NaN beside finite values that decayed
    assert run("TL103", partly)


def _stack_trace(layers: list, extra_edges: list, output: LayerTrace,
                 ends: tuple = ()) -> RunTrace:
    """A stack of ``layers`` (each feeding the next, but the ``ends``, which feed only
    ``extra_edges``) and the model's ``output``."""
    layers = layers + [output]
    modules = {lt.module: facts(lt.module, lt.type) for lt in layers}
    edges = [Edge(a.node, ("module", b.module)) for a, b in zip(layers, layers[1:])
             if a.module not in ends]
    return RunTrace(layers=layers, modules=modules, edges=edges + extra_edges,
                    output_ops=((output.node, ()),))


def _branches(stream_layers: int) -> tuple:
    """``stream_layers`` layers at RMS 1, then 4 blocks whose fc reads the stream (RMS 1) and
    whose out (RMS min_ratio / 10) is the branch's last layer; the head."""
    r = RULES["TL103"].defaults["min_ratio"]
    layers = [point(f"a{i}", "Linear" if i % 2 == 0 else "Tanh", i,
                    kind=None if i % 2 == 0 else "tanh") for i in range(stream_layers)]
    outs = []
    for i in range(4):
        layers.append(point(f"b{i}.fc", "Linear", 10 + 2 * i))
        outs.append(point(f"b{i}.out", "Linear", 11 + 2 * i, activation=act(r / 10)))
        layers.append(outs[-1])
    return layers, outs, point("head", "Linear", 20)


def test_tl103_leaves_out_residual_branches_last_layers() -> None:
    """GPT-2's and ModernBERT's inits start each residual branch's last projection small on
    purpose: it is the branch's share of the stream, not the stream, which the skip carries
    (the next block's layers read it)."""
    layers, outs, head = _branches(2)
    ends = tuple(lt.module for lt in outs)
    assert run("TL103", _stack_trace(layers, [], head))  # a plain stack: a decay
    sums = [Edge(lt.node, ("sum", "add"), ("add",)) for lt in outs]
    assert run("TL103", _stack_trace(layers, sums, head, ends)) == []
    via_dropout = [Edge(lt.node, ("sum", "add"), ("dropout", "add")) for lt in outs]
    assert run("TL103", _stack_trace(layers, via_dropout, head, ends)) == []
    scaled = [Edge(lt.node, ("sum", "add"), ("mul", "add")) for lt in outs]
    assert run("TL103", _stack_trace(layers, scaled, head, ends))  # scaled first: not right away
    assert run("TL103", _stack_trace(layers, sums, head))  # also read on: the stream itself


def test_tl103_judges_branch_outputs_where_they_are_all_that_shows_the_stream() -> None:
    """x = (x + lin(x)) / sqrt(2) sixteen times with small branch weights: every weight layer
    after the stem feeds only a sum, and the stream decays 0.58 -> 5e-4 (SGD stays at
    chance). Left out, they would leave fewer than min_layers to judge: they stand for the
    stream."""
    layers, outs, head = _branches(0)
    ends = tuple(lt.module for lt in outs)
    sums = [Edge(lt.node, ("sum", "add"), ("add",)) for lt in outs]
    short = [lt for lt in layers if lt not in outs]
    assert len(short) < RULES["TL103"].defaults["min_layers"] <= len(layers)
    assert run("TL103", _stack_trace(layers, sums, head, ends))


def _cls_head(head_rms: float, signal: float = 1e-5, via: tuple = ("__getitem__",)) -> RunTrace:
    """Six stream layers at between-sample RMS 1, a final norm (RMS 1), then a head that
    takes its [CLS] position: its output of RMS ``head_rms``, between-sample RMS ``signal``."""
    def stats(rms: float, between: float) -> ActivationStats:
        return replace(act(rms), signal=between)

    layers = [point(f"l{i}", "Linear" if i % 2 == 0 else "GELU", i, kind="gelu" if i % 2 else None,
                    activation=stats(1.0, 1.0)) for i in range(6)]
    norm = point("norm", "LayerNorm", 6, activation=stats(1.0, 1.0))
    dense = point("head.dense", "Linear", 7, activation=stats(head_rms, signal))
    tanh = point("head.act", "Tanh", 8, kind="tanh", activation=stats(head_rms, signal))
    out = point("head.out", "Linear", 9, activation=stats(1.0, signal))
    layers = layers + [norm, dense, tanh]
    modules = {lt.module: facts(lt.module, lt.type) for lt in layers + [out]}
    edges = [Edge(a.node, ("module", b.module)) for a, b in zip(layers[:6], layers[1:7])]
    edges += [Edge(norm.node, ("module", "head.dense"), via),
              Edge(dense.node, ("module", "head.act")), Edge(tanh.node, ("module", "head.out"))]
    return RunTrace(layers=layers + [out], modules=modules, edges=edges,
                    output_ops=((out.node, ()),))


@pytest.mark.parametrize("kept, fires", [(1.01, False), (0.99, True)])
def test_tl103_a_cls_token_that_does_not_differ_yet_is_no_decay(kept: float, fires: bool) -> None:
    """ModernBERT at init: the stream carries the signal (between-sample RMS 0.98), but the
    [CLS] position the head takes barely differs between samples (3e-4) until the residual
    branches grow, while the head's output keeps its RMS. A head whose own output shrinks
    below ``min_ratio`` of what it takes is a decay."""
    r = RULES["TL103"].defaults["min_ratio"]
    assert bool(run("TL103", _cls_head(kept * r))) is fires
    assert run("TL103", _cls_head(1.0, via=()))  # no position picked: a decay


@pytest.mark.parametrize("share, same", [(IDENTICAL * 0.5, True), (IDENTICAL * 2, False)])
def test_tl103_a_picked_position_the_same_for_every_sample_is_reported(share: float,
                                                                       same: bool) -> None:
    """A causal LM's classifier reading position 0 (BOS, which sees no other token): its
    input is the same for every sample (between-sample RMS exactly 0, measured), so the run
    stays at chance. Reported, with a fix that reads the last real token instead."""
    found = run("TL103", _cls_head(1.0, signal=share))
    assert bool(found) is same
    if same:
        assert found[0].module == "head.dense"
        assert "hold the same values for every sample" in found[0].fix
        assert "lengths - 1" in found[0].fix


def test_tl103_needs_min_layers_and_ignores_the_model_output() -> None:
    t = RULES["TL103"].defaults
    scales = profile("TL103", t["min_ratio"] / 100)[: t["min_layers"] - 1]
    assert run("TL103", depth_trace(scales)) == []
    flat = [1.0] * max(t["min_layers"], 2 * t["window"])
    assert run("TL103", depth_trace(flat, head=1e-9)) == []


def test_tl103_leaves_out_weight_layers_zero_initialized_on_purpose() -> None:
    """adaLN-Zero: each block's modulation Linear starts at weight 0 and outputs 0 at step 0,
    beside a main path at full scale; a Linear whose small output is not its init's is
    judged."""
    t = RULES["TL103"].defaults
    n = max(t["min_layers"], 2 * t["window"]) + 3  # odd: the last layer is a Linear
    scales = [1.0] * t["window"] + [0.0 if i % 2 == 0 else 1.0 for i in range(t["window"], n)]
    trace = depth_trace(scales)
    assert run("TL103", trace)
    zeros = [lt.module for lt in trace.layers if lt.activation.rms == 0.0]
    trace.params = [ParamTrace(f"{m}.weight", m, (8, 8), True, True, norm=0.0, std=0.0,
                               grad_norm=1.0, norms_before=[0.0]) for m in zeros]
    assert run("TL103", trace) == []
    trace.params = [ParamTrace(f"{m}.weight", m, (8, 8), True, True, norm=1e-4, std=1e-5,
                               grad_norm=1.0, norms_before=[1e-4]) for m in zeros]
    assert run("TL103", trace)


def test_tl103_threshold_override() -> None:
    r = RULES["TL103"].defaults["min_ratio"]
    trace = depth_trace(profile("TL103", r * 5))
    assert run("TL103", trace) == []
    assert len(run("TL103", trace, min_ratio=r * 10)) == 1
    short = depth_trace([1.0, 1.0, r / 10, r / 10])
    assert len(run("TL103", short, min_layers=4, window=2)) == 1


def test_tl104_at_the_edges_of_max_ratio() -> None:
    r = RULES["TL104"].defaults["max_ratio"]
    assert run("TL104", depth_trace(profile("TL104", r), kind="relu")) == []
    [above] = run("TL104", depth_trace(profile("TL104", np.nextafter(r, math.inf)),
                                       kind="relu"))
    assert above.module == str(RULES["TL104"].defaults["window"])
    assert above.evidence["ratio"] > r and f"threshold {r:g}" in above.message
    assert "kaiming_normal_" in above.fix


def test_tl103_decay_that_came_with_training_points_at_the_learning_rate() -> None:
    """Within the threshold at the first observed step, past it at a later one (a warm-up
    that rose too far and killed a layer): the fix is the learning rate, not the init."""
    r = RULES["TL103"].defaults["min_ratio"]
    trace = depth_trace(profile("TL103", 1.0), kind="relu")

    def at(step: int, scales: list) -> dict:
        return {"step": step, "layers": {lt.node[1:]: {"std": v, "mean": 0.0}
                                         for lt, v in zip(trace.layers, scales)}}

    trace.per_step = [at(0, profile("TL103", r * 2)), at(130, profile("TL103", r / 10))]
    [decayed] = run("TL103", trace)
    assert decayed.evidence["step"] == 130
    assert "came with training (within the threshold at step 0)" in decayed.fix
    assert "lower the learning rate" in decayed.fix and "kaiming" not in decayed.fix
    trace.per_step = [at(0, profile("TL103", r / 10))]
    [from_start] = run("TL103", trace)
    assert "kaiming_normal_" in from_start.fix


@pytest.mark.parametrize("mode, last, fires", [
    ("monitor", 1.01, False), ("monitor", 0.99, True), ("check", 1.01, True)])
def test_tl103_a_decay_training_escaped_in_a_monitor_run(mode: str, last: float,
                                                         fires: bool) -> None:
    """A VQ-VAE with its codebook at uniform(±1/K): the decoder's between-sample scale starts
    at 0.0046x the encoder's and is 0.39 of its own by step 200 (loss 0.638 -> 0.083,
    measured). A Monitor run whose profiles over the last half of its steps are back within
    the threshold is not reported; a check's few steps say nothing of where the run goes."""
    r = RULES["TL103"].defaults["min_ratio"]
    trace = depth_trace(profile("TL103", 1.0), kind="relu")
    trace.mode = mode

    def at(step: int, scales: list) -> dict:
        return {"step": step, "layers": {lt.node[1:]: {"std": v, "mean": 0.0}
                                         for lt, v in zip(trace.layers, scales)}}

    trace.per_step = [at(0, profile("TL103", r / 10)), at(10, profile("TL103", r / 2)),
                      at(100, profile("TL103", r * 1.5)), at(190, profile("TL103", r * last))]
    assert bool(run("TL103", trace)) is fires


def test_tl103_a_decay_escaped_only_at_the_end_is_reported() -> None:
    """A 10-layer tanh MLP at N(0, 0.05) under SGD: decayed (3e-4 to 2e-3) for 1800 of 2200
    steps, escaping near the end; accuracy 0.319 against Xavier's 0.593 (measured)."""
    r = RULES["TL103"].defaults["min_ratio"]
    trace = depth_trace(profile("TL103", 1.0), kind="tanh")
    trace.mode = "monitor"
    trace.per_step = [{"step": s, "layers": {lt.node[1:]: {"std": v, "mean": 0.0} for lt, v in
                                             zip(trace.layers, profile("TL103", deep))}}
                      for s, deep in ((0, r / 30), (600, r / 10), (1200, r / 5), (1800, r / 2),
                                      (2199, r * 60))]
    [found] = run("TL103", trace)
    assert found.evidence["step"] == 0

def _ending_in(kind: str, target: TargetTrace, via: tuple = ()) -> RunTrace:
    """A Linear, then ``kind`` as the model's output (8, 16), which a comparing loss set
    against ``target`` (read through ``via``)."""
    head = point("head", "Linear", 0)
    last = point("out", kind.capitalize(), 1, kind=kind)
    target.origin = (last.node, via)
    return RunTrace(layers=[head, last], modules={"head": facts("head", "Linear"),
                                                  "out": facts("out", kind.capitalize())},
                    edges=[Edge(head.node, ("module", "out"))], output_ops=((last.node, ()),),
                    targets=[target], loss_kind="mse")


def _target(below: float = 0.0, above: float = 0.0, far: float = 0.0,
            low: Optional[float] = None) -> TargetTrace:
    if low is None:
        low = -2.0 if far else (-1.0 if below else 0.0)
    return TargetTrace("the loss's targets", (8, 16), low, 2.0 if above else 1.0, below, above,
                       far)


@pytest.mark.parametrize("share, fires", [(OUT_OF_RANGE * 0.99, False),
                                          (OUT_OF_RANGE * 1.01, True)])
def test_tl102_output_activation_that_cannot_reach_the_targets(share: float,
                                                                fires: bool) -> None:
    """A decoder ending in sigmoid trained with MSE on images scaled to [-1, 1] (88% of the
    pixels below 0): MSE 0.285 against tanh's 0.090 on the same task (measured)."""
    assert bool(run("TL102", _ending_in("sigmoid", _target(below=share)))) is fires
    assert bool(run("TL102", _ending_in("sigmoid", _target(above=share)))) is fires
    assert bool(run("TL102", _ending_in("relu", _target(below=share)))) is fires
    assert bool(run("TL102", _ending_in("tanh", _target(far=share)))) is fires
    assert run("TL102", _ending_in("tanh", _target(below=share))) == []  # tanh reaches -0.5
    assert run("TL102", _ending_in("relu", _target(above=share))) == []
    if fires:
        [found] = run("TL102", _ending_in("sigmoid", _target(below=share)))
        assert found.module == "out" and "whose range is (0, 1)" in found.message
        assert "nn.Tanh()" in found.fix


@pytest.mark.parametrize("reach, fires", [(OUT_OF_REACH * 0.99, False),
                                           (OUT_OF_REACH * 1.01, True)])
def test_tl102_targets_just_past_a_bound_are_noise_not_a_mismatch(reach: float,
                                                                  fires: bool) -> None:
    """Targets relu(f(x)) + noise of std 0.05: 25% just below 0 (min -0.156 against a span
    of ~2); the ReLU head gave the best test MSE of three heads (measured). The targets must
    reach ``OUT_OF_REACH`` of their span beyond the range."""
    span = 2.0
    low = -reach * span
    target = TargetTrace("the loss's targets", (8, 16), low, low + span, 0.25, 0.0, 0.0)
    assert bool(run("TL102", _ending_in("relu", target))) is fires


def test_tl102_output_range_needs_the_loss_to_read_the_bounded_output_as_it_is() -> None:
    """A loss reading ``out * 2 - 1`` (or a blend of outputs) compares something else."""
    assert run("TL102", _ending_in("sigmoid", _target(below=0.5), via=("mul", "sub"))) == []
    assert run("TL102", _ending_in("sigmoid", _target(below=0.5), via=("view",)))
    unread = _ending_in("sigmoid", _target(below=0.5))
    unread.targets[0].origin = None  # the loss read no output as it is
    assert run("TL102", unread) == []


def _codebook_trace(scales: list, lookup: float, after: int = 2,
                    type_: str = "Embedding") -> RunTrace:
    """A depth series at ``scales`` (step 0) with an Embedding lookup of scale ``lookup``
    observed between series layers ``after`` and ``after + 1`` (a VQ-VAE's codebook); with
    ``type_`` "AvgPool2d", a pooling there instead (no parameters)."""
    trace = depth_trace(scales, kind="relu")
    for lt in trace.layers:
        lt.depth *= 2
    code = point("vq.emb", type_, 2 * after + 1, activation=act(lookup))
    trace.layers.append(code)
    trace.modules["vq.emb"] = facts("vq.emb", type_)
    if type_ == "Embedding":
        trace.params = [ParamTrace(name="vq.emb.weight", module="vq.emb", shape=(64, 16),
                                   requires_grad=True, in_optimizer=True, norm=0.1, std=0.01,
                                   grad_norm=1e-3)]
    layers = {lt.node[1:]: {"std": v, "mean": 0.0} for lt, v in zip(trace.layers, scales)}
    layers[code.node[1:]] = {"std": lookup, "mean": 0.0}
    trace.per_step = [{"step": 0, "layers": layers}]
    return trace


@pytest.mark.parametrize("share, named", [(0.98, True), (1.02, False)])
def test_tl103_names_the_point_where_the_signal_falls(share: float, named: bool) -> None:
    """Encoder at scale 1, a codebook lookup at ~0.01, a decoder at 0.005: the drop is the
    lookup's. Named when its scale is past the geometric middle of the drop."""
    window = RULES["TL103"].defaults["window"]
    scales = [1.0] * window + [0.005] * window
    midway = math.sqrt(1.0 * 0.005)
    [found] = run("TL103", _codebook_trace(scales, share * midway))
    assert (found.module == "vq.emb") is named
    assert ("'vq.emb' (Embedding) outputs a scale of" in found.fix) is named
    assert ("kaiming_normal_" in found.fix) is not named


def test_tl103_a_pooling_where_the_signal_falls_is_not_named() -> None:
    """Averaging over positions lowers the between-sample scale; no init sets it."""
    window = RULES["TL103"].defaults["window"]
    [found] = run("TL103", _codebook_trace([1.0] * window + [0.005] * window, 0.01,
                                           type_="AvgPool2d"))
    assert found.module != "vq.emb" and "kaiming_normal_" in found.fix


@pytest.mark.parametrize("dead, fires", [(MOSTLY_DEAD - 0.01, True), (MOSTLY_DEAD, False)])
def test_tl103_a_signal_stopped_by_dead_relus_is_tl101s(dead: float, fires: bool) -> None:
    """All but a few units of a ReLU layer dead (a bias of -5): the signal after it is ~0.
    TL101 names the layer and its fix; TL103's init advice would not help."""
    window = RULES["TL103"].defaults["window"]
    trace = depth_trace([1.0] * window + [1e-4] * window, kind="relu")
    relu = trace.layers[window]  # an activation (odd index): the first layer below
    assert relu.kind == "relu"
    active = np.ones(100, dtype=bool)
    active[:round(dead * 100)] = False
    relu.unit_ever_active, relu.unit_dim = active, -1
    assert bool(run("TL103", trace)) is fires


@pytest.mark.parametrize("scale, fires", [(1.1 * RESCALED, False), (0.9 * RESCALED, True)])
def test_tl103_a_norm_that_brings_a_huge_first_layer_back_to_scale(scale: float,
                                                                   fires: bool) -> None:
    """A qkv projection at std 30 (output 240), then LayerNorm to ~1 and on: no signal
    vanishes, the first layer is too large. A norm whose output stays small (a gamma near 0)
    is where the signal falls."""
    window = RULES["TL103"].defaults["window"]
    trace = _codebook_trace([240.0] * window + [scale] * window, scale)
    trace.layers[-1].type = trace.layers[-1].base = "LayerNorm"
    trace.modules["vq.emb"] = facts("vq.emb", "LayerNorm")
    trace.params[0].name, trace.params[0].shape = "vq.emb.weight", (16,)
    found = run("TL103", trace)
    assert bool(found) is fires
    if fires:
        assert found[0].module == "vq.emb" and "a norm layer's scale: 1" in found[0].fix


def test_tl103_a_gradual_decay_names_no_point() -> None:
    """Each layer at 0.45x the one before: no single drop of 10x, so the lookup between two
    of them is not the cause, whatever its own scale."""
    window = RULES["TL103"].defaults["window"]
    scales = [1.0] * window + [0.45 ** k for k in range(1, 8)]
    steep = math.sqrt(RULES["TL103"].defaults["min_ratio"])
    assert min(b / a for a, b in zip(scales, scales[1:])) > steep
    [found] = run("TL103", _codebook_trace(scales, 1e-4, after=window))
    assert found.module != "vq.emb" and "kaiming_normal_" in found.fix


def test_tl104_growth_that_came_with_training_points_at_the_learning_rate() -> None:
    """Within the threshold at the first observed step, past it at a later one (a learning
    rate that blew the weights up): the fix is the learning rate, not the init."""
    r = RULES["TL104"].defaults["max_ratio"]
    trace = depth_trace(profile("TL104", 1.0), kind="relu")

    def at(step: int, scales: list) -> dict:
        return {"step": step, "layers": {lt.node[1:]: {"std": v, "mean": 0.0}
                                         for lt, v in zip(trace.layers, scales)}}

    trace.per_step = [at(0, profile("TL104", r / 2)), at(5, profile("TL104", r * 10))]
    [grew] = run("TL104", trace)
    assert grew.evidence["step"] == 5
    assert "lower the learning rate" in grew.fix and "kaiming" not in grew.fix
    trace.per_step = [at(0, profile("TL104", r * 10))]
    [from_start] = run("TL104", trace)
    assert "kaiming_normal_" in from_start.fix


@pytest.mark.parametrize("last, unbounded", [(-1010.0, True), (-990.0, False)])
def test_tl104_growth_with_a_loss_falling_without_bound_points_at_its_sign(last, unbounded):
    """A VAE whose KL term is subtracted: the decoder's RMS grew 1e7x with training while the
    loss fell to -5.6e21, and the fix read 'lower the learning rate'. Measured: lr/10 still
    reached -1.3e20, clipping -inf; the sign is the fix. Without TL604's fall without bound
    (above -1000x the start) the rate stays the fix."""
    r = RULES["TL104"].defaults["max_ratio"]
    trace = depth_trace(profile("TL104", 1.0), kind="relu")
    trace.mode = "monitor"
    scales = [r / 2, r * 10, r * 10, r * 10]
    trace.per_step = [
        {"step": 50 * i, "loss_mean": loss,
         "layers": {lt.node[1:]: {"std": v, "mean": 0.0}
                    for lt, v in zip(trace.layers, profile("TL104", scale))}}
        for i, (scale, loss) in enumerate(zip(scales, [1.0, 0.5, last / 20, last]))]
    [grew] = run("TL104", trace)
    assert grew.evidence["grew_in_training"]
    assert ("fix the loss first (a term with the wrong sign" in grew.fix) is unbounded
    assert ("lower the learning rate (TL503)" in grew.fix) is not unbounded


@pytest.mark.parametrize("branches", [1, 2])
def test_tl104_growth_at_init_along_a_residual_stream_names_the_branches_scale(branches):
    """Two branch ends or more (their outputs go only into sums): the stream grows block after
    block whatever each layer's init, so the fix is the branches' scale or pre-norm; one is no
    stream of blocks."""
    grown = RULES["TL104"].defaults["max_ratio"] * 10
    trace = depth_trace([1.0] * 6 + [grown] * 4, kind="relu")  # past it from layer 6 on
    ends = [lt for lt in trace.layers if lt.kind == "relu"][:branches]  # at depths 1, 3
    trace.edges = [e for e in trace.edges if e.src not in {lt.node for lt in ends}]
    trace.edges += [Edge(lt.node, ("sum", "add"), ("add",)) for lt in ends]
    [found] = run("TL104", trace)
    residual = branches > 1
    assert (f"each of the {branches} residual branches" in found.fix) is residual
    assert (f"1/sqrt({branches})" in found.fix) is residual
    assert ("kaiming_normal_" in found.fix) is not residual


def test_tl104_growth_in_a_plain_trunk_before_residual_blocks_names_the_init():
    """A 10-layer plain trunk at 2.5x Kaiming, then two healthy residual blocks: the growth
    is the trunk's (measured: the branch fix left it at 2.4e4 and the loss NaN, Kaiming
    trained to 0.94). Branch ends after the first layer past the threshold do not count."""
    grown = RULES["TL104"].defaults["max_ratio"] * 10
    trace = depth_trace([1.0] * 3 + [grown] * 7, kind="relu")  # past it from layer 3 on
    ends = [lt for lt in trace.layers if lt.kind == "relu"][-2:]  # at depths 7, 9
    trace.edges = [e for e in trace.edges if e.src not in {lt.node for lt in ends}]
    trace.edges += [Edge(lt.node, ("sum", "add"), ("add",)) for lt in ends]
    [found] = run("TL104", trace)
    assert "kaiming_normal_" in found.fix and "residual" not in found.fix


def test_tl104_fp16_range() -> None:
    frac = RULES["TL104"].defaults["fp16_fraction"]
    limit = frac * FP16_MAX
    few = RULES["TL104"].defaults["min_layers"] - 1

    def trace(peak: float) -> RunTrace:
        t = depth_trace([1.0] * few, kind="relu")
        t.layers[2].activation = act(1.0, peak=peak)
        return t

    assert run("TL104", trace(np.nextafter(limit, 0))) == []
    [at] = run("TL104", trace(limit))
    assert at.module == "2" and at.evidence["threshold"] == limit
    assert f"{frac:.0%} of the float16 maximum" in at.message
    [beyond] = run("TL104", trace(FP16_MAX * 300))  # a float32 run far past float16's range
    assert "300x the float16 maximum" in beyond.message
    nonfinite = trace(limit)
    nonfinite.layers[2].activation.nonfinite = 4
    assert run("TL104", nonfinite) == []
    assert run("TL104", trace(limit), fp16_fraction=frac * 2) == []


def test_tl104_fp16_range_of_a_layer_fed_raw_input_names_the_input() -> None:
    few = RULES["TL104"].defaults["min_layers"] - 1
    t = depth_trace([1.0] * few, kind="relu")
    t.layers[0].activation = act(1.0, peak=5e9)
    t.inputs = [raw_input(3.5e9)]
    t.edges.append(Edge(("input", "ts"), ("module", t.layers[0].module), ("unsqueeze",)))
    [found] = run("TL104", t)
    assert "standardize the model's input 'ts' (RMS 3.5e+09)" in found.fix
    assert "float32/bfloat16" in found.fix and "Kaiming" not in found.fix


@pytest.mark.parametrize("growth", [GREW * 0.99, GREW * 1.01])
def test_tl104_fp16_range_reached_in_training_points_at_the_learning_rate(growth) -> None:
    """A loss summed over a batch of 2048 at SGD 0.01: the weights blew up (std 1e4 against
    Kaiming's 0.18) and a layer reached 1.2e5, from an RMS at step 0 well inside the range.
    Kaiming init with the summed loss still ended at CE 17.6, lr / 10 trained (measured).
    Where the layer's RMS grew past ``GREW`` x its first, the fix is the rate; TL503 then
    does not send the user to the init."""
    few = RULES["TL104"].defaults["min_layers"] - 1
    t = depth_trace([1.0] * few, kind="relu")
    t.layers[2].activation = act(1.0, peak=FP16_MAX * 2)
    with_steps(t, [1.0] * few, [growth] * few)
    t.params = [param(f"{i}.weight", (8, 8), ratios=(2.0, 2.0)) for i in range(3)]
    [found] = run("TL104", t)
    grew = growth > GREW
    assert found.evidence["grew_in_training"] is grew
    assert ("lower the learning rate" in found.fix) is grew
    assert ("rescale the layer's init" in found.fix) is not grew
    [rate] = run("TL503", t)
    assert ("fix that first (TL104" in rate.fix) is not grew


@pytest.mark.parametrize("last, unbounded", [(-1010.0, True), (-990.0, False)])
def test_tl104_fp16_range_reached_as_the_loss_falls_without_bound_points_at_its_sign(
        last, unbounded) -> None:
    """The float16-range branch, as the depth one: with the loss falling without bound
    (TL604), the magnitudes follow the loss's sign, not the rate."""
    few = RULES["TL104"].defaults["min_layers"] - 1
    t = depth_trace([1.0] * few, kind="relu")
    t.mode = "monitor"
    t.layers[2].activation = act(1.0, peak=FP16_MAX * 2)
    with_steps(t, [1.0] * few, *[[GREW * 2] * few] * 3)
    for s, loss in zip(t.per_step, [1.0, 0.5, last / 20, last]):
        s["loss_mean"] = loss
    [found] = run("TL104", t)
    assert found.evidence["grew_in_training"]
    assert ("fix the loss first (a term with the wrong sign" in found.fix) is unbounded
    assert ("lower the learning rate" in found.fix) is not unbounded


@pytest.mark.parametrize("start, init", [(0.9, False), (1.1, True)])
def test_tl104_fp16_range_already_reached_at_the_first_step_is_the_inits(start, init) -> None:
    """An MLP at normal(std=1): its output peaked at 2.45e4 at step 0, past the bound, and
    grew 19x after; cutting the rate 10-100x with clipping left CE at 8.6e3, the default init
    reached 1.96 (measured). The first step's peak is the run's scaled by the RMS; past the
    bound there, the fix is the init."""
    few = RULES["TL104"].defaults["min_layers"] - 1
    limit = RULES["TL104"].defaults["fp16_fraction"] * FP16_MAX
    growth = GREW * 2
    t = depth_trace([1.0] * few, kind="relu")
    t.layers[2].activation = act(1.0, peak=limit * growth * start)
    with_steps(t, [1.0] * few, [growth] * few)
    [found] = run("TL104", t)
    assert found.evidence["grew_in_training"] is not init
    assert ("rescale the layer's init" in found.fix) is init


def test_tl104_threshold_override() -> None:
    r = RULES["TL104"].defaults["max_ratio"]
    trace = depth_trace(profile("TL104", r / 2), kind="relu")
    assert run("TL104", trace) == []
    assert len(run("TL104", trace, max_ratio=r / 4)) == 1


def with_steps(trace: RunTrace, *profiles: list, bad: dict | None = None) -> RunTrace:
    """Per-step RMS profiles (mean 0, so RMS = std) for the trace's layers, in order."""
    for step, scales in enumerate(profiles):
        layers = {lt.node[1:]: {"std": s, "mean": 0.0} for lt, s in zip(trace.layers, scales)}
        nonfinite = {"activations": (bad or {}).get(step, {})}
        trace.per_step.append({"step": step, "layers": layers, "nonfinite": nonfinite})
    return trace


@pytest.mark.parametrize("code", ["TL103", "TL104"])
def test_depth_profile_is_judged_per_step(code: str) -> None:
    t = RULES[code].defaults
    limit = t["min_ratio"] if code == "TL103" else t["max_ratio"]
    bad = profile(code, limit / 10 if code == "TL103" else limit * 10)
    good = profile(code, 1.0)
    flat = depth_trace(good, kind="relu")  # merged statistics: no trend at all
    [finding] = run(code, with_steps(flat, good, [2 * s for s in bad]))
    assert finding.evidence["step"] == 1 and "at step 1:" in finding.message  # 0-based
    assert finding.evidence["first_rms"] == pytest.approx(2.0)
    quiet = with_steps(depth_trace(good, kind="relu"), good, good)
    assert run(code, quiet) == []


def test_steps_with_nonfinite_activations_are_not_judged() -> None:
    bad = profile("TL104", RULES["TL104"].defaults["max_ratio"] * 10)
    good = profile("TL104", 1.0)
    trace = depth_trace(good, kind="relu")
    deepest = trace.layers[-1].node[1:]
    with_steps(trace, good, bad, bad=({1: {deepest: 5}}))
    assert run("TL104", trace) == []


def test_tl103_judges_the_between_sample_signal_when_measured() -> None:
    """Outputs that are only their (input-independent) biases have a flat RMS but no signal."""
    r = RULES["TL103"].defaults["min_ratio"]
    flat_rms = [1.0] * len(profile("TL103", 1.0))
    faded = profile("TL103", r / 10)
    trace = depth_trace(flat_rms)
    for step in range(2):
        layers = {lt.node[1:]: {"std": 1.0, "mean": 0.0, "signal": s}
                  for lt, s in zip(trace.layers, faded)}
        trace.per_step.append({"step": step, "layers": layers, "nonfinite": {}})
    [hit] = run("TL103", trace)
    assert hit.evidence["ratio"] == pytest.approx(r / 10)
    for step in trace.per_step:  # one layer without a signal (batch of one): RMS decides
        next(iter(step["layers"].values())).pop("signal")
    assert run("TL103", trace) == []
