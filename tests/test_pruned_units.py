"""Structured pruning (torch.nn.utils.prune, whole output rows masked): the units it cut output
0 (or a constant) on purpose. TL101 judges the units left, not the cut ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import trainlint
from trainlint.assemble import pruned_units


def _net(prune_share: float, shift: float = 0.0) -> nn.Sequential:
    """Linear (no bias) -> BatchNorm -> ReLU, its first layer's rows pruned by L1 norm, the
    norm's bias at ``shift`` (-5 kills every unit)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                        nn.Linear(32, 4))
    if prune_share:
        prune.ln_structured(net[0], "weight", amount=prune_share, n=1, dim=0)
    nn.init.constant_(net[1].bias, shift)
    return net


def _dead(net: nn.Module) -> list:
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    return [f for f in trainlint.check(net, batch).findings if f.code == "TL101"]


def test_the_units_cut_by_structured_pruning_are_known() -> None:
    net = _net(0.6)
    cut = pruned_units(net[0])
    assert len(cut) == round(0.6 * 32)
    assert cut == sorted(torch.nonzero(net[0].weight.abs().sum(1) == 0).flatten().tolist())
    assert pruned_units(_net(0.0)[0]) == []


def test_units_cut_by_pruning_are_not_dead_units() -> None:
    """Measured on a conv net pruned 60%: 59% of a ReLU's units read dead, exactly the rows
    its conv's mask cut; it trained (held-out accuracy 0.628 against 0.682 unpruned), and
    LeakyReLU, the fix offered, changed nothing."""
    assert _dead(_net(0.6)) == []


@pytest.mark.parametrize("prune_share", [0.0, 0.6])
def test_units_left_by_pruning_that_die_are_still_reported(prune_share: float) -> None:
    found = _dead(_net(prune_share, shift=-5.0))
    assert [f.module for f in found] == ["2"]
    if prune_share:
        assert found[0].evidence["pruned_units"] == len(pruned_units(_net(0.6)[0]))
        assert "units of 2 (ReLU) left by pruning '0'" in found[0].message
