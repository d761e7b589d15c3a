"""Layers kept in a plain Python list (or dict) instead of nn.ModuleList: the model does not
register them, so model.parameters() and the optimizer leave them out (TL506)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class Heads(nn.Module):
    """A trunk and two output projections, kept in a list, a dict or an nn.ModuleList."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        heads = [nn.Linear(32, 4), nn.Linear(32, 4)]
        self.proj = {"list": heads, "dict": dict(enumerate(heads)),
                     "registered": nn.ModuleList(heads)}[holder]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        heads = self.proj.values() if isinstance(self.proj, dict) else self.proj
        return sum(head(h) for head in heads)


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    return x, x[:, :4].argmax(1)


@pytest.mark.parametrize("holder", ["list", "dict", "registered"])
def test_layers_in_a_plain_container_are_reported(holder: str) -> None:
    """Measured on a GRU seq2seq whose projections sat in a list: loss 2.01 against 0.52 after
    300 steps, and no finding."""
    torch.manual_seed(0)
    found = [f for f in trainlint.check(Heads(holder), _batch()).findings if f.code == "TL506"]
    if holder == "registered":
        assert found == []
    else:
        [hit] = found
        assert hit.severity == "error" and hit.evidence["holders"] == {"proj": 4}
        assert "nn.ModuleList" in hit.fix


def test_a_monitor_reports_them_too_and_a_loss_with_its_own_parameters_is_not_a_holder():
    torch.manual_seed(0)
    model = Heads("list")
    temperature = nn.Parameter(torch.ones(()))  # the loss's own, not the model's
    opt = torch.optim.Adam(list(model.parameters()) + [temperature], lr=1e-2)
    x, y = _batch()
    with trainlint.Monitor(model, opt, every=2) as monitor:
        for _ in range(6):
            loss = F.cross_entropy(model(x) / temperature, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        [hit] = [f for f in monitor.report().findings if f.code == "TL506"]
    assert hit.evidence["holders"] == {"proj": 4}


class _FreshHead(nn.Module):
    """Builds its head anew in every forward: nn.Linear(64, 5)(h)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear(64, 5)(self.body(x))


def _remade_batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :5].argmax(1)


def test_a_layer_built_anew_in_every_forward_is_reported() -> None:
    """Loss 1.622 -> 1.613 over 100 steps (accuracy 0.223) against 1.659 -> 1.163 (0.676) with
    the head built in __init__; no finding."""
    torch.manual_seed(0)
    report = trainlint.check(_FreshHead(), _remade_batch())
    [found] = [f for f in report.findings if f.code == "TL506"]
    assert found.evidence["remade_shapes"] == [[5], [5, 64]]
    assert "in __init__" in found.fix
    one = trainlint.check(_FreshHead(), _remade_batch(), steps=1)  # one step cannot tell
    assert "TL506" not in {f.code for f in one.findings}


def test_outside_parameters_that_stay_the_same_are_not_remade() -> None:
    """A perceptual network in the loss whose weights still require grad (not frozen), the
    same tensors every step: no optimizer needs them, and nothing is built anew."""
    torch.manual_seed(0)
    critic = nn.Linear(5, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) + 0.01 * critic(out).pow(2).mean()
    report = trainlint.check(model, _remade_batch(), loss_fn=loss_fn)
    assert report.trace.remade_params == ()
    assert "TL506" not in {f.code for f in report.findings}


@pytest.mark.parametrize("extra", ["perceptual", "projections"])
def test_nets_a_loss_builds_per_call_are_not_layers_of_the_model(extra: str) -> None:
    """A perceptual net rebuilt inside loss_fn (lpips.LPIPS() per call), or a sliced-Wasserstein
    loss's fresh random projections: new Parameters every step that are not meant to train
    (the runs trained: 1.090 -> 0.087, 0.268 -> 0.010), but TL506 said error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = (nn.Sequential(nn.Linear(16, 32), nn.ReLU()) if extra == "perceptual"
               else nn.Linear(16, 32, bias=False))
        return F.mse_loss(out, y) + F.mse_loss(net(out), net(y))
    x = torch.randn(32, 16)
    report = trainlint.check(model, (x, x.flip(1)), loss_fn=loss_fn)
    assert report.trace.remade_params == ()
    assert "TL506" not in {f.code for f in report.findings}
