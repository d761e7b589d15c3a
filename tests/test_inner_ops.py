"""A user's leaf module without weights that only slices or reshapes its input (a causal TCN's
``Chomp1d``) is seen through like a Dropout: the probe keeps the ops its forward applied
(``ModuleFacts.attrs["inner_ops"]``), and TL402/TL403 read the conv behind it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint

VOCAB, DIM, LENGTH, CLASSES = 100, 32, 24, 4


class Chomp1d(nn.Module):
    """Drops the causal padding's last ``n`` positions (the TCN paper's code)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :-self.n].contiguous()


class Centre(nn.Module):
    """Computes: subtracts each channel's mean over time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True)


class Fresh(nn.Module):
    """Returns a tensor not made from its input by ops the probe follows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape, device=x.device) + 0.0


class Block(nn.Module):
    def __init__(self, dilation: int, cut: type, bias: bool) -> None:
        super().__init__()
        pad = 2 * dilation
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=pad, dilation=dilation, bias=bias)
        self.cut = cut(pad) if cut is Chomp1d else nn.Sequential(Chomp1d(pad), cut())
        self.bn = nn.BatchNorm1d(DIM)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.cut(self.conv(x))))


class Tcn(nn.Module):
    def __init__(self, cut: type = Chomp1d, bias: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.Sequential(*(Block(d, cut, bias) for d in (1, 2, 4)))
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(ids).transpose(1, 2))[:, :, -1])


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, VOCAB, (32, LENGTH), generator=g),
            torch.randint(0, CLASSES, (32,), generator=g))


def _check(model: nn.Module) -> trainlint.Report:
    torch.manual_seed(0)
    return trainlint.check(model, _batch(), steps=2)


def _codes(report: trainlint.Report, code: str) -> list:
    return sorted(f.module for f in report.findings if f.code == code)


def test_the_probe_keeps_the_ops_of_a_slicing_module() -> None:
    report = _check(Tcn())
    modules = report.trace.modules
    assert modules["blocks.0.cut"].attrs["inner_ops"] == ["__getitem__", "contiguous"]
    assert "inner_ops" not in modules["blocks.0.conv"].attrs  # it has weights
    assert "inner_ops" not in modules["blocks.0.act"].attrs  # an activation: a point of its own


def test_batchnorm_behind_a_chomp_normalizes_conv_maps() -> None:
    """TL402 stays silent as for ``self.conv(x)[:, :, :-n]`` written inline; TL403 sees that
    the conv's bias goes only, sliced, into the BatchNorm that cancels it."""
    assert _codes(_check(Tcn()), "TL402") == []
    biased = _check(Tcn(bias=True))
    assert _codes(biased, "TL403") == [f"blocks.{i}.conv" for i in range(3)]
    assert _codes(biased, "TL402") == []


def test_a_module_that_computes_is_no_pass_through() -> None:
    report = _check(Tcn(cut=Centre, bias=True))
    centre = report.trace.modules["blocks.0.cut.1"]
    assert centre.attrs["inner_ops"] == ["sub"]  # x - x.mean(...): the first operand's path
    assert _codes(report, "TL402") == [f"blocks.{i}.bn" for i in range(3)]
    assert _codes(report, "TL403") == []


def test_a_module_whose_output_the_probe_did_not_follow_is_no_pass_through() -> None:
    report = _check(Tcn(cut=Fresh))
    assert "inner_ops" not in report.trace.modules["blocks.0.cut.1"].attrs
    assert _codes(report, "TL402") == [f"blocks.{i}.bn" for i in range(3)]


class Shared(nn.Module):
    """One module called with two different ops: slices once, doubles once."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x[:, :, :-1] if self.calls % 2 else x * 2


def test_a_module_whose_calls_differ_keeps_no_ops() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            self.conv = nn.Conv1d(DIM, DIM, 3, padding=1)
            self.shared = Shared()
            self.bn = nn.BatchNorm1d(DIM)
            self.head = nn.Linear(DIM, CLASSES)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.shared(self.shared(self.conv(self.embed(ids).transpose(1, 2))))
            return self.head(self.bn(h).mean(-1))

    report = _check(Twice())
    assert "inner_ops" not in report.trace.modules["shared"].attrs
    assert _codes(report, "TL402") == ["bn"]


class ConvActNorm(nn.Module):
    """Embedding -> Conv1d -> ReLU -> BatchNorm1d (the conv-act-BN order), with the ReLU a
    module or ``F.relu``; or the ReLU on the embeddings themselves."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(VOCAB, DIM)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm1d(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(1, 2)
        if self.how == "module":
            h = self.act(self.conv(x))
        elif self.how == "functional":
            h = F.relu(self.conv(x))
        else:
            h = self.conv(self.act(x))
            return self.head(self.bn(self.act(x)).mean(-1) + h.mean(-1))
        return self.head(self.bn(h).mean(-1))


def test_conv_then_activation_then_batchnorm_normalizes_conv_maps() -> None:
    assert _codes(_check(ConvActNorm("module")), "TL402") == []
    assert _codes(_check(ConvActNorm("functional")), "TL402") == []
    assert _codes(_check(ConvActNorm("embeddings")), "TL402") == ["bn"]
