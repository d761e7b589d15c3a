"""Inputs whose normalization was switched off partway through a Monitor run (TL201 from the
step it began), read on a sample of each later batch."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import trainlint
from tests.conftest import monitored_step, small_mlp
from trainlint.assemble import SCALE_SIGMAS
from trainlint.probe import LATER_INPUT_ROWS


def _run(switch_at: int, steps: int = 40) -> tuple[trainlint.Report, list]:
    """An MLP on standardized features; from step ``switch_at`` on the batch is x * 8 + 20.
    Returns the report and the batches fed."""
    model, opt = small_mlp(lr=0.01, momentum=0.0)
    batches = []
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(steps):
            x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
            if step >= switch_at:
                x = x * 8 + 20
            batches.append(x)
            monitored_step(model, opt, monitor, x, y)
        report = monitor.report()
    return report, batches


def test_a_later_batchs_scale_is_read_on_samples_spread_over_it() -> None:
    """Each later observed step records the largest |mean| and std of a feature over about
    LATER_INPUT_ROWS samples spread over the batch, less SCALE_SIGMAS standard errors of
    each estimate, as computed here again."""
    report, batches = _run(switch_at=10**9, steps=4)
    for entry, x in zip(report.trace.per_step, batches):
        read = (x if entry["step"] == 0 else x[::64 // LATER_INPUT_ROWS]).double()
        n, k = read.shape[0], SCALE_SIGMAS
        mean, std = read.mean(0), read.std(0, unbiased=False)
        means = (mean.abs() - k * std / n ** 0.5).clamp(min=0)
        stds = std / (1 + k / (2 * (n - 1)) ** 0.5)
        assert entry["input_scale"][("input0", 1)] == (
            pytest.approx(means.max().item()), pytest.approx(stds.max().item()))


def test_inputs_unnormalized_from_some_step_are_reported_from_that_step() -> None:
    report, _ = _run(switch_at=25)
    [found] = [f for f in report.findings if f.code == "TL201"]
    assert "from step 25 on (at each of the 15 observed steps since" in found.message
    assert found.evidence["max_abs_mean"] > 10
    # The fix's statistics are the batch judged (~20 +- 8), not the first (~0 +- 1).
    assert float(re.search(r"overall it has mean ([0-9.]+)", found.fix).group(1)) > 10
    healthy, _ = _run(switch_at=10**9)
    assert [f for f in healthy.findings if f.code == "TL201"] == []


def test_one_rare_value_in_the_samples_read_is_no_scale_change() -> None:
    """A standardized one-hot column of a rare category (one sample in 256, value ~16): read
    on 8 samples that hold it, its mean is ~2 and its std ~5.6, the whole batch's ~0.06 and
    ~1. Less three standard errors, it stays inside the band."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rare = 255 ** 0.5  # (1 - p) / sqrt(p (1 - p)) for p = 1/256
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(30):
            x, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
            x[:, 7] = -1 / rare
            if step >= 10:
                x[0, 7] = rare  # in the rows a later step reads
            whole = x[:, 7]
            assert abs(whole.mean().item()) < 0.1 and whole.std().item() < 1.1
            monitored_step(model, opt, monitor, x, y)
        report = monitor.report()
    assert [f for f in report.findings if f.code == "TL201"] == []
