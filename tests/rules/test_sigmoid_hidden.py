"""TL105 sigmoid-hidden-activation on hand-built traces."""

from __future__ import annotations

from tests.rules.tracekit import chain, edge, hits, module, point, to_module, trace


def _stack(sigmoid_type: str = "Sigmoid", parent: str = ""):
    fc1 = point(f"{parent}fc1", "Linear", depth=0)
    sig = point(f"{parent}act", sigmoid_type, depth=1, kind="sigmoid")
    fc2 = point(f"{parent}fc2", "Linear", depth=2)
    return fc1, sig, fc2


def test_hidden_sigmoid_feeding_a_linear_fires():
    fc1, sig, fc2 = _stack()
    found = hits("TL105", trace([fc1, sig, fc2], edges=chain(fc1, sig, fc2),
                                output_ops=((fc2.node, ()),)))
    assert [h.module for h in found] == ["act"]
    assert found[0].evidence["feeds"] == ["fc2"]


def test_functional_sigmoid_through_a_reshape_fires():
    fc1 = point("fc1", "Linear", depth=0)
    sig = point("block", "Block", op="sigmoid", depth=1, kind="sigmoid")
    conv = point("conv", "Conv1d", depth=2)
    t = trace([fc1, sig, conv], modules=[module("block", "Block", leaf=False)],
              edges=[edge(fc1.node, sig.node), to_module(sig, "conv", via=("view",))],
              output_ops=((conv.node, ()),))
    assert [h.module for h in hits("TL105", t)] == ["block"]


def test_sigmoid_through_functional_dropout_or_pooling_fires():
    for via in (("dropout",), ("max_pool2d", "flatten"), ("adaptive_avg_pool2d",)):
        fc1, sig, fc2 = _stack()
        t = trace([fc1, sig, fc2], edges=[to_module(fc1, "act"), to_module(sig, "fc2", via)],
                  output_ops=((fc2.node, ()),))
        assert [h.module for h in hits("TL105", t)] == ["act"], via


def test_several_hidden_sigmoids_are_one_finding():
    a = point("a", "Sigmoid", depth=1, kind="sigmoid")
    b = point("b", "Sigmoid", depth=3, kind="sigmoid")
    fc1, fc2, fc3 = (point(f"fc{i}", "Linear", depth=2 * i) for i in range(3))
    t = trace([fc1, a, fc2, b, fc3], edges=chain(fc1, a, fc2, b, fc3),
              output_ops=((fc3.node, ()),))
    found = hits("TL105", t)
    assert [h.module for h in found] == ["a"]
    assert found[0].evidence["sigmoids"] == ["a", "b"]


def test_output_sigmoid_is_not_hidden():
    fc1 = point("fc1", "Linear", depth=0)
    sig = point("act", "Sigmoid", depth=1, kind="sigmoid")
    t = trace([fc1, sig], edges=chain(fc1, sig), output_ops=((sig.node, ("squeeze",)),))
    assert hits("TL105", t) == []


def test_gate_multiplied_into_features_is_not_hidden():
    fc1, sig, fc2 = _stack()
    t = trace([fc1, sig, fc2], edges=chain(fc1, sig, fc2) + [edge(sig.node, ("op", "mul"))],
              output_ops=((fc2.node, ()),))
    assert hits("TL105", t) == []


def test_sigmoid_inside_attention_is_left_alone():
    fc1, sig, fc2 = _stack(parent="layer.attention.")
    t = trace([fc1, sig, fc2], modules=[module("layer.attention", "BertSelfAttention",
                                               leaf=False)],
              edges=chain(fc1, sig, fc2), output_ops=((fc2.node, ()),))
    assert hits("TL105", t) == []


def test_sigmoid_into_arithmetic_is_not_reported():
    fc1, sig, fc2 = _stack()
    t = trace([fc1, sig, fc2], edges=[to_module(fc1, "act"), to_module(sig, "fc2", ("add",))],
              output_ops=((fc2.node, ()),))
    assert hits("TL105", t) == []
