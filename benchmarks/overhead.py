"""What observing a training step costs: step time and peak memory as ratios to plain training.

    python benchmarks/overhead.py            # CPU, all workloads, depth rows, memory (minutes)
    python benchmarks/overhead.py --quick    # fewer workloads' extras, no memory runs
    python benchmarks/overhead.py --device cuda

Every mode trains its own copy of the same model on the same batch; the modes take turns
step by step (in a new shuffled order every round) in ONE process, so a noisy machine slows them
alike. Reported: the median step time over ``--steps`` steps after ``--warmup``, its ratio
to ``plain``, the median minor page faults a step (on glibc, the heap's top handed back to the
kernel and taken again: they fall on whichever mode the interleaving disfavours, about 1 us
each), and the peak memory of a separate short run per mode (RSS on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA).

Modes:
  plain               the training step alone
  floor               hooks that read every observed tensor once (one ``sum()`` into a
                      device accumulator per leaf output and per gradient w.r.t. it, but
                      at an activation's output, which trainlint does not read)
  exact-floor         the floor plus the other full reads trainlint's exact answers need,
                      done as trainlint does them: a ReLU/GELU-family output's per-unit
                      max (and min) instead of its sum, one sum of every parameter after
                      the optimizer step (no samples, no statistics)
  sampled-floor       the exact floor plus trainlint's sample gathers (of each observed
                      tensor, and of the parameters and their gradients around the
                      optimizer step) into a row buffer, with no statistics or host work
                      (not in the default table: ``--modes``, phases.py)
  naive               the usual hand-written monitor: per leaf output mean/std/zero
                      fraction, each read with ``.item()``
  trainlint-observed  ``trainlint.Monitor(every=1)``: every step observed
  trainlint-idle      ``trainlint.Monitor`` between observations
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("plain", "floor", "exact-floor", "naive", "trainlint-observed", "trainlint-idle")
DEPTH_MODES = ("plain", "floor", "trainlint-observed", "trainlint-idle")
DEPTHS = (8, 32, 128)


# ----------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A model factory, one fixed batch, a loss and an optimizer factory."""

    name: str
    description: str
    model: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    loss: Callable[[Any, Any], torch.Tensor]
    optimizer: Callable[[Any], torch.optim.Optimizer]


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4)


def _cnn() -> nn.Module:
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, stride in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU()]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*layers)


def _mlp(depth: int, width: int, d_in: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    """Token embedding, ``nn.TransformerEncoder``, mean pooling, a linear classifier."""

    def __init__(self, vocab: int = 1000, d: int = 256, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = 4 * width
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


def _resnet50(thin: int = 1) -> nn.Module:
    """ResNet-50's layout (3-4-6-3 bottlenecks), written here: torchvision is not a dependency;
    ``thin``: every width divided by it."""
    stem = 64 // thin
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    c_in = stem
    for blocks, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
        for i in range(blocks):
            layers.append(_Bottleneck(c_in, width // thin, stride if i == 0 else 1))
            c_in = 4 * width // thin
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 1000)]
    return nn.Sequential(*layers)


def _images(n: int, size: int, classes: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(n, 3, size, size), torch.randint(0, classes, (n,)))


def workloads(depth_width: int = 256) -> dict[str, Workload]:
    ce = F.cross_entropy
    table = [
        Workload("cnn", "6 x (conv3x3, BatchNorm, ReLU), 32x32 images, batch 64, SGD",
                 _cnn, _images(64, 32, 10), ce, _sgd),
        Workload("mlp", "8 x (Linear 1024, ReLU), batch 256, SGD",
                 lambda: _mlp(8, 1024, 1024),
                 lambda: (torch.randn(256, 1024), torch.randint(0, 10, (256,))), ce, _sgd),
        Workload("transformer", "nn.TransformerEncoder 4 layers, d=256, seq 128, batch 16, AdamW",
                 _Encoder, lambda: (torch.randint(0, 1000, (16, 128)),
                                    torch.randint(0, 10, (16,))), ce, _adamw),
        Workload("resnet50", "ResNet-50 layout, 224x224 images, batch 64, SGD",
                 _resnet50, _images(64, 224, 1000), ce, _sgd),
        # On a CPU, a stand-in for a GPU's observed ResNet-50 step, where the host's work per
        # observed tensor is what the step waits on: the same 159 points and 161 parameters,
        # each small enough to cost next to nothing to read.
        Workload("resnet50-thin", "ResNet-50 layout at 1/8 width, 16x16 images, batch 2, SGD",
                 lambda: _resnet50(thin=8), _images(2, 16, 1000), ce, _sgd),
        # The MLP's and the CNN's layouts with tensors small enough that reading one costs next
        # to nothing: what observing adds there is its fixed cost per tensor and per step.
        Workload("mlp-w16", "8 x (Linear 16, ReLU), batch 256, SGD",
                 lambda: _mlp(8, 16, 16),
                 lambda: (torch.randn(256, 16), torch.randint(0, 10, (256,))), ce, _sgd),
        Workload("cnn-tiny", "the CNN's layers on 8x8 images, batch 2, SGD",
                 _cnn, _images(2, 8, 10), ce, _sgd),
    ]
    for depth in DEPTHS:
        table.append(Workload(
            f"depth{depth}", f"{depth} x (Linear {depth_width}, ReLU), batch 256, SGD",
            lambda depth=depth: _mlp(depth, depth_width, depth_width),
            lambda: (torch.randn(256, depth_width), torch.randint(0, 10, (256,))), ce, _sgd))
    return {w.name: w for w in table}


# ----------------------------------------------------------------------------- modes
def _first_float(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_float(item)
            if found is not None:
                return found
    return None


def _leaves(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]


class Mode:
    """Plain training: nothing attached."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.handles: list = []

    def after_step(self, loss: torch.Tensor) -> None:
        """Called after ``optimizer.step()``; part of the timed step."""

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class Floor(Mode):
    """One read of every tensor trainlint observes: a sum into a device accumulator (each leaf
    output, and the gradient w.r.t. it but at an activation's output, which trainlint does not
    read inside the network)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from trainlint.probe import activation_kind
        from trainlint.trace import GRADIENT_FREE_KINDS

        super().__init__(model, optimizer)
        device = next(model.parameters()).device
        self.acc = torch.zeros((), device=device)
        self.units = {m: activation_kind(m) for _, m in _leaves(model)}
        self.gradient_free = {m for m, kind in self.units.items() if kind in GRADIENT_FREE_KINDS}
        self.handles = [m.register_forward_hook(self._output) for _, m in _leaves(model)]

    def _output(self, module: nn.Module, args: Any, out: Any) -> None:
        t = _first_float(out)
        if t is None:
            return
        self.acc.add_(t.detach().sum())
        self._hook_grad(module, t)

    def _hook_grad(self, module: nn.Module, t: torch.Tensor) -> None:
        if t.requires_grad and module not in self.gradient_free:
            t.register_hook(self._grad)

    def _grad(self, grad: torch.Tensor) -> None:
        self.acc.add_(grad.sum())


class ExactFloor(Floor):
    """The floor plus the full reads behind trainlint's exact answers (NaN/Inf presence, the
    per-unit ever-active record, the weights' NaN/Inf presence), with trainlint's own reads."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from trainlint.probe import CHANNEL_FIRST_TYPES

        self.channel_first = {m: isinstance(m, CHANNEL_FIRST_TYPES) for _, m in _leaves(model)}
        self.has_params = {m: any(True for _ in m.parameters()) for _, m in _leaves(model)}
        super().__init__(model, optimizer)
        self.params = list(model.parameters())
        self.layout_channel_first = False

    def _output(self, module: nn.Module, args: Any, out: Any) -> None:
        from trainlint import stats

        t = _first_float(out)
        if t is None:
            return
        kind = self.units.get(module)
        if self.channel_first.get(module):
            self.layout_channel_first = True
        elif kind is None and self.has_params.get(module):  # as the probe reads the layout
            self.layout_channel_first = False
        if kind in ("relu", "gelu") and t.dim() >= 1:
            dim = 1 if t.dim() >= 3 and self.layout_channel_first else -1
            hi, lo = stats.unit_extremes(t.detach(), dim, kind)
            self.acc.add_(hi.amax() if lo is None else hi.amax() + lo.amin())
        else:
            self.acc.add_(t.detach().sum())
        self._hook_grad(module, t)

    def after_step(self, loss: torch.Tensor) -> None:
        with torch.no_grad():
            for p in self.params:
                self.acc.add_(p.sum())


class SampledFloor(ExactFloor):
    """The exact floor plus trainlint's samples, gathered as the probe gathers them (its plans:
    runs of 16 values of a large tensor, a small one whole) into a row buffer: of each leaf
    output and each gradient the floor reads, and of every parameter and its gradient before
    the optimizer step and of the parameter after it. No statistics, no host work: what
    trainlint-observed adds beyond this is its own machinery (statistics kernels, the host's
    work on the copy, hook plumbing, Python)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        from trainlint import stats

        self.stats = stats
        self.views: dict = {}
        self.row = 0
        device = next(model.parameters()).device
        self.rows = torch.empty((256, stats.SAMPLE_ABOVE + 2 * stats.SIGNAL_WIDTH),
                                device=device)
        self.handles.append(optimizer.register_step_pre_hook(self._before))
        self.handles.append(optimizer.register_step_post_hook(self._after))

    def _sample(self, t: torch.Tensor, with_signal: bool = True) -> None:
        if t.dtype != self.rows.dtype:  # (the workloads train in float32)
            return
        plan = self.stats.plan_for(t, with_signal)
        row = self.row % len(self.rows)
        self.row += 1
        for part in plan.copies:
            if part.how == "nan":
                continue
            key = (row, part, t.shape)
            out = self.views.get(key)
            if out is None:
                out = self.views[key] = self.stats.shaped_for(
                    self.rows[row, part.offset:part.offset + part.length], part, t.shape)
            self.stats.fill(out, t, part)

    def _output(self, module: nn.Module, args: Any, out: Any) -> None:
        super()._output(module, args, out)
        t = _first_float(out)
        if t is not None:
            with torch.no_grad():
                self._sample(t)

    def _grad(self, grad: torch.Tensor) -> None:
        super()._grad(grad)
        self._sample(grad, False)

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p in self.params:
                self._sample(p, False)
                if p.grad is not None:
                    self._sample(p.grad, False)

    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p in self.params:
                self._sample(p, False)

    def after_step(self, loss: torch.Tensor) -> None:
        super().after_step(loss)
        self.row = 0


class Naive(Mode):
    """The common hand-written monitor: mean, std and zero fraction read with ``.item()``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        self.rows: list = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in _leaves(model)]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = _first_float(out)
            if t is None:
                return
            t = t.detach()
            self.rows.append((name, t.mean().item(), t.std().item(),
                              (t == 0).float().mean().item()))
        return hook

    def after_step(self, loss: torch.Tensor) -> None:
        self.rows.clear()


class Trainlint(Mode):
    """``trainlint.Monitor``; ``every=1`` observes every step, a huge ``every`` none after the
    first (the first step is part of the warm-up)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int,
                 package: Any = None) -> None:
        super().__init__(model, optimizer)
        if package is None:
            import trainlint as package

        self.monitor = package.Monitor(model, optimizer=optimizer, every=every)

    def after_step(self, loss: torch.Tensor) -> None:
        self.monitor.step(loss)

    def close(self) -> None:
        self.monitor.close()


def make_mode(name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Mode:
    if name == "plain":
        return Mode(model, optimizer)
    if name == "floor":
        return Floor(model, optimizer)
    if name == "exact-floor":
        return ExactFloor(model, optimizer)
    if name == "sampled-floor":
        return SampledFloor(model, optimizer)
    if name == "naive":
        return Naive(model, optimizer)
    if name == "trainlint-observed":
        return Trainlint(model, optimizer, every=1)
    if name == "trainlint-idle":
        return Trainlint(model, optimizer, every=10**9)
    raise ValueError(f"unknown mode {name!r}")


# ----------------------------------------------------------------------------- timing
class Runner:
    """One mode's own model copy, optimizer and batch."""

    def __init__(self, mode: str, base: nn.Module, workload: Workload, batch: tuple,
                 device: torch.device, factory: Callable[..., Mode] = make_mode) -> None:
        self.name = mode
        self.model = copy.deepcopy(base).to(device).train()
        self.optimizer = workload.optimizer(self.model.parameters())
        self.inputs, self.targets = batch
        self.loss = workload.loss
        self.device = device
        self.mode = factory(mode, self.model, self.optimizer)

    def step(self) -> tuple[float, float, int]:
        """One timed training step: (wall seconds, CPU seconds of this process, its minor page
        faults)."""
        _sync(self.device)
        faults = _minor_faults()
        start, cpu = time.perf_counter(), time.process_time()
        self.train()
        _sync(self.device)
        return (time.perf_counter() - start, time.process_time() - cpu,
                _minor_faults() - faults)

    def train(self, mark: Callable[[], None] = lambda: None) -> None:
        """One training step; ``mark()`` after each of its phases: zero_grad,
        the forward with the loss, the backward, the optimizer step, the mode's step hook."""
        self.optimizer.zero_grad(set_to_none=True)
        mark()
        loss = self.loss(self.model(self.inputs), self.targets)
        mark()
        loss.backward()
        mark()
        self.optimizer.step()
        mark()
        self.mode.after_step(loss)
        mark()


def _minor_faults() -> int:
    """This process's minor page faults so far (pages the kernel mapped on first touch: on
    glibc, memory the heap gave back and took again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(workload: Workload, device: torch.device) -> tuple:
    torch.manual_seed(0)
    x, y = workload.batch()
    return x.to(device), y.to(device)


def time_modes(workload: Workload, modes: tuple, steps: int, warmup: int,
               device: torch.device, factory: Callable[..., Mode] = make_mode,
               measure: Callable[[Runner], Any] = Runner.step) -> dict[str, list]:
    """Per mode, ``measure(runner)`` of each timed step (default: (wall, CPU) step times),
    the modes taking turns step by step in an order shuffled every round (seeded): no mode
    always runs right after the same other one, whose leftovers (cold caches, garbage) would
    fall on it (about 0.1 ms after an observed step); ``factory(name, model, optimizer)`` makes
    each mode (default :func:`make_mode`)."""
    torch.manual_seed(0)
    base = workload.model()
    batch = _batch(workload, device)
    runners = [Runner(mode, base, workload, batch, device, factory) for mode in modes]
    times: dict[str, list] = {mode: [] for mode in modes}
    try:
        order = random.Random(0)
        for i in range(warmup + steps):
            for runner in order.sample(runners, len(runners)):
                elapsed = measure(runner)
                if i >= warmup:
                    times[runner.name].append(elapsed)
    finally:
        for runner in runners:
            runner.mode.close()
    return times


# ----------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def memory_of(workload: Workload, mode: str, device: torch.device, steps: int) -> dict:
    """Peak memory of ``steps`` training steps of one mode, measured in this process."""
    torch.manual_seed(0)
    base = workload.model()
    batch = _batch(workload, device)
    runner = Runner(mode, base, workload, batch, device)
    del base
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    for _ in range(steps):
        runner.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runner.mode.close()
    return {"peak": peak, "before": before}


def measure_memory(workload: str, modes: tuple, args: argparse.Namespace) -> dict:
    """Peak memory per mode, each in a fresh process so that no mode inherits another's."""
    out = {}
    for mode in modes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device,
               "--threads", str(args.threads), "--memory-run", workload, mode]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory run {workload}/{mode} failed:\n{done.stderr}")
        out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- report
def summarize(times: dict[str, list[tuple]], memory: Optional[dict]) -> list[dict]:
    plain = statistics.median(step[0] for step in times["plain"])
    plain_cpu = statistics.median(step[1] for step in times["plain"])
    rows = []
    for mode, values in times.items():
        median = statistics.median(step[0] for step in values)
        cpu = statistics.median(step[1] for step in values)
        row = {"mode": mode, "median_ms": 1e3 * median, "ratio": median / plain,
               "cpu_ms": 1e3 * cpu, "cpu_ratio": cpu / plain_cpu, "steps": len(values),
               "faults": statistics.median(step[2] for step in values)}
        if memory:
            mem, ref = memory[mode], memory["plain"]
            row["peak_mb"] = mem["peak"] / 2**20
            row["peak_ratio"] = mem["peak"] / ref["peak"]
            row["step_mb"] = (mem["peak"] - mem["before"]) / 2**20
        rows.append(row)
    floor = next((r for r in rows if r["mode"] == "floor"), None)
    for row in rows:
        if floor is not None and row["mode"] != "plain":
            for key, out in (("ratio", "vs_floor"), ("cpu_ratio", "cpu_vs_floor")):
                if floor[key] > 1:
                    row[out] = (row[key] - 1) / (floor[key] - 1)
    return rows


def _cell(row: dict, key: str, width: int) -> str:
    return f" {row[key]:{width}.2f}" if key in row else " " * (width + 1)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    header = (f"  {'mode':20s} {'wall ms':>9s} {'x plain':>8s} {'ovh/floor':>9s}"
              f" {'cpu ms':>9s} {'x plain':>8s} {'ovh/floor':>9s} {'faults':>7s}")
    if "peak_mb" in rows[0]:
        header += f" {'peak MB':>9s} {'x plain':>8s} {'step MB':>8s}"
    print(header)
    for row in rows:
        line = (f"  {row['mode']:20s} {row['median_ms']:9.1f} {row['ratio']:8.3f}"
                + _cell(row, "vs_floor", 9)
                + f" {row['cpu_ms']:9.1f} {row['cpu_ratio']:8.3f}" + _cell(row, "cpu_vs_floor", 9)
                + f" {row['faults']:7.0f}")
        if "peak_mb" in row:
            line += f" {row['peak_mb']:9.1f} {row['peak_ratio']:8.3f} {row['step_mb']:8.1f}"
        print(line)


def print_depth(rows: dict[int, list[dict]]) -> None:
    print("\nDepth scaling (x plain, wall / cpu)")
    modes = [r["mode"] for r in next(iter(rows.values())) if r["mode"] != "plain"]
    print("  " + f"{'layers':>6s} {'plain ms':>9s} " + " ".join(f"{m:>19s}" for m in modes))
    for depth, table in rows.items():
        by_mode = {r["mode"]: r for r in table}
        cells = " ".join(f"{by_mode[m]['ratio']:>11.3f} / {by_mode[m]['cpu_ratio']:.3f}"
                         for m in modes)
        print(f"  {depth:6d} {by_mode['plain']['median_ms']:9.1f} {cells}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="30 steps, no memory runs, depth rows with observed/idle only")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated (default: cnn,mlp,transformer; +resnet50 on cuda)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-depth", action="store_true", help="skip the depth-scaling rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--memory-run", nargs=2, metavar=("WORKLOAD", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    table = workloads()
    if args.memory_run:
        name, mode = args.memory_run
        print(json.dumps(memory_of(table[name], mode, device, steps=3)))
        return 0

    steps = args.steps or (30 if args.quick else 40)
    modes = tuple(args.modes.split(","))
    default = "cnn,mlp,transformer" + (",resnet50" if device.type == "cuda" else "")
    names = (args.workloads or default).split(",")
    with_memory = not (args.quick or args.no_memory)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} threads")
          + f"; medians over {steps} steps after {args.warmup} warm-up steps")
    results: dict = {"device": str(device), "torch": torch.__version__, "steps": steps,
                     "workloads": {}, "depth": {}}
    for name in names:
        workload = table[name]
        times = time_modes(workload, modes, steps, args.warmup, device)
        memory = measure_memory(name, modes, args) if with_memory else None
        rows = summarize(times, memory)
        results["workloads"][name] = rows
        print_table(f"{name}: {workload.description}", rows)
    if not args.no_depth:
        depth_modes = (("plain", "trainlint-observed", "trainlint-idle") if args.quick
                       else DEPTH_MODES)
        for depth in DEPTHS:
            times = time_modes(table[f"depth{depth}"], depth_modes, steps, args.warmup, device)
            results["depth"][depth] = summarize(times, None)
        print_depth(results["depth"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
