"""Forwards the probe does not read (inference mode, ``torch.func`` transforms) next to the
ordinary forward/backward it does, and inputs it cannot read (nested tensors): the run goes
on, and what the probe reports comes from the ordinary training steps only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.checkpoint import checkpoint

import trainlint


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _layers(report: trainlint.Report) -> dict:
    return {lt.module: lt for lt in report.trace.layers}


def test_an_inference_mode_pass_before_training_is_not_observed() -> None:
    model = _mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, optimizer=opt, every=100) as monitor:
        with torch.inference_mode():  # a baseline validation, inputs 1000x the training ones
            model.eval()
            model(1000 * x)
            model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        first_out = F.linear(x, model[0].weight, model[0].bias)  # not a module call
        expected = first_out.std(correction=0).item()
        opt.step()
        monitor.step(loss)
        report = monitor.report()
    first = _layers(report)["0"]
    assert first.activation.count == 8 * 16  # the training forward's values only
    assert first.activation.std == pytest.approx(expected, rel=1e-6)
    assert report.trace.inputs[0].std == pytest.approx(x.std(0, correction=0).numpy(), rel=1e-5)


class _Distill(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.teacher.requires_grad_(False)
        self.student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            target = self.teacher(x)
        return self.student(x) + 0 * target.clone()


def test_a_teacher_under_inference_mode_inside_forward_is_left_out_of_a_check() -> None:
    report = trainlint.check(_Distill(), (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    observed = {lt.module for lt in report.trace.layers}
    assert {"student.0", "student.1", "student.2"} <= observed
    assert not any(name.startswith("teacher") for name in observed)


class _VmappedHead(nn.Module):
    """A per-sample function applied with vmap inside forward, after an ordinary layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vmap(self.head)(torch.tanh(self.body(x)))


def test_vmap_inside_forward_observes_the_layers_outside_it() -> None:
    report = trainlint.check(_VmappedHead(), (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    layers = _layers(report)
    assert layers["body"].activation.count == 3 * 8 * 6  # three steps
    assert layers["body"].grad_norm > 0
    assert "head" not in layers  # its output only exists batched inside vmap


def test_per_sample_gradients_with_torch_func_and_a_monitor() -> None:
    model = _mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_one(params: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(2):
            params = {k: v.detach() for k, v in model.named_parameters()}
            per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
            for name, p in model.named_parameters():
                p.grad = per_sample[name].mean(0)
            expected = model[0].weight.grad.norm().item()
            opt.step()
            monitor.step()
        params = {p.name: p for p in monitor.report().trace.params}
    assert params["0.weight"].grad_norm == pytest.approx(expected, rel=1e-6)
    assert len(params["0.weight"].update_norms) == 2


def test_a_jvp_regularizer_beside_the_ordinary_forward() -> None:
    model = _mlp()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        opt.zero_grad()
        _, tangent = jvp(model, (x,), (torch.ones_like(x),))
        loss = F.cross_entropy(model(x), y) + 0.01 * tangent.pow(2).mean()
        loss.backward()
        first_out = F.linear(x, model[0].weight, model[0].bias)  # not a module call
        expected = first_out.std(correction=0).item()
        opt.step()
        monitor.step(loss)
        first = _layers(monitor.report())["0"]
    assert first.activation.count == 8 * 16  # the ordinary forward only
    assert first.activation.std == pytest.approx(expected, rel=1e-6)


class _Ragged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, nt: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.mean(0) for t in self.proj(nt).unbind()])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_batch_is_checked(layout: torch.layout) -> None:
    torch.manual_seed(0)
    nt = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(5, 4)], layout=layout)
    report = trainlint.check(_Ragged(), nt)
    assert report.trace.observed_steps == 3
    assert report.trace.batch_size == 2
    assert report.trace.inputs == []  # a ragged input has no per-channel table


@dataclass
class Node:
    """An output that refers to itself (a tree whose child points back to its parent)."""

    value: torch.Tensor
    parent: Optional[Node] = None
    child: Optional[Node] = None


class Tree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> Node:
        root = Node(self.fc(x) * 2)
        root.child = Node(root.value + 1, parent=root)
        return root


class UsesTree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tree = Tree()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, hint: Optional[torch.Tensor] = None) -> torch.Tensor:
        width = 4 if hint is None else hint.shape[-1]  # a meta tensor: only its shape is read
        return self.head(self.tree(x[:, :width]).child.value)


def _two_monitored_steps(model: nn.Module, **forward_kwargs) -> trainlint.Report:
    """Two training steps of ``model`` on one batch under a Monitor that observes both."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x, **forward_kwargs), y)
            loss.backward()
            opt.step()
            monitor.step(loss)
        return monitor.report()


def test_cyclic_outputs_and_meta_inputs_are_passed_over() -> None:
    torch.manual_seed(0)
    report = _two_monitored_steps(UsesTree(), hint=torch.empty(8, 4, device="meta"))
    assert report.trace.observed_steps == 2
    assert {i.name for i in report.trace.inputs} == {"input0"}


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpoints_recompute_in_backward_is_not_a_second_call(reentrant: bool) -> None:
    """torch.utils.checkpoint runs the forward again during the backward: no new point, no
    second row for the points of the step's forward."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 16), nn.ReLU())

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head = block, nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.a, x, use_reentrant=reentrant))

    x = torch.randn(8, 6, requires_grad=reentrant)
    report = trainlint.check(Checkpointed(), (x, torch.randint(0, 2, (8,))), steps=1)
    keys = set(report.trace.layer_by_key())
    assert keys == {("a.0", "output"), ("a.1", "output"), ("head", "output")}
    assert next(lt for lt in report.trace.layers if lt.module == "a.0").activation.count == 8 * 16


class CheckpointedOrFrozen(nn.Module):
    """A block run through torch.utils.checkpoint (reentrant or not), or under no_grad; and a
    frozen feature layer under no_grad beside it, never recomputed."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inp, self.head = nn.Linear(4, 6), nn.Linear(16, 2)
        self.a = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.frozen = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.inp(x) + self.frozen(x)
        if self.how == "frozen":
            with torch.no_grad():
                h = self.a(x)
            return self.head(h)
        reentrant = self.how == "reentrant"
        return self.head(checkpoint(self.a, x.requires_grad_(), use_reentrant=reentrant))


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant", "frozen"])
def test_reentrant_checkpointing_says_which_gradients_it_hides(how: str) -> None:
    """A reentrant checkpoint runs its block with autograd off and again in the backward: no
    gradient hook can go on the block's outputs, and the report says so (through the CLI's
    check and through a Monitor), counting those layers only, not the frozen ones beside them;
    a non-reentrant one hides nothing, and a block frozen under no_grad, never recomputed, has
    no gradient to hide."""
    torch.manual_seed(0)
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    for report in (trainlint.check(CheckpointedOrFrozen(how), batch, steps=1),
                   _two_monitored_steps(CheckpointedOrFrozen(how))):
        notes = [n for n in report.notes if "use_reentrant=True" in n]
        layers = _layers(report)
        assert layers["head"].grad_norm is not None
        if how == "reentrant":
            assert len(notes) == 1 and notes[0].startswith("2 layer(s) ran with autograd off")
            assert layers["a.0"].grad_norm is None and layers["a.1"].grad_norm is None
        else:
            assert notes == []
        if how == "non-reentrant":
            assert layers["a.0"].grad_norm > 0


class CheckpointedBlocks(nn.Module):
    """A stem, then blocks through torch.utils.checkpoint (reentrant or not) or under no_grad,
    on the stem's output or on the raw input, which needs no gradient."""

    def __init__(self, how: str, on_input: bool) -> None:
        super().__init__()
        self.how, self.on_input = how, on_input
        self.stem = nn.Linear(6, 6)
        self.blocks = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.on_input else self.stem(x)
        if self.how == "no_grad":
            with torch.no_grad():
                out = self.blocks(h)
        else:
            with warnings.catch_warnings():  # (torch warns that no input requires grad)
                warnings.simplefilter("ignore")
                out = checkpoint(self.blocks, h, use_reentrant=self.how == "reentrant")
        return self.head(out + self.stem(x))


@pytest.mark.parametrize("how, on_input, cut", [
    ("reentrant", True, True), ("reentrant", False, False), ("non-reentrant", True, False),
    ("no_grad", False, True)])
def test_blocks_run_without_autograd_are_unused_for_that_reason(how, on_input, cut) -> None:
    """A reentrant checkpoint whose input needs no gradient returns outputs that need none:
    its blocks get no gradient, and TL505 says autograd was off there, with the fix; with the
    stem's output (which needs a gradient) as input, or use_reentrant=False, they train."""
    torch.manual_seed(0)
    model = CheckpointedBlocks(how, on_input)
    report = trainlint.check(model, (torch.randn(8, 6), torch.randint(0, 2, (8,))), steps=1)
    found = [f for f in report.findings if f.code == "TL505"]
    assert [f.module for f in found] == (["blocks"] if cut else [])
    if cut:
        assert "ran with autograd off inside the training forward" in found[0].message
        assert "use_reentrant=False" in found[0].fix


class Halves(nn.Module):
    """A leaf whose output is two chunks of one tensor: one autograd node, two outputs."""

    def forward(self, x: torch.Tensor) -> tuple:
        return x.chunk(2, dim=-1)


class UsesSecondHalf(nn.Module):
    """Trains on the second chunk only, as a seq2seq encoder trains on an RNN's h_n alone
    (on CUDA, cuDNN's RNN is one node whose output tensor then gets no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.split, self.head = nn.Linear(4, 16), Halves(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.split(self.fc(x))[1])


def test_an_output_that_gets_no_gradient_while_its_node_does() -> None:
    """The backward calls the hook on the unused chunk with None: no gradient there, no crash
    inside the user's loop."""
    torch.manual_seed(0)
    report = _two_monitored_steps(UsesSecondHalf())
    layers = _layers(report)
    assert report.trace.observed_steps == 2
    assert layers["split"].activation.count == 2 * 8 * 8  # its first chunk, read each step
    assert layers["split"].grad_norm is None  # which no gradient reached
    assert layers["fc"].grad_norm > 0 and layers["head"].grad_norm > 0


def test_a_checkpointed_block_trains_the_same_under_a_monitor() -> None:
    """Non-reentrant activation checkpointing (transformers' gradient_checkpointing) compares
    what autograd saved in the forward with the recompute in the backward: the probe's reads
    of a block's own output (its residual sum) must record nothing."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.fc = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.nn.functional.gelu(self.fc(self.ln(x)))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return self.head(x.mean(1))

    def train(monitored: bool) -> list:
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = trainlint.Monitor(model, optimizer=opt, every=1) if monitored else None
        for _ in range(2):
            x, y = torch.randn(4, 5, 16), torch.randint(0, 3, (4,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step(loss)
        if monitor is not None:
            assert monitor.report().trace.observed_steps == 2
            monitor.close()
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(train(True), train(False)):
        assert torch.equal(got, want)
