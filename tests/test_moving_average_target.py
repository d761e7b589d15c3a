"""A BYOL/MoCo target network left with ``requires_grad=True``, run under ``torch.no_grad()``
and updated as a moving average of the online network: no optimizer holds it and it gets no
gradient, yet it changes at every step. TL505/TL506 leave it alone; the same target never
updated is still reported (by TL505: an optimizer would not move it either, so TL506's "add it
to the optimizer" is no fix)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class Byol(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.predictor = nn.Linear(8, 8)
        self.target = copy.deepcopy(self.online)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.target(b)
        p = self.predictor(self.online(a))
        return 2 - 2 * F.cosine_similarity(p, z, dim=-1).mean()


def _run(ema: bool, steps: int = 6, every: int = 1, fail_on: str = "never") -> list:
    torch.manual_seed(0)
    model = Byol()
    params = list(model.online.parameters()) + list(model.predictor.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    before = model.target[0].weight.detach().clone()
    with trainlint.Monitor(model, opt, every=every, fail_on=fail_on) as monitor:
        for _ in range(steps):
            x = torch.randn(32, 16)
            loss = model(x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if ema:
                with torch.no_grad():
                    for t, o in zip(model.target.parameters(), model.online.parameters()):
                        t.mul_(0.99).add_(o, alpha=0.01)
            monitor.step(loss)
        report = monitor.report()
    moved = (model.target[0].weight - before).norm() / before.norm()
    assert (moved.item() > 1e-6) is ema  # the truth: the target moves exactly when updated
    return sorted((f.code, f.module) for f in report.findings if f.code in ("TL505", "TL506"))


def test_a_moving_average_target_is_not_reported() -> None:
    assert _run(ema=True) == []


def test_a_target_never_updated_is_reported() -> None:
    assert _run(ema=False) == [("TL505", "target")]


def test_a_target_never_updated_is_told_to_update_it() -> None:
    """It is a copy of 'online' run under no_grad: its moving-average update is missing. The
    old fix, "run 'target' with autograd on", trains it through the loss, which collapsed a
    BYOL's representation (linear probe 0.264 against 0.389, measured)."""
    torch.manual_seed(0)
    model = Byol()
    opt = torch.optim.SGD(list(model.online.parameters()) + list(model.predictor.parameters()),
                          lr=0.05)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(4):
            x = torch.randn(32, 16)
            loss = model(x, x + 0.1 * torch.randn_like(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        [found] = [f for f in monitor.report().findings if f.code == "TL505"]
    assert found.severity == "warning" and found.evidence["copy_of"] == "online"
    assert "nothing updates it" in found.message
    assert "moving average of 'online'" in found.fix and "autograd on" not in found.fix


def test_a_check_calls_a_target_copy_info_and_keeps_it_out_of_the_gradient() -> None:
    """A check runs none of the user's loop, so the target's update is not seen."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    views = (x, x + 0.1 * torch.randn_like(x))
    report = trainlint.check(Byol(), (views, torch.zeros(32)), loss_fn=lambda out, _: out,
                             steps=3)
    [found] = [f for f in report.findings if f.code == "TL505"]
    assert (found.module, found.severity) == ("target", "info")
    assert "model.target.requires_grad_(False)" in found.fix and "autograd on" not in found.fix


def test_one_observed_step_is_enough_to_see_the_target_move() -> None:
    """With one step observed there is no second step to compare with: the parameters no
    optimizer holds are read as the step starts and at its ``monitor.step()``. A Monitor that
    stops the run on errors lets the moving-average target train on."""
    assert _run(ema=True, steps=5, every=100, fail_on="error") == []
    assert _run(ema=False, steps=5, every=100) == [("TL505", "target")]


def test_a_forgotten_layer_clipped_in_the_loop_is_still_reported() -> None:
    """WGAN-style weight clipping of every parameter in the loop changes a layer left out of
    the optimizer once (its first clip); an EMA changes its target at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05)
    with trainlint.Monitor(model, opt, every=2) as monitor:
        for _ in range(8):
            x = torch.randn(32, 16)
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (32,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-0.1, 0.1)
            monitor.step(loss)
        report = monitor.report()
    assert ("TL506", "0") in [(f.code, f.module) for f in report.findings]


def test_what_the_forward_changes_is_not_an_update_from_the_loop() -> None:
    """An embedding with ``max_norm`` renormalizes the rows it looks up, in place, in its
    forward: left out of the optimizer it is still never trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, max_norm=0.5), nn.Flatten(), nn.Linear(40, 3))
    with torch.no_grad():
        model[0].weight.mul_(10)  # every row above max_norm: each lookup rewrites it
    report = trainlint.check(model, (torch.randint(0, 50, (16, 5)), torch.randint(0, 3, (16,))),
                             optimizer=lambda params: torch.optim.SGD(model[2].parameters(),
                                                                      lr=0.1))
    assert ("TL506", "0") in [(f.code, f.module) for f in report.findings]


def test_a_complex_parameter_outside_the_optimizer_is_read_too() -> None:
    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.filter = nn.Parameter(torch.randn(8, dtype=torch.complex64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.filter.abs()

    model = Spectral()
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(3):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.filter.mul_(0.99)  # updated by the loop: no finding
            monitor.step(loss)
        report = monitor.report()
    assert [f.code for f in report.findings if f.code in ("TL505", "TL506")] == []


class _Stack(nn.Module):
    """Four blocks alike, each with its own init; the first two run under no_grad by mistake
    (measured: accuracy 0.733 against 0.834 with autograd on)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.blocks[1](torch.relu(self.blocks[0](x)))
        for block in self.blocks[2:]:
            x = torch.relu(block(x))
        return self.head(x)


def test_blocks_alike_with_their_own_init_are_no_target_copy() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    report = trainlint.check(_Stack(), (x, y), steps=3)
    found = [f for f in report.findings if f.code == "TL505"]
    assert found and all(f.severity == "warning" and "copy_of" not in f.evidence
                         for f in found)
    assert all("autograd on" in f.fix for f in found)
