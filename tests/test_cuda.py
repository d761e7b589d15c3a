"""On a CUDA device: an observed step adds no host sync to the user's own step on models of
every kind the probe treats differently (conv maps with BatchNorm and a residual, functional
activations, token inputs with attention, an LSTM, bfloat16 autocast), and the statistics
read on the GPU are those read on the CPU from the same tensors. Skipped without CUDA (CI has
none); ``benchmarks/gpu_check.sh`` runs them on a CUDA machine."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint import stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ConvNet(nn.Module):
    """Conv + BatchNorm + ReLU blocks, a residual sum, a functional ReLU and a squeeze gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.gate = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = F.relu(self.bn(self.conv(h)) + h)
        h = h * torch.sigmoid(self.gate(h.mean((2, 3))))[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Encoder(nn.Module):
    """Token ids through an embedding and two transformer layers (GELU, LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


class LstmLm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 100)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lstm(self.embed(ids))[0])).flatten(0, 1)


class Tabular(nn.Module):
    """Embedded category columns joined with the raw numeric ones by ``torch.cat`` (a model
    input's join), and a residual written ``x + branch`` (a sum edge for each operand)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.inp = nn.Linear(3 * 8 + 4, 64)
        self.branch = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cats = self.embed(x[:, :3].long()).flatten(1)
        h = torch.relu(self.inp(torch.cat([cats, x[:, 3:]], dim=1)))
        return self.head(h + self.branch(h))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256),
                         nn.Tanh(), nn.Linear(256, 256), nn.GELU(), nn.LayerNorm(256),
                         nn.Linear(256, 5))


def _case(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "conv":
        return ConvNet(), torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,))
    if name in ("encoder", "encoder-bf16"):
        return Encoder(), torch.randint(0, 100, (16, 24), generator=g), torch.randint(0, 5, (16,))
    if name == "lstm":
        ids = torch.randint(0, 100, (8, 20), generator=g)
        return LstmLm(), ids, torch.randint(0, 100, (8 * 20,), generator=g)
    if name == "tabular":
        cats = torch.randint(0, 20, (64, 3), generator=g).float()
        x = torch.cat([cats, torch.randn(64, 4, generator=g) * 50 + 10], dim=1)
        return Tabular(), x, torch.randint(0, 3, (64,), generator=g)
    x, y = torch.randn(320, 16, generator=g), torch.randint(0, 5, (320,), generator=g)
    if name == "mlp-float64":
        return _mlp().double(), x.double(), y
    return _mlp(), x, y


CASES = ("mlp", "conv", "encoder", "encoder-bf16", "lstm", "tabular", "mlp-float64")


def _train_step(name: str, model: nn.Module, opt: torch.optim.Optimizer, x, y) -> torch.Tensor:
    bf16 = name.endswith("bf16")
    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# What CUDA's sync debug mode 'warn' says at each sync (not its one-off "prototype" notice).
SYNC_WARNING = "called a synchronizing CUDA operation"


@contextmanager
def syncs_seen():
    """Where each host sync happened while open (CUDA sync debug mode 'warn')."""
    seen: list[str] = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if SYNC_WARNING in str(w.message):
            seen.append(f"{w.filename}:{w.lineno}: {str(w.message)[:80]}")


@pytest.mark.parametrize("name", CASES)
def test_an_observed_step_adds_no_sync_to_the_users_step(name: str) -> None:
    torch.manual_seed(0)
    base, x, y = _case(name)
    x, y = x.cuda(), y.cuda()
    plain = copy.deepcopy(base).cuda()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    _train_step(name, plain, plain_opt, x, y)
    with syncs_seen() as bare:
        _train_step(name, plain, plain_opt, x, y)
    model = copy.deepcopy(base).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        monitor.step(_train_step(name, model, opt, x, y))  # one-off set-up (caches, state)
        with syncs_seen() as observed:
            assert monitor.observing
            loss = _train_step(name, model, opt, x, y)
        with syncs_seen() as collect:
            monitor.step(loss)
        trace = monitor.report().trace
    assert len(observed) == len(bare), (bare, observed)
    assert len(collect) == 1, collect  # the one copy of the step's statistics
    assert trace.observed_steps == 2 and trace.device.startswith("cuda")
    assert all(lt.activation is not None for lt in trace.layers)


TENSORS = {
    "small": lambda g: torch.randn(16, 40, generator=g),
    "sampled": lambda g: torch.randn(64, 8, 24, 24, generator=g) * 3 + 1,
    "relu-sampled": lambda g: torch.relu(torch.randn(64, 32, 16, 16, generator=g)),
    "strided": lambda g: torch.randn(32, 64, 300, generator=g).transpose(1, 2),
    "with-nan": lambda g: torch.randn(64, 8, 24, 24, generator=g).index_fill_(
        2, torch.tensor([3]), float("nan")),
}


@pytest.mark.parametrize("name", sorted(TENSORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_on_the_gpu_are_those_on_the_cpu(name: str, dtype: torch.dtype) -> None:
    x = TENSORS[name](torch.Generator().manual_seed(1)).to(dtype)
    for read in (lambda t: stats.activation_stats(t, "relu"), stats.grad_stats,
                 stats.between_sample):
        on_cpu, on_gpu = read(x).numpy(), read(x.cuda()).numpy()
        assert np.allclose(on_gpu, on_cpu, rtol=1e-9, atol=1e-12, equal_nan=True), \
            (read, on_cpu, on_gpu)
    hi_cpu, _ = stats.unit_extremes(x, 1)
    hi_gpu, _ = stats.unit_extremes(x.cuda(), 1)
    # A max: the same element on both devices (NaN where a unit holds one).
    torch.testing.assert_close(hi_gpu.cpu(), hi_cpu, rtol=0, atol=0, equal_nan=True)


def test_check_on_the_gpu_finds_what_it_finds_on_the_cpu() -> None:
    def codes(device: str) -> list:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 3))
        with torch.no_grad():
            model[2].bias.fill_(-50.0)  # the second ReLU layer is dead from the start
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
        report = trainlint.check(model.to(device), (x.to(device), y.to(device)), steps=3)
        assert report.trace.device.startswith(device)
        return sorted((f.code, f.module) for f in report.findings)

    on_gpu = codes("cuda")
    assert on_gpu == codes("cpu")
    assert any(code == "TL101" for code, _ in on_gpu), on_gpu


def test_a_sync_location_is_reported_where_it_happens() -> None:
    with syncs_seen() as seen:
        torch.ones(1, device="cuda").item()
    assert len(seen) == 1 and seen[0].startswith(f"{__file__}:"), seen


class GruEncoder(nn.Module):
    """A seq2seq encoder's pattern: the classifier reads the GRU's h_n alone. cuDNN's GRU is one
    autograd node, so the backward reaches its (unused) output tensor with no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(self.embed(ids))
        return self.head(h[-1])


def test_an_rnn_trained_through_its_hidden_state_alone() -> None:
    torch.manual_seed(0)
    model = GruEncoder().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 50, (8, 12), generator=g), torch.randint(0, 3, (8,), generator=g)
    ids, y = ids.cuda(), y.cuda()
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(2):
            monitor.step(_train_step("gru", model, opt, ids, y))
        layers = {lt.module: lt for lt in monitor.report().trace.layers}
    assert layers["gru"].activation.count == 2 * 8 * 12 * 32 and layers["gru"].grad_norm is None
    assert layers["head"].grad_norm > 0 and layers["embed"].grad_norm > 0
