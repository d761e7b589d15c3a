"""A learning rate that jumps mid-run (a schedule bug: x100 at some step) is named where it
jumped, with each observed step's rate per param group as the optimizer held it."""

from __future__ import annotations

import torch

import trainlint
from tests.conftest import monitored_step, small_mlp


def test_tl503_says_where_the_rate_jumped() -> None:
    model, opt = small_mlp()
    held = []
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(30):
            opt.param_groups[0]["lr"] = 0.05 * (100 if step >= 20 else 1)
            held.append(opt.param_groups[0]["lr"])
            monitored_step(model, opt, monitor, torch.randn(64, 20), torch.randint(0, 10, (64,)))
        report = monitor.report()
    assert [s["lrs"] for s in report.trace.per_step] == [{0: lr} for lr in held]
    [found] = [f for f in report.findings if f.code == "TL503"]
    assert "it rose 100x between steps 19 and 20, from 0.05 to 5" in found.message
