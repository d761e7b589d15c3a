"""A loop that trains a copy of the model (copy.deepcopy after the optimizer was built) while
the Monitor watches the original: the optimizer steps parameters the loss does not use (TL506),
not 'another network, such as a GAN's discriminator'."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _run(watched: nn.Module, trained: nn.Module, opt: torch.optim.Optimizer,
         extra: nn.Module = None) -> list:  # noqa: RUF013
    """TL506 findings of a Monitor on ``watched`` over a loop whose loss runs ``trained`` (and
    then ``extra``, another network outside the Monitor, as a GAN's discriminator)."""
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(watched, opt, every=5) as monitor:
        for _ in range(20):
            x = torch.randn(32, 8, generator=g)
            out = trained(x)
            loss = F.cross_entropy(out if extra is None else extra(out), x[:, :4].argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        return [f for f in monitor.report().findings if f.code == "TL506"]


def test_a_copy_trained_in_the_models_place_is_reported() -> None:
    """Measured on a BERT fine-tune: the loss went 1.165 -> 1.198 (accuracy 0.342) with no
    finding; TL603 was skipped as if a GAN's discriminator were in the loss."""
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    [found] = _run(model, copy.deepcopy(model), opt)
    assert found.severity == "error" and found.module == ""
    assert found.evidence["copy"] is True and found.evidence["foreign_params"] == 4
    assert "a copy of the model" in found.message and "copy.deepcopy" in found.fix


def test_a_model_trained_through_another_network_is_not_reported() -> None:
    """A generator's loss runs through a discriminator outside its Monitor and optimizer: the
    generator's own parameters get gradients, so its optimizer steps what the loss uses."""
    torch.manual_seed(0)
    generator, critic = _net(), nn.Linear(4, 4)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-2)
    assert _run(generator, generator, opt, extra=critic) == []
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert _run(model, model, opt) == []


def test_a_monitored_part_whose_optimizer_never_steps_is_not_reported() -> None:
    """A Monitor on an encoder cut off by .detach(), with its own optimizer that the loop never
    steps, while another optimizer trains the head: the optimizer given steps nothing, so it
    is not stepping parameters the loss does not use."""
    torch.manual_seed(0)
    encoder, head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 4)
    idle = torch.optim.SGD(encoder.parameters(), lr=0.1)
    trained = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(encoder, idle, every=5) as monitor:
        for _ in range(20):
            x = torch.randn(32, 8, generator=g)
            loss = F.cross_entropy(head(encoder(x).detach()), x[:, :4].argmax(1))
            trained.zero_grad()
            loss.backward()
            trained.step()
            monitor.step(loss)
        assert [f for f in monitor.report().findings if f.code == "TL506"] == []
