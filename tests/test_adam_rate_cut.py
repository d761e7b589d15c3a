"""A check's cut for an Adam rate far too high lands where a sound rate's first steps are: the
check run again at the suggested rate is quiet, its first steps near FIRST_STEPS_TARGET."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from trainlint.rules.gradients import FIRST_STEPS_RAISE, FIRST_STEPS_TARGET

import trainlint


def _check(lr: float) -> trainlint.Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    batch = (torch.randn(64, 32), torch.randint(0, 10, (64,)))
    return trainlint.check(model, batch, optimizer=lambda p: torch.optim.Adam(p, lr=lr))


def test_the_suggested_rate_gives_first_steps_a_sound_rate_gives() -> None:
    [found] = [f for f in _check(0.1).findings if f.code == "TL503"]
    suggested = 0.1 * found.evidence["lr_factor"]
    assert 1e-3 <= suggested <= 2e-2  # (toward ~1e-3 it said 1.4e-4)
    again = _check(suggested)
    assert [f for f in again.findings if f.code == "TL503"] == []
    first = sorted(max(p.update_ratios) for p in again.trace.params if len(p.shape) == 2)
    assert first[len(first) // 2] == pytest.approx(FIRST_STEPS_TARGET, rel=0.2)


def test_the_raise_for_an_adam_rate_far_too_low_lands_there_too() -> None:
    """A BiGRU at Adam 1e-7 was told x840, to 8.4e-5 (a loss of 2.03 after 150 steps where
    1e-3 reached 0.11): raised toward the low end of a sound rate's first steps instead."""
    [found] = [f for f in _check(1e-8).findings if f.code == "TL503"]
    assert found.evidence["direction"] == "low"
    suggested = 1e-8 * found.evidence["lr_factor"]
    assert 2e-4 <= suggested <= 5e-3  # (toward ~1e-3 it said 6e-5)
    again = _check(suggested)
    assert [f for f in again.findings if f.code == "TL503"] == []
    first = sorted(max(p.update_ratios) for p in again.trace.params if len(p.shape) == 2)
    assert first[len(first) // 2] == pytest.approx(FIRST_STEPS_RAISE, rel=0.2)
