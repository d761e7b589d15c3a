"""TL202 in a check judges a feature constant over every batch it reads, not the first alone: a rare
0/1 indicator (SimpleImputer's missing-value flag) is all 0 in about half of 32-row batches,
and varies over a run; a column a loader never fills does not."""

from __future__ import annotations

import torch
import torch.nn as nn

import trainlint


def _batches(stuck: bool):  # noqa: ANN202
    """Standardized numerics and a 0/1 flag column (index 4) that is 0 in the first batch and
    set in one row of the later ones, unless ``stuck``."""
    g = torch.Generator().manual_seed(0)
    calls = []

    def batch() -> tuple:
        x = torch.randn(32, 5, generator=g)
        x[:, 4] = 0.0
        if calls and not stuck:
            x[3, 4] = 1.0
        calls.append(1)
        return x, torch.randint(0, 3, (32,), generator=g)

    return batch


def test_a_flag_constant_in_one_batch_varies_over_the_run() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    rare = trainlint.check(model, _batches(stuck=False), steps=3)
    assert "TL202" not in {f.code for f in rare.findings}
    never = trainlint.check(model, _batches(stuck=True), steps=3)
    [found] = [f for f in never.findings if f.code == "TL202"]
    assert found.evidence["constant"] == [4]
