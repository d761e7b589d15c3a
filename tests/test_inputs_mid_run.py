"""Inputs whose normalization was switched off partway through a Monitor run (TL201 from the
step it began), read on a sample of each later batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.probe import LATER_INPUT_ROWS


def _run(switch_at: int, steps: int = 40) -> tuple[trainlint.Report, list]:
    """An MLP on standardized features; from step ``switch_at`` on the batch is x * 8 + 20.
    Returns the report and the batches fed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = []
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(steps):
            x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
            if step >= switch_at:
                x = x * 8 + 20
            batches.append(x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    return report, batches


def test_a_later_batchs_scale_is_read_on_samples_spread_over_it() -> None:
    """Each later observed step records the largest |mean| and std of a feature over about
    LATER_INPUT_ROWS samples spread over the batch, as computed here again."""
    report, batches = _run(switch_at=10**9, steps=4)
    for entry, x in zip(report.trace.per_step, batches):
        read = x if entry["step"] == 0 else x[::64 // LATER_INPUT_ROWS]
        mean, std = read.double().mean(0), read.double().std(0, unbiased=False)
        assert entry["input_scale"][("input0", 1)] == (
            pytest.approx(mean.abs().max().item()), pytest.approx(std.max().item()))


def test_inputs_unnormalized_from_some_step_are_reported_from_that_step() -> None:
    report, _ = _run(switch_at=25)
    [found] = [f for f in report.findings if f.code == "TL201"]
    assert "from step 25 on (at each of the 15 observed steps since" in found.message
    assert found.evidence["max_abs_mean"] > 10
    healthy, _ = _run(switch_at=10**9)
    assert [f for f in healthy.findings if f.code == "TL201"] == []
