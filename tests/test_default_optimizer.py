"""The default optimizer: torch.optim.SGD(lr=0.01, momentum=0.9)'s update without its start-up
cost (it never imports torch._dynamo), and everything trainlint reads of an optimizer."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
import trainlint.probe
from tests.conftest import ROOT
from trainlint.default_optimizer import DefaultSGD
from trainlint.errors import UserCodeError

LR, MOMENTUM = 0.01, 0.9


class Branchy(nn.Module):
    """A head used only when asked: its parameters get no gradient on the other steps."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.extra = nn.Linear(6, 3)
        self.emb = nn.Embedding(10, 6, sparse=True)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, use_extra: bool) -> torch.Tensor:
        x = x + self.emb(ids)
        out = self.body(x)
        return out + self.extra(x) if use_extra else out


def _train(model: Branchy, opt: object, schedule: list) -> list:
    """Run one step per entry of ``schedule``; every parameter after each step."""
    g = torch.Generator().manual_seed(1)
    seen = []
    for use_extra in schedule:
        x, ids = torch.randn(8, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, ids, use_extra), y).backward()
        opt.step()
        seen.append([p.detach().clone() for p in model.parameters()])
    return seen


def test_updates_equal_torch_sgd_with_momentum() -> None:
    torch.manual_seed(0)
    ours = Branchy()
    theirs = copy.deepcopy(ours)
    start = [p.detach().clone() for p in ours.parameters()]
    schedule = [True, False, False, True, True]  # extra: no grad on steps 2-3, buffer kept
    got = _train(ours, DefaultSGD(ours.parameters(), lr=LR, momentum=MOMENTUM), schedule)
    want = _train(theirs, torch.optim.SGD(theirs.parameters(), lr=LR, momentum=MOMENTUM),
                  schedule)
    for step, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=f"step {step + 1}")
    extra = [i for i, p in enumerate(ours.parameters()) if p is ours.extra.weight][0]
    assert torch.equal(got[1][extra], got[0][extra]) and torch.equal(got[2][extra], got[0][extra])
    assert not torch.equal(got[3][extra], got[2][extra])
    assert all(not torch.equal(a, b) for a, b in zip(got[-1], start))


def test_the_momentum_buffer_follows_the_formula() -> None:
    """buf = g on the first step, then buf = 0.9 * buf + g; p -= lr * buf (by hand)."""
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = DefaultSGD([p], lr=LR, momentum=MOMENTUM)
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 2.0]), torch.tensor([4.0, 0.0])]
    value, buf = torch.tensor([1.0, -2.0]), None
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = g if buf is None else MOMENTUM * buf + g
        value = value - LR * buf
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, rtol=0, atol=1e-6)


def test_zero_grad_drops_or_zeroes_in_place() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = DefaultSGD([p])
    (p * 2).sum().backward()
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and torch.equal(grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None


def test_step_hooks_fire_around_the_update_and_are_removable() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = DefaultSGD([p])
    calls = []
    pre = opt.register_step_pre_hook(
        lambda o, args, kwargs: calls.append(("pre", o, args, kwargs, p.detach().clone())))
    post = opt.register_step_post_hook(
        lambda o, args, kwargs: calls.append(("post", o, args, kwargs, p.detach().clone())))
    p.grad = torch.ones(2)
    opt.step()
    assert [c[:4] for c in calls] == [("pre", opt, (), {}), ("post", opt, (), {})]
    assert torch.equal(calls[0][4], torch.ones(2))
    assert torch.equal(calls[1][4], torch.full((2,), 1 - LR))
    pre.remove()
    opt.step()
    assert [c[0] for c in calls] == ["pre", "post", "post"]
    post.remove()
    opt.step()
    assert len(calls) == 3


def test_repr_names_the_update() -> None:
    assert repr(DefaultSGD([nn.Parameter(torch.ones(1))])) == "SGD(lr=0.01, momentum=0.9)"


# ------------------------------------------------------------------ inside a check

def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch() -> tuple:
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_check_without_an_optimizer_uses_it_and_measures_its_updates() -> None:
    """TL503's update ratios and TL506's membership come from the default optimizer's steps,
    equal to a replay of the same steps with torch.optim.SGD."""
    model, batch = _model(), _batch()
    replay = copy.deepcopy(model)
    report = trainlint.check(model, batch, steps=3)
    assert "default optimizer used: SGD(lr=0.01, momentum=0.9)" in report.notes
    assert {"TL503", "TL506"} <= set(report.checked)
    assert not {"TL503", "TL506"} & set(report.skipped)
    assert not [f for f in report.findings if f.code == "TL506"]
    opt = torch.optim.SGD(replay.parameters(), lr=LR, momentum=MOMENTUM)
    want: dict = {n: [] for n, _ in replay.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(replay(batch[0]), batch[1]).backward()
        before = {n: p.detach().clone() for n, p in replay.named_parameters()}
        opt.step()
        for n, p in replay.named_parameters():
            want[n].append(((p.detach() - before[n]).norm() / before[n].norm()).item())
    params = {p.name: p for p in report.trace.params}
    assert set(params) == set(want)
    for name, ratios in want.items():
        assert params[name].in_optimizer is True
        assert params[name].update_ratios == pytest.approx(ratios, rel=1e-5)


def test_check_with_the_users_optimizer_uses_theirs() -> None:
    model, batch = _model(), _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    report = trainlint.check(model, batch, optimizer=opt, steps=2)
    assert len(steps) == 2
    assert not any(n.startswith("default optimizer") for n in report.notes)
    assert all(p.in_optimizer for p in report.trace.params)


def test_a_bug_in_the_probes_optimizer_hook_is_trainlints_not_the_users(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise IndexError("probe bug")

    monkeypatch.setattr(trainlint.updates._Group, "fill", broken)  # read in the step hooks
    with pytest.raises(IndexError, match="probe bug") as raised:
        trainlint.check(_model(), _batch(), steps=1)
    assert not isinstance(raised.value, UserCodeError)


class Fussy(nn.Parameter):
    """A user's parameter type that refuses in-place foreach additions."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        if getattr(func, "__name__", "") == "_foreach_add_":
            raise RuntimeError("Fussy refuses _foreach_add_")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_default_step_failing_on_the_users_tensors_is_the_users() -> None:
    model = _model()
    model[2].weight = Fussy(model[2].weight.detach())
    with pytest.raises(UserCodeError, match="optimizer step raised RuntimeError.*Fussy refuses"):
        trainlint.check(model, _batch(), steps=1)


# ------------------------------------------------------------------ start-up cost

NO_DYNAMO = """
import contextlib, io, sys
import torch
import trainlint
from trainlint.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["check", "fixtures/healthy_relu.py", "--format", "json"])
    except SystemExit:
        pass
print("cli", "torch._dynamo" in sys.modules)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
report = trainlint.check(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
print("api", report.trace.observed_steps, "torch._dynamo" in sys.modules)
torch.optim.SGD(model.parameters(), lr=0.1)
print("torch.optim", "torch._dynamo" in sys.modules)
"""


def test_a_check_without_an_optimizer_never_imports_dynamo() -> None:
    """The last line guards the test: creating a torch.optim optimizer does import it."""
    done = subprocess.run([sys.executable, "-c", NO_DYNAMO], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split("\n") == ["cli False", "api 3 False", "torch.optim True", ""]
