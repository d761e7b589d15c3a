"""TL301 init-scale-mismatch and TL302 loss-at-init on hand-built traces."""

from __future__ import annotations

import math

import pytest
import torch.nn as nn
from trainlint.rules import init, run
from trainlint.rules.init import LARGE_FEATURES

from tests.rules.tracekit import (
    defaults,
    edge,
    hits,
    module,
    param,
    point,
    steps,
    to_module,
    trace,
)
from trainlint.engine import Skip

GAINS = {kind: nn.init.calculate_gain(kind) for kind in ("relu", "tanh", "sigmoid")}
FAN_IN, FAN_OUT = 100, 50


def _stack(ratio: float, signal: float, *, prefix: str = "", depth: int = 0,
           kind: str = "relu", saturated: float = 0.0, feeder_type: str = "ReLU",
           residual: bool = False, act_type: str = "",
           gain: float = 0.0) -> tuple[list, list, list, dict]:
    """prev -> fc -> act -> fc2, with fc's weight at ``ratio`` × gain/sqrt(fan_in) before the
    first update and its pre-activation at ``signal`` × gain × (input RMS) at step 0
    (``act_type``: an activation module the probe gives no kind, with this ``gain``).
    Returns (layers, params, edges, step-0 layer stats)."""
    gain = gain or GAINS[kind]
    prev = point(f"{prefix}prev", feeder_type, depth=depth,
                 kind="relu" if feeder_type == "ReLU" else None)
    fc = point(f"{prefix}fc", "Linear", depth=depth + 1)
    act = point(f"{prefix}act", act_type or kind.capitalize(), depth=depth + 2,
                kind=None if act_type else kind, saturated=saturated)
    fc2 = point(f"{prefix}fc2", "Linear", depth=depth + 3)
    in_rms = 0.8
    rms = ratio * gain / math.sqrt(FAN_IN)
    weight = param(f"{prefix}fc.weight", (FAN_OUT, FAN_IN), ratios=(1e-3,),
                   norm_before=rms * math.sqrt(FAN_IN * FAN_OUT))
    edges = [to_module(prev, fc.module), to_module(fc, act.module), to_module(act, fc2.module)]
    if residual:
        edges.append(edge(fc2.node, ("module", "out"), ("add",)))
    first = {prev.node[1:]: {"std": in_rms, "mean": 0.0},
             fc.node[1:]: {"std": signal * gain * in_rms, "mean": 0.0}}
    return [prev, fc, act, fc2], [weight], edges, first


def _layer_trace(ratio: float, signal: float, first_step: int = 0, modules=None, **kwargs):
    layers, params, edges, first = _stack(ratio, signal, **kwargs)
    return trace(layers, modules, params=params, edges=edges,
                 per_step=[{"step": first_step, "layers": first}])


@pytest.mark.parametrize("factor, fires", [(1.02, False), (0.98, True)])
def test_tl301_small_weights_at_the_threshold(factor, fires):
    low = defaults("TL301")["min_ratio"]
    found = hits("TL301", _layer_trace(low * factor, low * factor))
    assert bool(found) is fires
    if fires:
        assert found[0].module == "fc"
        assert found[0].evidence["ratio"] == pytest.approx(low * factor)
        assert "kaiming_normal_" in found[0].fix


@pytest.mark.parametrize("factor, fires", [(0.98, False), (1.02, True)])
def test_tl301_large_weights_at_the_threshold(factor, fires):
    high = defaults("TL301")["max_ratio"]
    assert bool(hits("TL301", _layer_trace(high * factor, high * factor))) is fires


def test_tl301_a_weight_zero_initialized_on_purpose_is_not_judged():
    """The last layer of a RealNVP coupling net starts at 0 so the flow starts as the
    identity; any weight that is not exactly 0 is judged."""
    assert hits("TL301", _layer_trace(0.0, 0.0)) == []
    assert len(hits("TL301", _layer_trace(1e-6, 1e-6))) == 1


def test_tl301_needs_the_activations_to_show_it():
    low = defaults("TL301")["min_ratio"]
    assert hits("TL301", _layer_trace(low / 10, signal=1.0)) == []


@pytest.mark.parametrize("shift, fires", [(-0.01, False), (0.01, True)])
def test_tl301_large_tanh_weights_show_as_saturation(shift, fires):
    t = defaults("TL301")
    found = hits("TL301", _layer_trace(t["max_ratio"] * 2, signal=1.0, kind="tanh",
                                       saturated=t["saturated_fraction"] + shift))
    assert bool(found) is fires
    if fires:
        assert "calculate_gain('tanh')" in found[0].fix


@pytest.mark.parametrize("kwargs", [{"feeder_type": "LayerNorm"}, {"residual": True}])
def test_tl301_skips_normalized_and_residual_blocks(kwargs):
    low = defaults("TL301")["min_ratio"]
    assert hits("TL301", _layer_trace(low / 10, low / 10, **kwargs)) == []


@pytest.mark.parametrize("between", ["Dropout", "Identity"])
@pytest.mark.parametrize("norm_type, fires", [("LayerNorm", False), ("ReLU", True)])
def test_tl301_finds_the_norm_through_dropout_and_identity(between, norm_type, fires):
    """A classification head: LayerNorm -> Dropout -> dense -> tanh (the dense layer's input
    scale is the norm's, as without the Dropout)."""
    low = defaults("TL301")["min_ratio"]
    layers, params, edges, first = _stack(low / 10, low / 10, depth=1, feeder_type=between)
    before = point("before", norm_type, depth=0, kind="relu" if norm_type == "ReLU" else None)
    t = trace([before] + layers, params=params, edges=[to_module(before, "prev")] + edges,
              per_step=[{"step": 0, "layers": first}])
    assert bool(hits("TL301", t)) is fires


@pytest.mark.parametrize("add, fires", [(True, False), (False, True)])
def test_tl301_finds_the_residual_sum_through_dropout_and_identity(add, fires):
    """SegFormer's Mix-FFN: dwconv -> GELU -> Dropout -> fc2, the same Dropout again, then a
    drop path (nn.Identity at rate 0) -> + residual. The sum is three pass-through hops from
    the nonlinearity."""
    low = defaults("TL301")["min_ratio"]
    layers, params, edges, first = _stack(low / 10, low / 10)
    act, fc2 = layers[2], layers[3]
    drop, ident = point("drop", "Dropout", depth=4), point("ident", "Identity", depth=5)
    edges = [e for e in edges if e.src != act.node] + [
        to_module(act, "drop"), to_module(drop, "fc2"), to_module(fc2, "drop"),
        to_module(drop, "ident"), edge(ident.node, ("module", "out"), ("add",) if add else ())]
    t = trace(layers + [drop, ident], params=params, edges=edges,
              per_step=[{"step": 0, "layers": first}])
    assert bool(hits("TL301", t)) is fires


@pytest.mark.parametrize("layer_type", ["Linear", "ConvTranspose2d"])
@pytest.mark.parametrize("direction, fires_at_the_output", [("small", False), ("large", True)])
def test_tl301_at_the_models_output_only_too_large_weights_count(layer_type, direction,
                                                                fires_at_the_output):
    """fc -> tanh as the model's last op (DCGAN's generator: ConvTranspose2d at std 0.02,
    then tanh): a small scale there is no signal lost by later layers."""
    t = defaults("TL301")
    ratio = t["min_ratio"] / 2 if direction == "small" else t["max_ratio"] * 2
    layers, params, edges, first = _stack(ratio, ratio, kind="tanh")
    layers[1].type = layers[1].base = layer_type
    inside = trace(layers, params=params, edges=edges, per_step=[{"step": 0, "layers": first}])
    assert [h.module for h in hits("TL301", inside)] == ["fc"]
    last = trace(layers[:3], params=params, edges=edges[:2], output_ops=((layers[2].node, ()),),
                 per_step=[{"step": 0, "layers": first}])
    assert bool(hits("TL301", last)) is fires_at_the_output
    gate = trace(layers[:3], params=params, edges=[*edges[:2], edge(layers[2].node, ("op", "mul"))],
                 per_step=[{"step": 0, "layers": first}])  # an SE gate: read by a product only
    assert [h.module for h in hits("TL301", gate)] == ["fc"]


@pytest.mark.parametrize("at_the_output, fires", [(True, False), (False, True)])
def test_tl301_the_models_output_through_pooling_and_a_flatten(at_the_output, fires):
    """SqueezeNet's classifier: final conv at std 0.01 -> ReLU -> AdaptiveAvgPool2d -> flatten
    is the output (torchvision's deliberate small init); the same ReLU feeding more layers is
    judged."""
    low = defaults("TL301")["min_ratio"]
    layers, params, edges, first = _stack(low / 2, low / 2)
    act = layers[2]
    pool = point("pool", "AdaptiveAvgPool2d", depth=3)
    edges = [*edges[:2], to_module(act, "pool")]
    if at_the_output:
        output_ops = ((pool.node, ("flatten",)),)
    else:
        edges.append(to_module(pool, "fc2", ("flatten",)))
        output_ops = ((layers[3].node, ()),)
    t = trace([*layers, pool], params=params, edges=edges, output_ops=output_ops,
              per_step=[{"step": 0, "layers": first}])
    assert bool(hits("TL301", t)) is fires


def test_tl301_default_pytorch_init_passes():
    for kind, gain in GAINS.items():
        default = (1 / math.sqrt(3)) / gain  # kaiming_uniform_(a=sqrt(5)): std 1/sqrt(3 fan_in)
        assert hits("TL301", _layer_trace(default, default, kind=kind)) == []


@pytest.mark.parametrize("edge, nudge, fires", [(0, 0.98, True), (0, 1.02, False),
                                                (None, 1.0, False), (1, 0.98, False),
                                                (1, 1.02, True)])
def test_tl301_kaimings_fan_out_mode_passes(edge, nudge, fires):
    """torchvision's VGG/ResNet init, ``kaiming_normal_(mode='fan_out')``, on a stem conv from 1
    channel to 64 (3x3): std sqrt(2/576), 0.125x what its fan-in of 9 calls for. Within
    FAN_OUT_BAND of the fan-out scale it passes; outside, the ratio to fan-in decides."""
    shape = (64, 1, 3, 3)
    factor = nudge * (1.0 if edge is None else init.FAN_OUT_BAND[edge])
    std = factor * GAINS["relu"] / math.sqrt(init.fan_out(shape))
    ratio = std / (GAINS["relu"] / math.sqrt(init.fan_in(shape)))
    assert ratio < defaults("TL301")["min_ratio"]
    layers, params, edges, first = _stack(ratio, ratio)
    params = [param("fc.weight", shape, ratios=(1e-3,), norm_before=std * math.sqrt(576))]
    found = hits("TL301", trace(layers, params=params, edges=edges,
                                per_step=[{"step": 0, "layers": first}]))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["ratio"] == pytest.approx(ratio)


def test_tl301_fan_out_mode_means_nothing_where_fans_are_equal():
    """A square layer's fan-out scale is its fan-in scale: std 0.01 on 500-wide tanh layers
    is no known init."""
    low = defaults("TL301")["min_ratio"] / 2
    layers, params, edges, first = _stack(low, low)
    shape = (FAN_IN, FAN_IN)
    std = low * GAINS["relu"] / math.sqrt(FAN_IN)
    params = [param("fc.weight", shape, ratios=(1e-3,), norm_before=std * FAN_IN)]
    assert len(hits("TL301", trace(layers, params=params, edges=edges,
                                   per_step=[{"step": 0, "layers": first}]))) == 1


@pytest.mark.parametrize("act_type, attrs, gain, call", [
    ("LeakyReLU", {"negative_slope": 0.2}, nn.init.calculate_gain("leaky_relu", 0.2),
     "a=0.2, nonlinearity='leaky_relu'"),
    ("PReLU", {"init": 0.25}, nn.init.calculate_gain("leaky_relu", 0.25),
     "a=0.25, nonlinearity='leaky_relu'"),
    ("ELU", {"alpha": 1.0}, nn.init.calculate_gain("relu"), "nonlinearity='relu'"),
    ("SELU", {}, 1.0, "nonlinearity='linear'"),
])
def test_tl301_leaky_relu_prelu_elu_selu_modules(act_type, attrs, gain, call):
    t = defaults("TL301")
    modules = [module("act", act_type, **attrs)]
    for ratio in (t["min_ratio"] / 10, t["max_ratio"] * 10):
        found = hits("TL301", _layer_trace(ratio, ratio, act_type=act_type, gain=gain,
                                           modules=modules))
        assert found[0].evidence["ratio"] == pytest.approx(ratio) and call in found[0].fix
    for healthy in (1.0, (1 / math.sqrt(3)) / gain):  # its Kaiming; PyTorch's default init
        assert hits("TL301", _layer_trace(healthy, healthy, act_type=act_type, gain=gain,
                                          modules=modules)) == []


def test_tl301_skips_a_scale_that_the_next_layers_norm_cancels():
    """DCGAN's discriminator: conv (std 0.02) -> LeakyReLU -> conv -> BatchNorm."""
    t = defaults("TL301")
    low = t["min_ratio"] / 10
    layers, params, edges, first = _stack(low, low)
    bn = point("bn", "BatchNorm1d", depth=4)
    normed = trace(layers + [bn], params=params, edges=edges + [to_module(layers[-1], "bn")],
                   per_step=[{"step": 0, "layers": first}])
    assert hits("TL301", normed) == []
    assert hits("TL301", _layer_trace(low, low))
    layers, params, edges, first = _stack(t["max_ratio"] * 2, 1.0, kind="tanh",
                                          saturated=t["saturated_fraction"] * 2)
    saturated = trace(layers + [bn], params=params, edges=edges + [to_module(layers[-1], "bn")],
                      per_step=[{"step": 0, "layers": first}])
    assert hits("TL301", saturated)


def test_tl301_needs_the_first_step():
    with pytest.raises(Skip):
        hits("TL301", _layer_trace(0.01, 0.01, first_step=100))


def test_tl301_groups_layers_with_the_same_problem():
    low = defaults("TL301")["min_ratio"] / 10
    a_layers, a_params, a_edges, a_first = _stack(low, low, prefix="a.")
    b_layers, b_params, b_edges, b_first = _stack(low, low, prefix="b.", depth=10)
    merged = trace(a_layers + b_layers, params=a_params + b_params, edges=a_edges + b_edges,
                   per_step=[{"step": 0, "layers": {**a_first, **b_first}}])
    found = hits("TL301", merged)
    assert len(found) == 1
    assert found[0].module == "a.fc"
    assert found[0].evidence["layers"] == ["a.fc", "b.fc"]


def _loss_trace(loss: float, kind: str = "cross_entropy", classes=10, first=0):
    head = point("head", "Linear", depth=1, shape=(8, classes or 1))
    return trace([head], output_ops=((head.node, ()),), loss_kind=kind, num_classes=classes,
                 per_step=steps(loss, loss * 0.9, first=first))


@pytest.mark.parametrize("factor, fires", [(0.99, False), (1.01, True)])
def test_tl302_ratio_edge(factor, fires):
    ratio = defaults("TL302")["max_ratio"]
    found = hits("TL302", _loss_trace(factor * ratio * math.log(10)))
    assert bool(found) is fires
    if fires:
        assert found[0].module == "head"
        assert found[0].evidence["expected"] == pytest.approx(math.log(10))


def test_tl302_quotes_the_outputs_std_at_the_first_step():
    """The first loss is judged, so the logits' std quoted is the first step's, not the
    std merged over every observed step."""
    limits = defaults("TL302")
    t = _loss_trace(math.log(10) * limits["max_ratio"] + limits["max_excess"] + 1.0)
    t.layers[0].activation.std = 5.0  # merged over the steps
    t.per_step[0]["layers"] = {t.layers[0].node[1:]: {"std": 2.5, "mean": 0.0}}
    [found] = hits("TL302", t)
    assert "has std 2.5 at that step" in found.message
    t.per_step[0]["layers"] = {}
    [found] = hits("TL302", t)
    assert "has std" not in found.message


def test_tl302_needs_a_large_excess_in_nats_for_few_classes():
    t = defaults("TL302")
    above_ratio = 1.01 * t["max_ratio"] * math.log(2)
    assert above_ratio - math.log(2) < t["min_excess"]
    assert hits("TL302", _loss_trace(above_ratio, classes=2)) == []
    assert hits("TL302", _loss_trace(math.log(2) + 1.01 * t["min_excess"], classes=2))


@pytest.mark.parametrize("factor, fires", [(0.99, False), (1.01, True)])
def test_tl302_many_classes_fire_on_an_excess_in_nats(factor, fires):
    """At 1000 classes 2x ln(C) is 6.9 nats above it: logits of std ~3.7. The excess caps it."""
    t = defaults("TL302")
    loss = math.log(1000) + factor * t["max_excess"]
    assert loss < t["max_ratio"] * math.log(1000)
    assert bool(hits("TL302", _loss_trace(loss, classes=1000))) is fires


@pytest.mark.parametrize("rms, blamed", [(0.99, "head"), (1.01, "features")])
def test_tl302_blames_large_features_over_the_head(rms, blamed):
    """A hidden layer 100x too large makes the logits large through a well-initialized head."""
    body = point("body", "ReLU", depth=0, kind="relu", rms=rms * LARGE_FEATURES, shape=(8, 32))
    head = point("head", "Linear", depth=1, shape=(8, 10))
    found = hits("TL302", trace([body, head], edges=[to_module(body, "head")],
                                output_ops=((head.node, ()),), loss_kind="cross_entropy",
                                num_classes=10, per_step=steps(20.0, 18.0)))
    assert found[0].module == "head"
    assert ("features reaching the last layer" in found[0].fix) is (blamed == "features")


def _biased_head(kind: str, *, std: float, mean: float, signal: float, bias_rms: float,
                 through: str = ""):
    """A head (optionally behind a pass-through ``through`` module at the output) whose first
    outputs have ``std``/``mean`` and between-sample RMS ``signal``; its bias at RMS
    ``bias_rms`` before the first update."""
    head = point("head", "Linear", depth=1, shape=(8, 10))
    layers, edges, out = [head], [], head
    modules = [module("head", "Linear")]
    if through:
        out = point("out", through, depth=2, shape=(8, 10))
        layers.append(out)
        edges.append(to_module(head, "out"))
        modules.append(module("out", through))
    bias = param("head.bias", (10,), ratios=(1e-3,), norm_before=bias_rms * math.sqrt(10))
    per_step = steps(20.0, 18.0)
    values = {"std": std, "mean": mean, "signal": signal}
    per_step[0]["layers"] = {head.node[1:]: values, out.node[1:]: values}
    return trace(layers, modules, edges=edges, output_ops=((out.node, ()),), loss_kind=kind,
                 num_classes=10, params=[bias], per_step=per_step)


@pytest.mark.parametrize("nudge, blamed", [(0.96, True), (1.04, False)])
def test_tl302_blames_the_bias_when_the_outputs_are_the_same_for_every_sample(nudge, blamed):
    """A tagger's +12 bias on one tag: outputs spread 3.8 across classes, 0.06 between samples.
    Scaling the weights down would leave the loss where it is."""
    [found] = hits("TL302", _biased_head("cross_entropy", std=4.0, mean=1.3,
                                         signal=nudge * init.SAME_FOR_ALL * 4.0, bias_rms=4.0))
    assert ("'head.bias', RMS 4 at init" in found.fix) is blamed
    assert ("nn.init.normal_(layer.weight, std=0.01)" in found.fix) is not blamed
    assert ("the same for every sample" in found.message) is blamed


@pytest.mark.parametrize("nudge, blamed", [(0.98, False), (1.02, True)])
def test_tl302_the_bias_must_be_about_as_large_as_the_spread(nudge, blamed):
    """Outputs the same for every sample with a small bias: the features are constant, and
    the weights make them large."""
    [found] = hits("TL302", _biased_head("cross_entropy", std=4.0, mean=0.0, signal=0.1,
                                         bias_rms=nudge * init.BIAS_SHARE * 4.0))
    assert ("'head.bias'" in found.fix) is blamed


def test_tl302_a_bce_outputs_size_counts_a_softmaxs_shift_does_not():
    """BCE: logits all near +8 (mean 8, std 0.15) are confident; a softmax ignores a shift
    common to every class, so there only the spread across classes counts."""
    [bce] = hits("TL302", _biased_head("bce_with_logits", std=0.15, mean=8.0, signal=0.16,
                                       bias_rms=8.0))
    assert "'head.bias', RMS 8 at init" in bce.fix and "spread of 8" in bce.message
    [softmax] = hits("TL302", _biased_head("cross_entropy", std=0.15, mean=8.0, signal=0.16,
                                           bias_rms=8.0))
    assert "'head.bias'" not in softmax.fix


@pytest.mark.parametrize("through", ["Identity", "Dropout"])
def test_tl302_names_the_layer_behind_a_pass_through_output(through):
    [found] = hits("TL302", _biased_head("cross_entropy", std=4.0, mean=0.0, signal=4.0,
                                         bias_rms=0.1, through=through))
    assert found.module == "head" and "('head')" in found.fix


def test_tl302_a_head_tied_to_the_embedding_is_fixed_there():
    """A language model whose head shares the token embedding's weight: shrinking 'head'
    alone is shrinking the embedding; the fix names the shared weight."""
    t = _biased_head("cross_entropy", std=4.0, mean=0.0, signal=4.0, bias_rms=0.1)
    t.modules["head"].attrs["weight_of"] = "tok.weight"
    [found] = hits("TL302", t)
    assert "'head' shares its weight with 'tok.weight' (tied weights)" in found.fix
    assert "std=0.01" not in found.fix


def test_tl302_bce_with_logits_expects_ln2():
    t = defaults("TL302")
    loss = max(t["max_ratio"] * math.log(2), math.log(2) + t["min_excess"]) * 1.01
    found = hits("TL302", _loss_trace(loss, kind="bce_with_logits", classes=None))
    assert found and found[0].evidence["expected"] == pytest.approx(math.log(2))


def test_tl302_a_weighted_bce_is_a_note():
    t = defaults("TL302")
    loss = max(t["max_ratio"] * math.log(2), math.log(2) + t["max_excess"]) * 1.5
    weighted = _loss_trace(loss, kind="bce_with_logits", classes=None)
    weighted.loss_weighted = True
    with pytest.raises(Skip, match="pos_weight"):
        hits("TL302", weighted)


def test_tl302_a_loss_on_values_computed_from_the_output_is_a_note():
    computed = _loss_trace(50.0)
    computed.loss_transforms_output = True
    with pytest.raises(Skip, match="ArcFace"):
        hits("TL302", computed)
    assert hits("TL302", _loss_trace(50.0))  # the same first loss on the output: judged


def test_tl302_needs_a_first_loss_over_enough_items():
    t = defaults("TL302")
    few = _loss_trace(50.0)
    few.loss_items = t["min_items"] - 1
    with pytest.raises(Skip, match="strays from ln"):
        hits("TL302", few)
    enough = _loss_trace(50.0)
    enough.loss_items = t["min_items"]
    assert hits("TL302", enough)


def test_tl302_silent_below_ln_c_and_for_regression():
    assert hits("TL302", _loss_trace(0.1)) == []
    assert hits("TL302", _loss_trace(50.0, kind="mse", classes=None)) == []


def test_tl302_needs_step_zero():
    assert hits("TL302", _loss_trace(50.0, first=300)) == []


@pytest.mark.parametrize("kind", [None, "custom", "model"])
def test_tl302_unknown_loss_is_a_note(kind):
    with pytest.raises(Skip):
        hits("TL302", _loss_trace(50.0, kind=kind))


@pytest.mark.parametrize("factor, judged", [(0.99, False), (1.01, True)])
def test_a_monitor_whose_first_loss_is_far_below_chance_has_no_first_step(factor, judged):
    """A model that starts a Monitor run under half of ln(C) was trained before (plain SGD
    keeps no optimizer state to say so): its weights are not an init to judge."""
    first = factor * run.TRAINED_BELOW * math.log(10)
    t = trace([], mode="monitor", per_step=steps(first, first, first, key="loss_mean"))
    t.loss_kind, t.num_classes, t.loss_reduction = "cross_entropy", 10, "mean"
    if judged:
        assert init.first_step(t) is t.per_step[0]
    else:
        with pytest.raises(Skip, match="first training step"):
            init.first_step(t)


def _norm_trace(scale: float, out: float, *, add: bool = False, first_step: int = 0,
                norm_type: str = "BatchNorm2d"):
    """conv -> bn -> relu -> conv2, bn's scale at RMS ``scale`` before the first update and its
    output at RMS ``out`` at step 0 (``add``: bn's output goes into a residual sum instead)."""
    conv, bn = point("conv", "Conv2d", depth=0), point("bn", norm_type, depth=1)
    relu, conv2 = point("relu", "ReLU", depth=2, kind="relu"), point("conv2", "Conv2d", depth=3)
    weight = param("bn.weight", (16,), norm_before=scale * 4.0, ratios=(1e-3,), std=scale)
    edges = [to_module(conv, "bn"), to_module(bn, "relu"), to_module(relu, "conv2")]
    if add:
        edges[1] = edge(bn.node, ("module", "relu"), ("add",))
    first = {bn.node[1:]: {"std": out, "mean": 0.0}}
    return trace([conv, bn, relu, conv2], params=[weight], edges=edges,
                 per_step=[{"step": first_step, "layers": first}])


@pytest.mark.parametrize("factor, fires", [(0.99, True), (1.01, False)])
def test_tl301_a_norm_scale_far_below_1_at_the_edge(factor, fires):
    """A blanket normal_(std=0.02) init gives norm scales of RMS ~0.02 (MobileViT in
    transformers 5.24): each such layer shrinks the signal ~50x."""
    low = defaults("TL301")["min_norm_scale"]
    for scale, out in ((factor * low, low / 2), (low / 2, factor * low)):
        found = hits("TL301", _norm_trace(scale, out))
        assert bool(found) is fires
        if fires:
            assert found[0].module == "bn" and "nn.init.ones_(norm.weight)" in found[0].fix
            assert found[0].evidence["scale_rms"] == pytest.approx(scale)


@pytest.mark.parametrize("norm_type", ["LayerNorm", "GroupNorm", "LlamaRMSNorm"])
def test_tl301_judges_every_kind_of_norm_scale(norm_type):
    low = defaults("TL301")["min_norm_scale"]
    assert hits("TL301", _norm_trace(low / 2, low / 2, norm_type=norm_type))


def test_tl301_a_zero_norm_scale_or_one_that_ends_a_residual_branch_is_no_mistake():
    low = defaults("TL301")["min_norm_scale"]
    assert hits("TL301", _norm_trace(0.0, 0.0)) == []  # zero_init_residual
    assert hits("TL301", _norm_trace(low / 2, low / 2, add=True)) == []
    with pytest.raises(Skip):
        hits("TL301", _norm_trace(low / 2, low / 2, first_step=100))


def test_tl302_does_not_judge_a_fine_tune_whose_head_is_frozen():
    """LoRA on a pretrained Llama (head and base frozen): its first loss on a new task, 7.2 vs
    ln(64) = 4.16, is a pretrained model's confident answers, not a bad init's. A fresh head
    on a frozen backbone (linear probing) starts from its own init: judged."""
    loud = (defaults("TL302")["max_ratio"] + 1) * math.log(10)  # above the threshold
    t = _loss_trace(loud)
    t.params = [param("head.weight", (10, 8), requires_grad=False), param("lora_b", (8, 8))]
    with pytest.raises(Skip, match="output layer 'head' is frozen"):
        hits("TL302", t)
    t.params = [param("head.weight", (10, 8)),
                param("backbone.weight", (1000, 8), requires_grad=False)]
    assert hits("TL302", t)


def test_tl301_does_not_judge_frozen_layers():
    low = defaults("TL301")["min_ratio"] / 10
    t = _layer_trace(low, low)
    assert hits("TL301", t)
    t.params[0].requires_grad = False  # a pretrained backbone's layer
    assert hits("TL301", t) == []
    norm = _norm_trace(defaults("TL301")["min_norm_scale"] / 2, 0.01)
    assert hits("TL301", norm)
    norm.params[0].requires_grad = False
    assert hits("TL301", norm) == []


def test_tl301_names_a_gelu_family_activation_by_its_own_class() -> None:
    """EfficientNet's squeeze-excite conv feeds SiLU, which the probe's kind 'gelu' covers:
    the finding said 'feeds a gelu'."""
    import torch
    import torch.nn as nn

    import trainlint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                          nn.Linear(64, 4))
    nn.init.normal_(model[2].weight, std=0.002)
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(64, 64, generator=g), torch.randint(0, 4, (64,), generator=g)
    [found] = [f for f in trainlint.check(model, batch).findings if f.code == "TL301"]
    assert "feeds a SiLU with weight std" in found.message
