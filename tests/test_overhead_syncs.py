"""Host syncs: an observed step reads the device exactly once (one copy to the host, no scalar
reads), whatever the model's depth; an idle step reads nothing and carries no hooks. On CUDA,
nothing synchronizes between the start of an observed step and that copy."""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import trainlint
from trainlint import stats
from trainlint.gradcarry import WATCHED

# Tensor methods that read device values into host Python objects or host memory.
SCALAR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__array__")
COPIES = ("cpu", "numpy")


class HostReads:
    """Counts calls of the reading methods of ``torch.Tensor`` while a window is open."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter = Counter()
        self.open = False
        for name in SCALAR_READS + COPIES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name: str, original):
        def method(tensor, *args, **kwargs):
            if self.open:
                self.counts[name] += 1
            return original(tensor, *args, **kwargs)
        return method

    @contextmanager
    def window(self):
        self.counts = Counter()
        self.open = True
        try:
            yield self
        finally:
            self.open = False


class GatedMlp(nn.Module):
    """Linear blocks with a functional GELU gate (seen through the TorchFunctionMode)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return F.gelu(a) * b


def deep_model(depth: int, width: int = 64) -> nn.Sequential:
    """``depth`` blocks; the activations (batch 320 x width 64 = 20480 elements) are above
    ``SAMPLE_ABOVE``, so both the sampled and the exact statistics paths run."""
    torch.manual_seed(depth)
    layers: list[nn.Module] = [nn.Linear(16, width)]
    for i in range(depth):
        if i % 4 == 3:
            layers += [GatedMlp(width), nn.LayerNorm(width)]
        else:
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width),
                       nn.Tanh() if i % 4 == 1 else nn.ReLU()]
    layers.append(nn.Linear(width, 5))
    return nn.Sequential(*layers)


def batch(device: str = "cpu") -> tuple:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(320, 16, generator=g), torch.randint(0, 5, (320,), generator=g)
    return x.to(device), y.to(device)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_the_model_exercises_the_sampled_path() -> None:
    assert 320 * 64 > stats.SAMPLE_ABOVE


def reads_per_step(monkeypatch: pytest.MonkeyPatch, depth: int) -> tuple[Counter, Counter]:
    """Reads during an idle and during an observed Monitor step (after a first observed step
    that fills one-off caches)."""
    reads = HostReads(monkeypatch)
    model = deep_model(depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch()
    with trainlint.Monitor(model, opt, every=2) as monitor:
        monitor.step(train_step(model, opt, x, y))
        with reads.window():
            assert not monitor.observing
            monitor.step(train_step(model, opt, x, y))
        idle = reads.counts
        with reads.window():
            assert monitor.observing
            monitor.step(train_step(model, opt, x, y))
        observed = reads.counts
        assert monitor.report().trace.observed_steps == 2
    return idle, observed


def test_one_copy_per_observed_step_whatever_the_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    idle8, observed8 = reads_per_step(monkeypatch, 8)
    idle64, observed64 = reads_per_step(monkeypatch, 64)
    extra8, extra64 = observed8 - idle8, observed64 - idle64
    assert extra8["cpu"] == 1, extra8  # the one device-to-host copy in Probe.collect
    assert not any(extra8[name] for name in SCALAR_READS), extra8
    assert extra64 == extra8
    assert idle64 == idle8


def test_idle_steps_read_nothing_and_carry_no_probe_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between observations no hook is on the model; for the one step after an observed one,
    TL502's sentinel (gradient hooks on a few parameters, a step pre-hook on the optimizer)
    waits for the optimizer's next step, on the device, and is gone after it."""
    reads = HostReads(monkeypatch)
    x, y = batch()
    plain = deep_model(8)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    with reads.window():
        train_step(plain, plain_opt, x, y)
    bare = reads.counts
    model = deep_model(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, opt, every=100) as monitor:
        monitor.step(train_step(model, opt, x, y))
        assert not monitor.observing
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert len(opt._optimizer_step_pre_hooks) == 1 and not opt._optimizer_step_post_hooks
        assert sum(len(p._backward_hooks or {}) for p in model.parameters()) == WATCHED
        with reads.window():
            loss = train_step(model, opt, x, y)
            with OpsSeen() as ops:
                monitor.step(loss)
        assert not (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)
        assert not any(p._backward_hooks for p in model.parameters())
    assert reads.counts == bare
    assert sorted(ops.seen) == ["clone", "detach"]  # a copy of the loss for its window


class OpsSeen(TorchDispatchMode):
    """The names of the aten ops run while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_check_reads_once_per_step_whatever_the_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = HostReads(monkeypatch)
    counts = {}
    for depth in (8, 64):
        with reads.window():
            trainlint.check(deep_model(depth), batch(), steps=2)
        counts[depth] = reads.counts
    assert counts[8] == counts[64]
    assert counts[8]["cpu"] == 2


class SummedOverCount(nn.Module):
    """Returns its own loss as transformers' models do under Trainer: the tokens' summed
    cross-entropy over a count of them held in a tensor (``num_items_in_batch``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = deep_model(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        items = y.ne(-100).sum()
        return {"loss": F.cross_entropy(self.body(x), y, reduction="sum") / items}


def test_a_loss_over_a_count_is_judged_within_the_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a sum's divisor counts its items is read off tensors: the check goes to the
    host with the observed step's one copy, not by a read of its own."""
    reads = HostReads(monkeypatch)
    model = SummedOverCount()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch()
    with trainlint.Monitor(model, opt, every=1) as monitor:
        with reads.window():  # the first observed step reads the loss's graph
            loss = model(x, y)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
        counts = reads.counts
        report = monitor.report()
    assert counts["cpu"] == 1 and not any(counts[name] for name in SCALAR_READS), counts
    assert report.trace.loss_reduction == "mean"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_observed_step_does_not_sync_before_its_copy() -> None:
    model = deep_model(16).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = batch("cuda")
    with trainlint.Monitor(model, opt, every=1) as monitor:
        monitor.step(train_step(model, opt, x, y))  # one-off set-up (index caches, state)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert monitor.observing
            loss = train_step(model, opt, x, y)  # every hook of the observed step runs here
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                monitor.step(loss)  # parameter statistics, then the one copy
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
        trace = monitor.report().trace
    assert trace.observed_steps == 2 and trace.device.startswith("cuda")
    assert all(lt.activation is not None for lt in trace.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_loss_over_a_count_is_judged_without_a_sync() -> None:
    """The model's own sum-over-count loss on CUDA (its divisor a count on the device, or a
    number): the check of the divisor and the per-item mean run on the device."""
    for divide_by_number in (False, True):
        model = SummedOverCount().cuda()
        if divide_by_number:  # the count as a Python number: a 0-d tensor in host memory
            model.forward = lambda x, y, m=model: {  # type: ignore[method-assign]
                "loss": F.cross_entropy(m.body(x), y, reduction="sum") / len(y)}
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        x, y = batch("cuda")
        with torch.no_grad():
            expected = float(F.cross_entropy(model.body(x), y))  # every step's loss (lr 0)
        with trainlint.Monitor(model, opt, every=1):  # one-off set-up (index caches)
            _summed_step(model, opt, x, y)
        with trainlint.Monitor(model, opt, every=1) as monitor:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:  # its first observed step: the loss's graph is read in the forward
                _summed_step(model, opt, x, y)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            monitor.step()
            report = monitor.report()
        assert report.trace.loss_reduction == "mean"
        assert abs(report.trace.per_step[0]["loss"] - expected) <= 1e-4 * expected


def _summed_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    loss = model(x, y)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
