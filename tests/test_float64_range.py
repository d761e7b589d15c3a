"""A float64 model's values beyond float32's range are finite: its loss of 1e43 and gradients
and weights whose sums of squares pass float64's range are not NaN/Inf (TL504, TL604)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class Scale(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


def _huge() -> tuple:
    """A float64 regression whose outputs are ~1e43 (loss ~1e43: past float32's 3.4e38)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Scale(1e43), nn.Linear(16, 1)).double()
    data = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    return model, data


def _codes(report: trainlint.Report) -> set:
    return {f.code for f in report.findings}


def test_a_float64_loss_past_float32s_range_is_finite_in_a_check() -> None:
    model, data = _huge()
    loss = F.l1_loss(model(data[0]), data[1])
    assert 3.4e38 < loss.item() < 1e300
    report = trainlint.check(model, data, loss_fn=F.l1_loss, steps=2,
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    assert not _codes(report) & {"TL504", "TL604"}
    assert report.trace.losses[0] == loss.item()


def test_a_float64_loss_past_float32s_range_is_finite_in_a_monitor() -> None:
    model, (x, y) = _huge()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with trainlint.Monitor(model, opt, every=2) as monitor:
        for _ in range(12):
            loss = F.l1_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
    assert not _codes(monitor.report()) & {"TL504", "TL604"}


def _first_nonfinite_output(lr: float, steps: int) -> tuple:
    """Replayed without trainlint: the first step and module (in forward order) whose output
    holds NaN/Inf, in an MLP trained in float64 at ``lr``."""
    model, opt, data = _diverging(lr)
    found = []

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not found and not torch.isfinite(out).all():
                found.append(name)
        return record

    for name, module in model.named_children():
        module.register_forward_hook(hook(name))
    for step in range(steps):
        loss = F.cross_entropy(model(data[0]), data[1])
        if found:
            return step, found[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return None, None


def _diverging(lr: float) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 4, (64,))
    return model, opt, data


def test_a_diverging_float64_run_is_placed_where_its_first_inf_is() -> None:
    """Gradients and weights pass 1e154 (their sums of squares overflow float64) steps before
    any value does: TL504 names the step and module where an output first holds NaN/Inf."""
    step, module = _first_nonfinite_output(30.0, 40)
    assert step is not None and step > 3
    model, opt, (x, y) = _diverging(30.0)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(step + 2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
    [found] = [f for f in monitor.report().findings if f.code == "TL504"]
    assert (found.evidence["step"], found.evidence["where"], found.module) == (
        step, "forward", module)
