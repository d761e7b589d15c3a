"""TL602 and frozen parts: a submodule frozen on purpose (eval mode, every parameter frozen
at that step) is no eval-mode training, whether the model around it trains, is put in eval as
a whole (a linear probe whose head has no mode layers), or unfreezes it later."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from trainlint.rules.wiring import INIT_WEIGHT_LEFT

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


# Train-mode batches after which BatchNorm's running statistics (momentum 0.1) hold at most
# INIT_WEIGHT_LEFT of their init: 22 at 10%.
SETTLED = math.ceil(math.log(INIT_WEIGHT_LEFT) / math.log(1 - 0.1))


def _pretrained(steps: int) -> nn.Sequential:
    """A BatchNorm net trained ``steps`` steps in train mode (0: fresh from init)."""
    torch.manual_seed(0)
    model = nn.Sequential(_backbone(), nn.Dropout(0.1), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(16, 8, generator=g)),
                               torch.randint(0, 4, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _with_norms_in_eval(model: nn.Sequential, dropout_too: bool = False) -> list:
    """TL602's findings over a loop that calls model.train() and then puts every BatchNorm
    (and, with ``dropout_too``, every Dropout) in eval, its weights still trainable."""
    kinds = (nn.BatchNorm1d, nn.Dropout) if dropout_too else (nn.BatchNorm1d,)

    def norm_eval(step: int) -> None:
        model.train()
        for m in model.modules():
            if isinstance(m, kinds):
                m.eval()
    return _run(model, model.parameters(), 4, norm_eval)


def test_batchnorms_kept_in_eval_with_gathered_statistics_are_info_not_an_error() -> None:
    """mmdetection's norm_eval: BatchNorms of a trained network normalize with their frozen
    running statistics while their affine weights and the rest train (measured on a
    pretrained ResNet fine-tuned at batch 4: train accuracy 1.0, as with BatchNorm in train
    mode). At their init statistics, or near them after a batch or a few, the same BatchNorms
    do not normalize: an error."""
    found = _with_norms_in_eval(_pretrained(SETTLED))
    assert sorted(f.module for f in found) == ["0.1", "0.5"]
    assert {(f.severity, f.evidence.get("frozen_statistics")) for f in found} == {("info", True)}
    assert all("frozen statistics" in f.message for f in found)
    for steps in (0, 1, SETTLED - 1):  # at the init's statistics, or near them
        fresh = _with_norms_in_eval(_pretrained(steps))
        assert sorted((f.module, f.severity) for f in fresh) == [("0.1", "error"),
                                                                 ("0.5", "error")], steps


def test_a_dropout_in_eval_beside_settled_batchnorms_is_still_an_error() -> None:
    found = _with_norms_in_eval(_pretrained(SETTLED), dropout_too=True)
    assert sorted((f.module, f.severity) for f in found) == [("0", "error"), ("1", "error")]
    assert "BatchNorm1d/Dropout" in next(f.message for f in found if f.module == "0")
