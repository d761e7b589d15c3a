"""The trainable tensors outside the monitored model that its loss depends on (a GAN)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.engine import RULES, load_rules
from trainlint.lossgraph import foreign_parameters

load_rules()


def _gan() -> tuple:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    critic = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return generator, critic


def test_the_loss_graph_names_what_lies_outside_the_model() -> None:
    generator, critic = _gan()
    z = torch.randn(8, 4)
    loss = critic(generator(z)).mean()
    loss.backward()  # the graph is read after the backward, as Monitor.step reads it
    assert foreign_parameters(loss, generator.parameters()) == 4  # the critic's 2 + 2
    assert foreign_parameters(loss, [*generator.parameters(), *critic.parameters()]) == 0
    assert foreign_parameters(loss.detach(), generator.parameters()) == 0
    own = F.mse_loss(generator(z), torch.zeros(8, 2))
    assert foreign_parameters(own, generator.parameters()) == 0


def test_a_monitored_generator_is_not_judged_by_its_rising_loss() -> None:
    """Its adversarial loss rises as the critic improves (TL603 must not call that 'not
    learning'); the critic's own loss, watched instead, is judged."""
    generator, critic = _gan()
    gen_opt = torch.optim.Adam(generator.parameters(), lr=1e-4)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(generator, gen_opt, every=1) as watch_gen, \
            trainlint.Monitor(critic, critic_opt, every=1) as watch_critic:
        for _ in range(RULES["TL603"].defaults["min_points"] + 2):  # TL603 runs
            real = torch.randn(16, 2, generator=g) + 3
            fake = generator(torch.randn(16, 4, generator=g))
            critic_loss = (F.softplus(-critic(real)) + F.softplus(critic(fake.detach()))).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            watch_critic.step(critic_loss)
            gen_loss = F.softplus(-critic(fake)).mean()
            gen_opt.zero_grad()
            gen_loss.backward()
            gen_opt.step()
            watch_gen.step(gen_loss)
        gen_report, critic_report = watch_gen.report(), watch_critic.report()
    assert gen_report.trace.foreign_params == 4
    assert critic_report.trace.foreign_params == 0
    assert any("TL603" in note and "compete" in note for note in gen_report.notes)
    assert not any("compete" in note for note in critic_report.notes)
