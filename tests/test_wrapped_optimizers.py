"""Optimizer wrappers whose own step() never runs under torch's hooks (SAM used through
first_step()/second_step(), a Lookahead that does not call Optimizer.__init__): the step of the
optimizer they wrap ends each observation, so the run is observed on its schedule."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from tests.conftest import monitored_step


class TwoStepSAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as commonly written: first_step() climbs, second_step()
    restores the weights and steps the base optimizer."""

    def __init__(self, params, base: type, rho: float = 0.05, **kwargs) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups
                                       for p in g["params"] if p.grad is not None]))
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.state[p]["old"] = p.detach().clone()
                    p.add_(p.grad * g["rho"] / (norm + 1e-12))

    @torch.no_grad()
    def second_step(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.copy_(self.state[p]["old"])
        self.base_optimizer.step()


class BareLookahead(torch.optim.Optimizer):
    """A Lookahead that skips Optimizer.__init__ (torch then never hooks its step())."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        self.optimizer, self.k, self.alpha, self.count = base, k, alpha, 0
        self.param_groups, self.defaults, self.state = base.param_groups, base.defaults, base.state
        self.slow = [[p.detach().clone() for p in g["params"]] for g in self.param_groups]
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = self.optimizer.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            for g, slow in zip(self.param_groups, self.slow):
                for p, q in zip(g["params"], slow):
                    q.add_(p - q, alpha=self.alpha)
                    p.copy_(q)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model[2].weight.mul_(40.0)  # a first loss far above ln(10): TL302
    return model


@pytest.mark.parametrize("kind", ["sam", "lookahead"])
def test_the_wrapped_optimizers_step_ends_each_observation(kind: str) -> None:
    model = _model()
    if kind == "sam":
        opt = TwoStepSAM(model.parameters(), torch.optim.Adam, lr=1e-3)
        inner = opt.base_optimizer
    else:
        inner = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt = BareLookahead(inner)
    g = torch.Generator().manual_seed(1)
    first = None
    with trainlint.Monitor(model, opt, every=5) as monitor:
        for _ in range(30):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
            loss = F.cross_entropy(model(x), y)
            first = first if first is not None else float(loss)
            opt.zero_grad()
            loss.backward()
            if kind == "sam":
                opt.first_step()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.second_step()
            else:
                opt.step()
            monitor.step(loss)
        report = monitor.report()
    assert [s["step"] for s in report.trace.per_step] == [0, 5, 10, 15, 20, 25]
    assert first > 2 * math.log(10)
    assert "TL302" in {f.code for f in report.findings}
    assert any("pass the Adam to the Monitor" in n for n in report.notes)
    assert not inner._optimizer_step_pre_hooks  # nothing left on the user's optimizer


class TimmLikeLookahead(torch.optim.Optimizer):
    """timm's Lookahead as written: no Optimizer.__init__ and no hook dicts of its own, so
    torch cannot hook its step() at all (register_step_pre_hook raised AttributeError)."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        self._base_optimizer, self.k, self.alpha, self.count = base, k, alpha, 0
        self.param_groups, self.defaults, self.state = base.param_groups, base.defaults, base.state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = self._base_optimizer.step(closure)
        self.count += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 20) -> trainlint.Report:
    g = torch.Generator().manual_seed(1)
    with trainlint.Monitor(model, opt, every=5) as monitor:
        for _ in range(steps):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
            monitored_step(model, opt, monitor, x, y)
        return monitor.report()


def test_a_wrapper_torch_cannot_hook_is_watched_through_the_optimizer_it_keeps() -> None:
    """The Monitor raised a raw AttributeError on timm's Lookahead; the Adam it keeps is
    watched instead, and its update ratios equal those of that Adam passed directly."""
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    wrapped = _train(model, TimmLikeLookahead(inner))
    assert [s["step"] for s in wrapped.trace.per_step] == [0, 5, 10, 15]
    assert any("the Adam it keeps was watched instead" in n for n in wrapped.notes)
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
    model.load_state_dict(state)
    direct = _train(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    ratios = {p.name: p.update_ratios for p in wrapped.trace.params}
    assert ratios and ratios == {p.name: p.update_ratios for p in direct.trace.params}


def test_a_wrapper_torch_cannot_hook_that_keeps_no_optimizer_is_a_config_error() -> None:
    opt = TimmLikeLookahead(torch.optim.Adam(_model().parameters(), lr=1e-3))
    del opt._base_optimizer
    with pytest.raises(trainlint.ConfigError, match="pass the optimizers it steps"):
        trainlint.Monitor(_model(), opt)


class TwoInside(torch.optim.Optimizer):
    """A wrapper without Optimizer.__init__ keeping two optimizers (one per part)."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer) -> None:
        self.optimizer, self.inner_optimizer = first, second
        self.param_groups = first.param_groups + second.param_groups
        self.defaults, self.state = first.defaults, {}

    def step(self, closure=None):  # noqa: ANN001, ANN201
        self.optimizer.step()
        self.inner_optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)
        self.inner_optimizer.zero_grad(set_to_none)


def test_wrappers_of_wrappers_and_of_several_optimizers_are_watched_through_them() -> None:
    """A wrapper keeping two optimizers made `trainlint check` fail with an internal error,
    and a Lookahead of a Lookahead was a ConfigError: each optimizer kept is watched."""
    model = _model()
    first = torch.optim.Adam(model[0].parameters(), lr=1e-3)
    second = torch.optim.SGD(model[2].parameters(), lr=1e-2)
    report = _train(model, TwoInside(first, second))
    assert {p.optimizer for p in report.trace.params} == {"Adam", "SGD"}
    assert any("the Adam and SGD it keeps was watched instead" in n for n in report.notes)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    nested = _train(model, TimmLikeLookahead(TimmLikeLookahead(inner)))
    assert [s["step"] for s in nested.trace.per_step] == [0, 5, 10, 15]
    batch = (torch.randn(32, 8), torch.randint(0, 10, (32,)))


    def split(params) -> TwoInside:  # noqa: ANN001
        params = list(params)
        return TwoInside(torch.optim.Adam(params[:2], lr=1e-3),
                         torch.optim.SGD(params[2:], lr=1e-2))

    checked = trainlint.check(_model(), batch, loss_fn=F.cross_entropy, optimizer=split)
    assert checked.trace.observed_steps == 3
    assert {p.optimizer for p in checked.trace.params} == {"Adam", "SGD"}
