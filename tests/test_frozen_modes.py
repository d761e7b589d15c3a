"""TL602 and frozen parts: a submodule frozen on purpose (eval mode, every parameter frozen
at that step) is no eval-mode training, whether the model around it trains, is put in eval as
a whole (a linear probe whose head has no mode layers), or unfreezes it later."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


def _backbone() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU())


def _run(model: nn.Module, params, steps: int, before_step=lambda step: None) -> list:  # noqa: ANN001
    """``steps`` observed steps of SGD on ``params``; TL602's findings."""
    opt = torch.optim.SGD(params, lr=0.01)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for step in range(steps):
            before_step(step)
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        return [f for f in monitor.report().findings if f.code == "TL602"]


def test_a_linear_probe_in_eval_mode_over_a_frozen_backbone_is_no_fault() -> None:
    """model.eval() on a probe whose only mode layers are in the frozen backbone: the run is
    the same as model.train() with the backbone in eval (measured: identical losses)."""
    torch.manual_seed(0)
    model = nn.Sequential(_backbone(), nn.Linear(32, 4))
    model[0].requires_grad_(False)
    model.eval()
    assert _run(model, model[1].parameters(), 3) == []
    torch.manual_seed(0)
    unfrozen = nn.Sequential(_backbone(), nn.Linear(32, 4))
    unfrozen.eval()  # the backbone trains too: its BatchNorm/Dropout in eval is the fault
    assert [f.module for f in _run(unfrozen, unfrozen.parameters(), 3)] == [""]


def test_a_stage_in_eval_while_frozen_then_unfrozen_in_train_mode_is_no_fault() -> None:
    """Gradual unfreezing: the stage sits in eval while frozen, and trains in train mode
    once unfrozen. Judged at each step with that step's freezing, not the last step's."""
    torch.manual_seed(0)
    model = nn.Sequential(_backbone(), nn.Linear(32, 4))

    def schedule(step: int) -> None:
        frozen = step < 2
        model[0].requires_grad_(not frozen)
        model.train()
        if frozen:
            model[0].eval()

    assert _run(model, model.parameters(), 4, schedule) == []

    def unfrozen_in_eval(step: int) -> None:  # unfrozen at step 2, yet left in eval
        model[0].requires_grad_(step >= 2)
        model.train()
        model[0].eval()

    assert [f.module for f in _run(model, model.parameters(), 4, unfrozen_in_eval)] == ["0"]


class Distiller(nn.Module):
    """A student trained against a frozen teacher held inside the same module."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Linear(32, 4))
        self.teacher.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = self.teacher(x)
        return self.student(x) + 0.0 * soft


def test_a_frozen_teacher_inside_the_model_is_no_fault() -> None:
    """Its Dropout has no parameters of its own: it is frozen by the teacher around it."""
    torch.manual_seed(0)
    model = Distiller()

    def train_but_teacher(step: int) -> None:
        model.train()
        model.teacher.eval()

    assert _run(model, model.student.parameters(), 3, train_but_teacher) == []
