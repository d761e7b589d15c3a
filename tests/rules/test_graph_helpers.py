"""The graph helpers the catalog's rules share."""

from __future__ import annotations

from trainlint.rules._graph import ancestors, inside_attention, maximal_groups

from tests.rules.tracekit import module, trace


def test_ancestors_innermost_first():
    assert ancestors("a.b.c") == ["a.b.c", "a.b", "a", ""]
    assert ancestors("") == [""]


def test_maximal_groups_for_parameters():
    universe = {"body.0.weight", "body.0.bias", "aux.head.weight", "aux.head.bias",
                "aux.proj.weight", "head.weight", "head.bias"}
    bad = {"aux.head.weight", "aux.head.bias", "aux.proj.weight", "head.bias"}
    assert maximal_groups(bad, universe, params=True) == {
        "aux": ["aux.head.bias", "aux.head.weight", "aux.proj.weight"],
        "head": ["head.bias"],
    }


def test_maximal_groups_for_modules():
    universe = {"backbone.bn1", "backbone.layer1.bn", "head.drop"}
    assert maximal_groups({"backbone.bn1", "backbone.layer1.bn"}, universe, params=False) == {
        "backbone": ["backbone.bn1", "backbone.layer1.bn"]}
    assert maximal_groups({"backbone.bn1"}, universe, params=False) == {
        "backbone.bn1": ["backbone.bn1"]}
    assert maximal_groups(set(universe), universe, params=False) == {"": sorted(universe)}
    assert maximal_groups(set(universe), universe, params=False, root=False) == {
        "backbone": ["backbone.bn1", "backbone.layer1.bn"], "head": ["head.drop"]}


def test_inside_attention_by_type_or_name():
    t = trace([], modules=[module("enc.layer.0.attention", "BertAttention", leaf=False),
                           module("enc.layer.0.attention.self.query", "Linear"),
                           module("blocks.0.attn.proj", "Linear"),
                           module("blocks.0.mlp.fc", "Linear")])
    assert inside_attention(t, "enc.layer.0.attention.self.query")
    assert inside_attention(t, "blocks.0.attn.proj")
    assert not inside_attention(t, "blocks.0.mlp.fc")
