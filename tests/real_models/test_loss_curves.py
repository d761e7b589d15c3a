"""TL603/TL604 on real loss curves: a spike that training gets past, and a Monitor that joins a
converged run whose batch losses are heavy-tailed."""

from __future__ import annotations

from typing import Iterator, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint

from .harness import threshold

_MEANS = torch.randn(10, 3, 1, 1, generator=torch.Generator().manual_seed(1))


def _images(step: int) -> tuple:
    g = torch.Generator().manual_seed(step)
    labels = torch.randint(0, 10, (64,), generator=g)
    return torch.randn(64, 3, 16, 16, generator=g) + _MEANS[labels], labels


def _bn_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator,
           monitor: Optional[trainlint.Monitor] = None) -> list:
    """Cross-entropy training steps, one per batch; the losses."""
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss)
        losses.append(loss.item())
    return losses


def test_a_spike_that_training_gets_past_is_no_divergence() -> None:
    """Adam at lr 1 throws a BatchNorm CNN's loss from 2.3 to ~20 in its first step; it is
    below 1 twenty steps later. Too high a learning rate is TL503's finding, not TL604's."""
    torch.manual_seed(1)
    model = _bn_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0)
    with trainlint.Monitor(model, optimizer, every=1) as monitor:
        losses = _train(model, optimizer, map(_images, range(40)), monitor)
        report = monitor.report()
    rise = threshold("TL604", "rise_factor")
    assert max(losses) > 2 * rise * losses[0]  # it did spike
    assert max(losses[-3:]) < losses[0] / 2  # and got past it
    codes = {f.code for f in report.findings}
    assert "TL604" not in codes
    assert "TL503" in codes


def _converged_monitor(seed: int, every: int, plain_sgd: bool = False) -> tuple:
    """An MLP trained to a near-zero loss, then watched by a Monitor created on it for 100
    steps (Adam's state says the run joined later; plain SGD keeps none)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(20, 5, generator=g)

    def batches(count: int) -> Iterator:
        for _ in range(count):
            x = torch.randn(64, 20, generator=g)
            yield x, (x @ weights).argmax(1)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 5))
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if plain_sgd
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    _train(model, optimizer, batches(1500))
    with trainlint.Monitor(model, optimizer, every=every) as monitor:
        losses = _train(model, optimizer, batches(100), monitor)
        return monitor.report(), losses


@pytest.mark.parametrize("every, plain_sgd", [(1, False), (10, True)])
def test_a_monitor_joining_a_converged_run_takes_no_lucky_batch_for_its_level(
        every: int, plain_sgd: bool) -> None:
    report, losses = _converged_monitor(seed=0, every=every, plain_sgd=plain_sgd)
    ordered = sorted(losses)  # heavy-tailed: the 5th highest is over rise_factor x the 5th lowest
    assert ordered[-5] > threshold("TL604", "rise_factor") * ordered[4]
    assert [f.code for f in report.findings if f.code in ("TL603", "TL604")] == []
