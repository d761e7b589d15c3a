"""A model whose last activation cannot reach its regression targets (a decoder ending in
sigmoid trained on images scaled to [-1, 1]): ``trainlint check`` reads the targets' range on
the device and TL102 names the output activation; the twin ending in tanh is clean."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint


def _autoencoder(last: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64), last)


@pytest.mark.parametrize("last, fires", [(nn.Sigmoid(), True), (nn.Tanh(), False)])
def test_the_output_activation_is_judged_against_the_targets(last: nn.Module,
                                                             fires: bool) -> None:
    images = torch.rand(128, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = trainlint.check(_autoencoder(last), (images, images), loss_fn=nn.MSELoss())
    found = [f for f in report.findings if f.code == "TL102"]
    assert bool(found) is fires
    if fires:
        [f] = found
        assert f.module == "3"
        outside = ((images < 0) | (images > 1)).float().mean().item()  # the truth, directly
        assert f.evidence["outside"] == pytest.approx(outside, abs=1e-4)
        assert f.evidence["target_min"] == pytest.approx(images.min().item())
        assert f.evidence["target_max"] == pytest.approx(images.max().item())


def test_a_monitor_sees_no_targets_and_says_nothing_of_them() -> None:
    model = _autoencoder(nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(3):
            loss = nn.functional.mse_loss(model(images), images)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    assert report.trace.targets == []
