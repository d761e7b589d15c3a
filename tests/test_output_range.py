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


class TwoHeads(nn.Module):
    """A regression head and a sigmoid confidence head; the loss reads the regression."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.pred = nn.Linear(32, 1)
        self.conf = nn.Sequential(nn.Linear(32, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple:
        h = self.body(x)
        return self.pred(h), self.conf(h)


def _tl102(model: nn.Module, batch: tuple, loss_fn) -> list:  # noqa: ANN001
    return [f.module for f in trainlint.check(model, batch, loss_fn=loss_fn).findings
            if f.code == "TL102"]


def test_the_target_is_judged_as_the_loss_gets_it() -> None:
    """Labels of -1 marking missing values that the loss masks out (Tox21-style multi-task
    BCE), 8-bit images that the loss divides by 255, and a tuple whose sigmoid head the loss
    does not compare: each trained well (measured by the sweep); none is reported. Through a
    pass-through module (nn.Unflatten after the sigmoid) the bounded output is still found."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    labels = torch.randint(0, 2, (64, 8), generator=g).float()
    labels[torch.rand(64, 8, generator=g) < 0.3] = -1.0  # missing

    def masked_bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        keep = y >= 0
        return nn.functional.binary_cross_entropy(out[keep], y[keep])

    tagger = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Sigmoid())
    assert _tl102(tagger, (x, labels), masked_bce) == []
    pixels = torch.randint(0, 256, (64, 8), generator=g).float()
    decoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Sigmoid())
    assert _tl102(decoder, (x, pixels),
                  lambda out, y: nn.functional.binary_cross_entropy(out, y / 255)) == []
    assert _tl102(decoder, (x, pixels), nn.functional.mse_loss) == ["3"]  # unscaled: reported
    standardized = torch.randn(64, 1, generator=g)
    assert _tl102(TwoHeads(), (x, standardized),
                  lambda out, y: nn.functional.mse_loss(out[0], y)) == []
    pads = torch.rand(64, 8, generator=g)
    pads[:, 5:] = -100.0  # padding, masked after an elementwise loss

    def padded_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        keep = (y != -100).float()
        return (nn.functional.mse_loss(out, y, reduction="none") * keep).sum() / keep.sum()

    assert _tl102(tagger, (x, pads), padded_mse) == []
    signed_codes = torch.rand(64, 8, generator=g) * 2 - 1

    def with_a_batch_term(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.1 * nn.functional.mse_loss(out.mean(0), y.mean(0)) + \
            nn.functional.mse_loss(out, y)

    assert _tl102(decoder, (x, signed_codes), with_a_batch_term) == ["3"]  # the second call
    unflattened = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Sigmoid(),
                                nn.Unflatten(1, (2, 4)))
    signed = torch.rand(64, 2, 4, generator=g) * 2 - 1
    assert _tl102(unflattened, (x, signed), nn.functional.mse_loss) == ["3"]

