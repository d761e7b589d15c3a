"""A training loop that builds a new optimizer mid-run (a second phase, a reset) while the
Monitor holds the first: the Monitor sees the new one step the model's parameters, watches
it from then on, and the report says so."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.optim import optimizer as optim_module

import trainlint
from tests.conftest import small_mlp


def _run(new_lr: float, every: int, steps: int = 160, switch: int = 20) -> tuple:
    model, _ = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 20, generator=g)
    losses = []
    monitor = trainlint.Monitor(model, optimizer=opt, every=every)
    for i in range(steps):
        if i == switch:
            opt = torch.optim.Adam(model.parameters(), lr=new_lr)
        y = torch.randint(0, 10, (64,), generator=g)
        x = centres[y] + 2.0 * torch.randn(64, 20, generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        losses.append(loss.item())
    report = monitor.report()
    watched = monitor.optimizers
    monitor.close()
    return report, losses, opt, watched


@pytest.mark.parametrize("every", [1, 10])
def test_a_new_optimizer_at_a_rate_too_low_is_watched_and_reported(every: int) -> None:
    report, losses, opt, watched = _run(new_lr=1e-7, every=every)
    assert watched == [opt]
    [note] = [n for n in report.notes if "an optimizer the Monitor was not given" in n]
    assert "at step 20" in note and "Adam (lr 1e-07)" in note and "Adam (lr 0.001)" in note
    # Observations stay one training step each (not run on as gradient accumulation).
    steps = [s["step"] for s in report.trace.per_step]
    assert steps == list(range(0, 160, every))
    [found] = [f for f in report.findings if f.code == "TL503"]
    assert "the optimizer the training loop built at step 20" in found.message
    assert "scheduler" not in found.fix
    assert optim_module._global_optimizer_post_hooks == {}  # nothing left behind


def test_a_new_optimizer_at_a_sound_rate_is_only_noted() -> None:
    report, losses, _, _ = _run(new_lr=1e-3, every=5)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])  # (it trains on)
    assert any("an optimizer the Monitor was not given" in n for n in report.notes)
    assert [f.code for f in report.findings if f.severity != "info"] == []


def test_a_second_optimizer_beside_the_watched_one_is_not_taken_for_a_replacement() -> None:
    """The watched optimizer still steps: another one that also steps some of the model's
    parameters (the user's own extra) leaves the watched one as it is."""
    model, _ = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    extra = torch.optim.SGD(model[2].parameters(), lr=0.01)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            extra.step()
            monitor.step(loss)
        assert monitor.optimizers == [opt]
        assert not any("not given" in n for n in monitor.report().notes)


class ActorCritic(torch.nn.Module):
    """An encoder the critic's optimizer trains, read detached by the actor's head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU())
        self.critic = torch.nn.Linear(32, 1)
        self.actor = torch.nn.Linear(32, 4)


def test_an_optimizer_that_steps_part_of_the_model_between_the_given_ones_steps() -> None:
    """SAC-AE's pattern: the Monitor watches the actor's optimizer, which steps every second
    iteration; the critic's (encoder and critic) steps every one. It is no replacement (it
    does not hold the actor's head), and its parameters are in an optimizer (no TL506)."""
    torch.manual_seed(0)
    model = ActorCritic()
    actor_opt = torch.optim.Adam(model.actor.parameters(), lr=1e-3)
    critic_opt = torch.optim.Adam([*model.encoder.parameters(), *model.critic.parameters()],
                                  lr=1e-3)
    g = torch.Generator().manual_seed(1)
    with trainlint.Monitor(model, optimizer=actor_opt, every=5) as monitor:
        for i in range(40):
            x = torch.randn(64, 20, generator=g)
            value = model.critic(model.encoder(x))
            critic_loss = (value - x[:, :1]).pow(2).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            loss = critic_loss
            if i % 2:
                action = model.actor(model.encoder(x).detach())
                loss = (action - x[:, :4]).pow(2).mean()
                actor_opt.zero_grad()
                loss.backward()
                actor_opt.step()
            monitor.step(loss)
        report = monitor.report()
        assert monitor.optimizers == [actor_opt]
    assert not any("not given" in n for n in report.notes)
    assert not [f for f in report.findings if f.code == "TL506"]
