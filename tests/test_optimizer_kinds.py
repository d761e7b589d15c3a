"""The optimizer's class is part of what the update ratio means: TL503 reads it."""

from __future__ import annotations

import torch
import torch.nn as nn

import trainlint


def test_the_optimizers_class_is_recorded_and_adagrads_first_steps_are_no_rate_too_high() -> None:
    """Adagrad's first step moves every weight by lr (0.05 here, weights of RMS ~0.07):
    ratios near 1 that its later steps, divided by the growing sum of squared gradients,
    leave behind. The same first step from Adam, whose steps stay ~lr, is judged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
    ratios = {}
    for name, make in (("Adagrad", torch.optim.Adagrad), ("Adam", torch.optim.Adam)):
        report = trainlint.check(model, batch, optimizer=lambda p, make=make: make(p, lr=0.05))
        assert {p.optimizer for p in report.trace.params} == {name}
        ratios[name] = max(max(p.update_ratios) for p in report.trace.params
                           if len(p.shape) == 2)
        codes = [f.code for f in report.findings]
        assert ("TL503" in codes) is (name == "Adam"), (name, codes)
    assert ratios["Adagrad"] > 0.5  # the first steps alone would have fired
