"""Several probes on one model: two Monitors, a Monitor on a submodule, a trainlint.check
inside a monitored loop. Each sees only the model's own work, as it would alone: not the
other's statistics ops (a per-channel variance's clamp(min=0) read as a functional ReLU)
nor the check's training steps."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from tests.conftest import small_mlp


def _rows(report: trainlint.Report) -> set:
    return {(lt.module, lt.op, lt.type) for lt in report.trace.layers}


def _train(model: nn.Module, opt: torch.optim.Optimizer, monitors: list, steps: int = 6,
           check_at: int = -1) -> None:
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        x, y = torch.rand(64, 20, generator=g) - 0.9, torch.randint(0, 10, (64,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for monitor in monitors:
            monitor.step(loss)
        if i == check_at:
            trainlint.check(model, (x, y), steps=2)


def _report(monitor: trainlint.Monitor) -> tuple:
    report = monitor.report()
    layers = {(lt.module, lt.op): (lt.activation.mean, lt.grad_norm)
              for lt in report.trace.layers}
    return _rows(report), layers, [f.code for f in report.findings]


def _alone() -> tuple:
    """The report of a Monitor alone on the small MLP's run (see :func:`_report`)."""
    model, opt = small_mlp()
    with trainlint.Monitor(model, optimizer=opt, every=1) as alone:
        _train(model, opt, [alone])
        return _report(alone)


def test_two_monitors_each_report_what_one_alone_does() -> None:
    expected = _alone()
    model, opt = small_mlp()
    with trainlint.Monitor(model, optimizer=opt, every=1) as first, \
            trainlint.Monitor(model, optimizer=opt, every=1) as second:
        _train(model, opt, [first, second])
        assert _report(first) == expected
        assert _report(second) == expected


class BodyHead(nn.Module):
    """A head fed a tensor the parent's forward computes (the body's output, scaled)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(20, 64), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x) * 2.0)


def test_a_monitor_on_a_submodule_adds_no_row_to_the_outer_one() -> None:
    model = BodyHead()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with trainlint.Monitor(model, optimizer=opt, every=1) as alone:
        _train(model, opt, [alone])
        rows = _rows(alone.report())
    model = BodyHead()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with trainlint.Monitor(model, optimizer=opt, every=1) as outer, \
            trainlint.Monitor(model.head, every=1) as inner:
        _train(model, opt, [outer, inner])
        assert _rows(outer.report()) == rows


def test_a_check_inside_a_monitored_loop_is_not_observed_by_the_monitor() -> None:
    expected = _alone()
    model, opt = small_mlp()
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        _train(model, opt, [monitor], check_at=2)
        assert _report(monitor) == expected
