"""Gradients carried from one optimizer step to the next (no zero_grad between steps): TL502 in
a Monitor run, through a sentinel armed after each observed step until that optimizer's next
step; loops that do reset .grad in time stay clean."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(g: torch.Generator, n: int = 32) -> tuple:
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :4].argmax(1)


@pytest.mark.parametrize("reset", ["none", "set_to_none", "zeros", "after_forward",
                                   "after_step"])
def test_carried_gradients_are_reported_and_reset_ones_are_not(reset: str) -> None:
    """An SGD loop without zero_grad diverged (TL604 said to lower the rate and clip, which did
    not help); zero_grad before the backward, after the forward, after the step, or in place
    (set_to_none=False) resets .grad in time."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=5) as monitor:
        for _ in range(40):
            x, y = _batch(g)
            if reset in ("set_to_none", "zeros"):
                opt.zero_grad(set_to_none=reset == "set_to_none")
            loss = F.cross_entropy(model(x), y)
            if reset == "after_forward":
                opt.zero_grad()
            loss.backward()
            opt.step()
            if reset == "after_step":
                opt.zero_grad()
            monitor.step(loss)
        report = monitor.report()
    carried = [f for f in report.findings if f.code == "TL502"]
    if reset == "none":
        [found] = carried
        assert found.module == "" and found.evidence["carried_steps"][:3] == [0, 5, 10]
        assert "optimizer.zero_grad()" in found.fix
        diverged = [f for f in report.findings if f.code == "TL604"]
        assert all(f.fix.startswith("call optimizer.zero_grad() every step first")
                   for f in diverged)
    else:
        assert carried == [] and report.trace.grads_carried == []
    assert not any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
                   for p in model.parameters())
    assert not opt._optimizer_step_pre_hooks


def test_gradient_accumulation_with_a_step_per_micro_batch_is_not_reported() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=3) as monitor:
        for step in range(40):
            x, y = _batch(g, 16)
            loss = F.cross_entropy(model(x), y)
            (loss / 4).backward()
            if step % 4 == 3:
                opt.step()
                opt.zero_grad()
            monitor.step(loss)
        assert monitor.report().trace.grads_carried == []


def test_a_generator_backward_into_the_discriminator_before_its_zero_grad_is_not_reported():
    """DCGAN's loop: the generator's loss backpropagates into the discriminator's .grad after
    the discriminator stepped; the discriminator's zero_grad() resets it before its next
    backward."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
    disc = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g = torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(gen, opt_g, every=5) as mon_g, \
            trainlint.Monitor(disc, opt_d, every=5) as mon_d:
        for _ in range(30):
            real, fake = torch.randn(32, 8, generator=g), gen(torch.randn(32, 4, generator=g))
            disc.zero_grad()
            loss_d = F.binary_cross_entropy_with_logits(disc(real), torch.ones(32, 1)) + \
                F.binary_cross_entropy_with_logits(disc(fake.detach()), torch.zeros(32, 1))
            loss_d.backward()
            opt_d.step()
            mon_d.step(loss_d)
            gen.zero_grad()
            loss_g = F.binary_cross_entropy_with_logits(disc(fake), torch.ones(32, 1))
            loss_g.backward()
            opt_g.step()
            mon_g.step(loss_g)
        assert mon_d.report().trace.grads_carried == []
        assert mon_g.report().trace.grads_carried == []


def _loop(model: nn.Module, opt: torch.optim.Optimizer, step_fn, steps: int = 30) -> list:
    """The observed steps with carried gradients over ``steps`` of ``step_fn(x, y)``."""
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=5) as monitor:
        for _ in range(steps):
            monitor.step(step_fn(*_batch(g)))
        return monitor.report().trace.grads_carried


def test_gradients_assigned_by_the_loop_each_step_are_not_carried() -> None:
    """MAML's meta-gradients and PCGrad assign .grad from torch.autograd.grad: each step
    replaces it (measured: the same loss and accuracy as zero_grad + backward; TL502 said
    'accumulate', and fail_on stopped the run at step 5)."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def assigned(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        for p, grad in zip(model.parameters(), torch.autograd.grad(loss, model.parameters())):
            p.grad = grad
        opt.step()
        return loss
    assert _loop(model, opt, assigned) == []


def test_zeroing_only_part_of_the_model_is_reported() -> None:
    """model[0].zero_grad() alone: the head carried its gradients (loss 1.45 -> 45.9), and the
    one parameter once watched, the first, was reset."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def partial(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        model[0].zero_grad()
        loss.backward()
        opt.step()
        return loss
    assert _loop(model, opt, partial)[:3] == [0, 5, 10]


@pytest.mark.parametrize("write", ["copy_", "data"])
def test_gradients_copied_into_grad_in_place_are_not_carried(write: str) -> None:
    """Gradients from torch.autograd.grad written into the same .grad tensor in place: nothing
    accumulates (measured: losses bit-identical to zero_grad + backward; TL502 said
    'accumulate')."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def copied(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        for p, grad in zip(model.parameters(), torch.autograd.grad(loss, model.parameters())):
            if p.grad is None:
                p.grad = grad.clone()
            elif write == "copy_":
                p.grad.copy_(grad)
            else:
                p.grad.data = grad
        opt.step()
        return loss
    assert _loop(model, opt, copied) == []


class _SparseBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("zeroing", ["in_place", "none"])
def test_sparse_gradients_are_left_out_of_the_watch(zeroing: str) -> None:
    """nn.Embedding(sparse=True) with SparseAdam: reading its sparse .grad raised inside the
    user's loss.backward(). Sparse gradients are not watched; the dense head still is."""
    def run(monitored: bool) -> tuple:
        model = _SparseBag()
        sparse = torch.optim.SparseAdam(list(model.emb.parameters()), lr=0.01)
        dense = torch.optim.Adam(model.head.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)
        monitor = trainlint.Monitor(model, [sparse, dense], every=3) if monitored else None
        losses = []
        for _ in range(12):
            ids = torch.randint(0, 50, (16, 5), generator=g)
            if zeroing == "in_place":
                sparse.zero_grad(set_to_none=False)
                dense.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(ids), ids[:, 0] % 4)
            loss.backward()
            sparse.step()
            dense.step()
            losses.append(loss.item())
            if monitor is not None:
                monitor.step(loss)
        carried = monitor.report().trace.grads_carried if monitor is not None else None
        if monitor is not None:
            monitor.close()
        return losses, carried
    losses, carried = run(True)
    assert losses == run(False)[0]
    assert (carried == []) == (zeroing == "in_place")


@pytest.mark.parametrize("zeroed", [True, False])
def test_an_optimizer_stepped_in_the_backward_is_watched(zeroed: bool) -> None:
    """PyTorch's optimizer-in-backward recipe (one SGD per parameter, stepped from a
    post-accumulate hook) with the hook's zero_grad() forgotten: a last-20 loss of 9.68
    against 0.318. The user's hook steps before trainlint's runs: it was missed."""
    model = _net()
    opts = {p: torch.optim.SGD([p], lr=0.05) for p in model.parameters()}

    def hook(p: torch.Tensor) -> None:
        opts[p].step()
        if zeroed:
            opts[p].zero_grad()
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, list(opts.values()), every=5) as monitor:
        for _ in range(20):
            x, y = _batch(g)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(loss)
        carried = monitor.report().trace.grads_carried
    assert (carried == []) is zeroed
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in model.parameters())


@pytest.mark.parametrize("zero_head", [True, False])
def test_of_two_optimizers_the_one_never_zeroed_is_named(zero_head: bool) -> None:
    """An Adam over the body, zeroed, and an SGD over the head, not: its gradients pile up
    (accuracy 0.484 against 0.689 with both zeroed, measured). The user calls one
    zero_grad() already: the finding names the other."""
    model = _net()
    body = torch.optim.Adam(model[0].parameters(), lr=1e-3)
    head = torch.optim.SGD(model[2].parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, [body, head], every=5) as monitor:
        for _ in range(30):
            x, y = _batch(g)
            body.zero_grad()
            if zero_head:
                head.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            body.step()
            head.step()
            monitor.step(loss)
        carried = [f for f in monitor.report().findings if f.code == "TL502"]
    if zero_head:
        assert carried == []
        return
    [found] = carried
    assert found.evidence["optimizers"] == ["SGD over '2'"]
    assert "(SGD over '2')" in found.message
    assert found.fix.startswith("also call zero_grad() on the SGD over '2'")


def test_of_two_optimizers_alike_the_one_never_zeroed_is_named_by_its_place() -> None:
    """Two Adams, each over a weight of one layer and a bias of the other (no module in
    common): the label alone would read "the Adam" for either."""
    model = _net()
    first, second = (torch.optim.Adam([model[0].weight, model[2].bias], lr=1e-3),
                     torch.optim.Adam([model[0].bias, model[2].weight], lr=1e-3))
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, [first, second], every=5) as monitor:
        for _ in range(30):
            x, y = _batch(g)
            first.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            first.step()
            second.step()
            monitor.step(loss)
        [found] = [f for f in monitor.report().findings if f.code == "TL502"]
    assert found.evidence["optimizers"] == ["Adam (optimizer 1 of those given)"]
    assert "also call zero_grad() on the Adam (optimizer 1 of those given)" in found.fix
