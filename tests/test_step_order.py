"""``optimizer.step()`` before ``loss.backward()``: every step finds no gradient (zero_grad
cleared them) and the weights never move. TL503 says so, not "vanishing gradients"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import trainlint
from tests.conftest import small_mlp


def _run(step_first: bool, every: int, steps: int = 30) -> tuple[trainlint.Report, float]:
    model, opt = small_mlp(lr=0.05)
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 20, generator=g)
    first = None
    with trainlint.Monitor(model, optimizer=opt, every=every) as monitor:
        for _ in range(steps):
            y = torch.randint(0, 10, (64,), generator=g)
            x = centres[y] + 0.5 * torch.randn(64, 20, generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if step_first:
                opt.step()
                loss.backward()
            else:
                loss.backward()
                opt.step()
            monitor.step(loss)
            first = first if first is not None else model[0].weight.detach().clone()
        moved = float((model[0].weight - first).norm())
        return monitor.report(), moved


@pytest.mark.parametrize("every", [1, 5])
def test_step_before_backward_is_named_as_the_cause(every: int) -> None:
    report, moved = _run(step_first=True, every=every)
    assert moved == 0.0  # (the fault: nothing ever moves)
    [found] = [f for f in report.findings if f.code == "TL503"]
    assert "optimizer.step() ran while no parameter had a gradient" in found.message
    assert found.evidence["stepped_before_backward"][0] == 0
    assert "call loss.backward() before optimizer.step()" in found.fix
    assert "vanishing" not in found.fix


def test_the_usual_order_is_not_flagged() -> None:
    report, moved = _run(step_first=False, every=1)
    assert moved > 0
    assert not any(s.get("stepped_before_backward") for s in report.trace.per_step)
    assert [f.code for f in report.findings if f.severity != "info"] == []
