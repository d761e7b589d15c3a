"""TL505 on a product of two factors both initialized at 0 (LoRA's A and B): neither gets a
gradient, ever, though both are trainable and in the optimizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update B @ A."""

    def __init__(self, dim: int, rank: int, random_a: bool) -> None:
        super().__init__()
        self.base = nn.Linear(dim, dim)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.zeros(rank, dim))
        self.B = nn.Parameter(torch.zeros(dim, rank))
        if random_a:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.A.T @ self.B.T


@pytest.mark.parametrize("random_a", [False, True])
def test_lora_factors_both_at_zero_are_reported(random_a: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(16, 4, random_a), nn.ReLU(), nn.Linear(16, 4))
    batch = torch.randn(32, 16), torch.randint(0, 4, (32,))
    # Measured directly: A gets no gradient while B is 0, and B none while A is 0 too; with A
    # random, B gets one and moves, and A follows from the next step.
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    assert model[0].A.grad.abs().max() == 0
    assert bool(model[0].B.grad.abs().max() == 0) is (not random_a)
    model.zero_grad()
    report = trainlint.check(model, batch, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    found = [f for f in report.findings if f.code == "TL505"]
    assert bool(found) is (not random_a)
    if found:
        assert found[0].module == "0"
        assert found[0].evidence["params"] == ["0.A", "0.B"]
        assert "kaiming_uniform_" in found[0].fix


class GatedMLP(nn.Module):
    """A 6-layer MLP whose head starts at 0 (MLP-Mixer's reference init) and, with
    ``dead_gate``, a gate at 0 held as a buffer (it never trains: the fault)."""

    def __init__(self, dead_gate: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(5) for m in (nn.LazyLinear(32), nn.ReLU())])
        self.head = nn.Linear(32, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gate", torch.tensor(0.0 if dead_gate else 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h * self.gate + (1 - self.gate) * h.detach())


@pytest.mark.parametrize("dead_gate", [False, True])
def test_a_zero_initialized_head_does_not_stop_a_run_at_its_first_step(dead_gate: bool) -> None:
    """At step 0 every gradient behind a head at 0 is exactly 0, by design: a Monitor with
    fail_on stopped MLP-Mixer, a diffusion U-Net and RWKV there with TL501 (their runs trained:
    Mixer's loss 2.23 -> 0.0088). A gradient still cut once the head moved is reported."""
    torch.manual_seed(0)
    model = GatedMLP(dead_gate)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    model(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stopped = None
    with trainlint.Monitor(model, opt, every=5, fail_on="warning") as monitor:
        for step in range(11):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            try:
                monitor.step(loss)
            except trainlint.RunFailed as failed:
                stopped = (step, [f.code for f in failed.report.failing("warning")])
                break
    assert stopped == ((5, ["TL501"]) if dead_gate else None)


class RoundedCode(nn.Module):
    """An encoder cut off by ``round`` (no straight-through), a decoder, and a LoRA-style side
    branch whose B starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 64))
        self.dec = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, 4))
        self.lora_a, self.lora_b = nn.Linear(64, 4, bias=False), nn.Linear(4, 4, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dec[:-1](torch.round(self.enc(x) * 4) / 4)
        return self.dec[-1](z) + self.lora_b(self.lora_a(z))


def test_a_cut_at_step_0_beside_a_zero_weight_off_its_path_is_still_reported() -> None:
    """The decoder gets a gradient at step 0, so the zero B does not explain the encoder's 0
    (measured: the encoder never moves; loss 0.517 -> 0.487 against 0.420 with a
    straight-through estimator)."""
    torch.manual_seed(0)
    model = RoundedCode()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=100) as monitor:
        for _ in range(5):
            x = torch.randn(64, 16, generator=g)
            loss = F.mse_loss(model(x), (x[:, :4] * 2).sin())
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        assert "TL501" in [f.code for f in monitor.report().findings]
