"""Statistics of the observed tensors, computed on their device; merged on the host.

The probe hands every observed activation to an :class:`ActivationBatch`, and every output
gradient to a :class:`MomentBatch`, as it does the parameters and parameter gradients that the
optimizer hooks' sampler (``trainlint.updates``) did not take. Per tensor that is one
or two ops and never a sync (no ``.item()``, ``.cpu()``, ``bool(tensor)``; branches depend on
shapes and dtypes only):

* a tensor of up to ``SAMPLE_ABOVE`` elements is copied whole into a row: exact statistics;
* a larger one is read in full once for the exact presence of NaN/Inf (its sum; a ReLU/GELU
  output's per-unit record, which the probe reads anyway and which gives its exact max/min;
  parameter gradients are not: a NaN/Inf there reaches the weight, read in full after the
  optimizer step), and its sample of exactly ``SAMPLE_TARGET`` elements (runs of ``RUN``
  consecutive elements at golden-ratio positions) is gathered into the row by one op
  (``index_select`` of the runs; on CUDA a ``take`` of their elements, see
  :func:`gathers_runs`);
* an activation row also holds up to ``SIGNAL_WIDTH`` pairs of values from samples 0/1, 2/3 ...
  of the batch at the same positions: the between-sample signal.

Rows are laid out by a :class:`Plan`, built once per shape and cached. Every :func:`batch_rows`
rows, one batch of float64 row ops computes all their moments. After the observed step's one
copy to the host, :func:`finish_activations` / :func:`gradient_fields` turn the raw numbers
into ``ACT_FIELDS`` / ``GRAD_FIELDS`` vectors, which :func:`merge_moments` /
:func:`merge_grads` merge over calls and steps.

Why (CPU, measured): an eager op costs 5-10 us of dispatch, which dominated the per-tensor cost
when every tensor ran ~40 ops; a batch of 32 rows costs a third per row of a batch of 8; rows
and work buffers small enough to stay in cache leave the model's own tensors there (a 16384-value
sample cost the CNN workload several times its kernels' own time); and a gather of single
elements from a tensor out of cache waits on memory once per element, while runs of a cache
line's length cost one wait per run."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

# Layout of an activation statistics vector.
ACT_FIELDS = ("n", "n_finite", "m", "m_finite", "mean", "m2", "min", "max", "zeros", "saturated")
A = {name: i for i, name in enumerate(ACT_FIELDS)}
# Layout of a gradient statistics vector.
GRAD_FIELDS = ("n", "sumsq", "nonfinite")
G = {name: i for i, name in enumerate(GRAD_FIELDS)}

# A sigmoid/tanh output counts as saturated when its local derivative is below 2% of the
# derivative's maximum: |tanh| > 0.99, or |2*sigmoid - 1| > 0.99.
SATURATION_LEVEL = 0.99
# Tensors above this many elements have their element-wise statistics estimated on a sample of
# exactly SAMPLE_TARGET elements.
SAMPLE_ABOVE = 1 << 14
SAMPLE_TARGET = 1 << 11
# The sample is made of runs of this many consecutive elements (a cache line of float32).
RUN = 16
# Pairs of samples (dim 0) compared for the between-sample signal, and at most this many
# positions per side.
SIGNAL_PAIRS = 4
SIGNAL_WIDTH = 1 << 9
# Each batch of rows holds at most this many values (and at most MAX_ROWS rows): the statistics
# of that many tensors are computed together (per row, a batch of 32 costs a third of a batch
# of 8: each op's dispatch is shared).
BATCH_VALUES = 1 << 18
MAX_ROWS = 128
_GOLDEN = (math.sqrt(5) - 1) / 2
_MAX_CACHED = 256
_MAX_VIEWS = 4096
_F64 = torch.float64
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # what multi-tensor ops take (no subclass)
_cache: dict = {}


def _cached(key: tuple, make: Callable) -> object:
    found = _cache.get(key)
    if found is None:
        if len(_cache) >= _MAX_CACHED:
            _cache.pop(next(iter(_cache)))
        found = _cache[key] = make()
    return found


def spread(total: int, count: int, device: torch.device) -> torch.Tensor:
    """Exactly ``count`` distinct positions in ``range(total)`` (``count <= total``): one per
    window of the even split, at a golden-ratio offset inside it. Built on ``device``."""
    k = torch.arange(count + 1, dtype=_F64, device=device)
    edges = torch.floor(k * (total / count))
    width = edges[1:] - edges[:-1]
    return (edges[:-1] + torch.floor(torch.frac(k[:-1] * _GOLDEN) * width)).to(torch.int64)


@dataclass(frozen=True, eq=False)
class Copy:
    """One op that fills part of a row: ``whole`` copies the tensor, ``runs`` gathers runs of
    ``RUN`` elements of a contiguous tensor, ``take`` gathers single elements, ``nan`` fills
    what no value reaches."""

    how: str
    index: Optional[torch.Tensor]
    offset: int
    length: int


@dataclass
class Plan:
    """How a tensor of one shape fills a row: ``m`` values (all ``n`` of a small tensor, else
    its sample) in the row's first ``width`` columns, and with a signal part, ``signal`` pairs
    of values at ``width`` and ``width + SIGNAL_WIDTH``; NaN everywhere else."""

    n: int
    m: int
    width: int
    signal: int
    copies: tuple


# Widths of the rows of small tensors (copied whole): the narrowest that holds them (a row
# is at most half padding, which the kernels read too).
EXACT_WIDTHS = (SAMPLE_TARGET, 2 * SAMPLE_TARGET, 4 * SAMPLE_TARGET, SAMPLE_ABOVE)


def plan_for(x: torch.Tensor, with_signal: bool) -> Plan:
    """The cached :class:`Plan` of ``x``'s shape and layout."""
    contiguous = x.is_contiguous()
    key = ("plan", x.shape, contiguous, with_signal, x.device)
    found = _cache.get(key)
    if found is None:
        found = _cached(key, lambda: _make_plan(tuple(x.shape), contiguous, with_signal,
                                                x.device))
    return found


def _make_plan(shape: tuple, contiguous: bool, with_signal: bool, device: torch.device) -> Plan:
    n = math.prod(shape)
    copies: list[Copy] = []
    run_index: list[torch.Tensor] = []
    if n <= SAMPLE_ABOVE:
        width = next(w for w in EXACT_WIDTHS if n <= w)
        m = n
        copies.append(Copy("whole", None, 0, n))
        if n < width:
            copies.append(Copy("nan", None, n, width - n))
    else:
        width = m = SAMPLE_TARGET
        runs = spread(n // RUN, SAMPLE_TARGET // RUN, device)
        if contiguous:
            run_index.append(runs)
        else:
            elements = runs[:, None] * RUN + torch.arange(RUN, device=device)
            copies.append(Copy("take", elements.reshape(-1), 0, m))
    signal = 0
    if with_signal and len(shape) >= 2 and shape[0] >= 2 and n > 0:
        pairs = min(shape[0] // 2, SIGNAL_PAIRS)
        per_sample = n // shape[0]
        signal = min(pairs * per_sample, SIGNAL_WIDTH)
        if contiguous and per_sample % RUN == 0 and signal == SIGNAL_WIDTH:
            per = per_sample // RUN
            picked = spread(pairs * per, SIGNAL_WIDTH // RUN, device)
            first = (picked // per) * (2 * per) + picked % per
            run_index += [first, first + per]
        else:
            picked = spread(pairs * per_sample, signal, device)
            first = (picked // per_sample) * (2 * per_sample) + picked % per_sample
            if signal == SIGNAL_WIDTH:
                copies.append(Copy("take", torch.cat([first, first + per_sample]), width,
                                   2 * signal))
            else:
                gap = SIGNAL_WIDTH - signal
                copies += [Copy("take", first, width, signal),
                           Copy("nan", None, width + signal, gap),
                           Copy("take", first + per_sample, width + SIGNAL_WIDTH, signal),
                           Copy("nan", None, width + SIGNAL_WIDTH + signal, gap)]
    elif with_signal:
        copies.append(Copy("nan", None, width, 2 * SIGNAL_WIDTH))
    if run_index:
        index = torch.cat(run_index) if len(run_index) > 1 else run_index[0]
        offset = 0 if n > SAMPLE_ABOVE else width
        if gathers_runs(device):
            copies.append(Copy("runs", index, offset, index.numel() * RUN))
        else:
            elements = (index[:, None] * RUN + torch.arange(RUN, device=device)).reshape(-1)
            copies.append(Copy("take", elements, offset, elements.numel()))
    return Plan(n=n, m=m, width=width, signal=signal, copies=tuple(copies))


def gathers_runs(device: torch.device) -> bool:
    """Whether a contiguous tensor's sample is gathered by runs (one ``index_select`` of
    ``[runs, RUN]`` rows): on a CPU, where a run costs one wait on memory instead of ``RUN``.
    On CUDA one ``take`` of the same elements is a single kernel with less host work (the
    host, issuing the ops, is what an observed step waits on there)."""
    return device.type != "cuda"


def batch_rows(width: int) -> int:
    """Rows per batch for rows of ``width`` values: a power of two from 4 to ``MAX_ROWS``."""
    rows = 4
    while rows < MAX_ROWS and 2 * rows * width <= BATCH_VALUES:
        rows *= 2
    return rows


def sample_positions(x: torch.Tensor) -> torch.Tensor:
    """The element positions (in ``x.reshape(-1)``) whose values make up ``x``'s sample."""
    plan = plan_for(x, False)
    copy = plan.copies[0]
    if copy.how == "whole":
        return torch.arange(plan.n, device=x.device)
    if copy.how == "take":
        return copy.index
    return (copy.index[:, None] * RUN + torch.arange(RUN, device=x.device)).reshape(-1)


def sample_values(x: torch.Tensor) -> torch.Tensor:
    """``x``'s sample (all of it up to ``SAMPLE_ABOVE`` elements) as a 1-D tensor: one
    gather, a view of ``x`` when it is small and contiguous."""
    if x.requires_grad and torch.is_grad_enabled():
        x = x.detach()
    copy = plan_for(x, False).copies[0]
    if copy.how == "whole":
        return x.reshape(-1)
    if copy.how == "take":
        return torch.take(x, copy.index)
    return _runs_of(x).index_select(0, copy.index).view(-1)


def _runs_of(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as ``[runs, RUN]`` (one view op; a last partial run is left out)."""
    return x.as_strided((x.numel() // RUN, RUN), (RUN, 1))


def shaped_for(out: torch.Tensor, copy: Copy, shape: tuple) -> torch.Tensor:
    """``out``, a 1-D stretch of a buffer, shaped for ``copy``'s op on a tensor of ``shape``."""
    if copy.how == "runs":
        return out.view(-1, RUN)
    return out.view(shape) if copy.how == "whole" else out


def fill(out: torch.Tensor, x: torch.Tensor, copy: Copy) -> None:
    """``copy``'s one op: its values of ``x`` (or NaN) into ``out``, from :func:`shaped_for`."""
    if copy.how == "runs":
        torch.index_select(_runs_of(x), 0, copy.index, out=out)
    elif copy.how == "take":
        torch.take(x, copy.index, out=out)
    elif copy.how == "whole":
        out.copy_(x)
    else:
        out.fill_(math.nan)


def _work_buffers(device: torch.device, shape: tuple) -> list:
    """Four contiguous float64 work tensors of ``shape``, views of buffers shared by every
    store of this device and thread (a kernel runs to its end before the next starts)."""
    buffers = _cached(("work", str(device), threading.get_ident()),
                      lambda: [torch.empty(BATCH_VALUES, dtype=_F64, device=device)
                               for _ in range(4)])
    return [b[:math.prod(shape)].view(shape) for b in buffers]


# A store's first MAX_BUFFERS - 1 batches of a step each get a row buffer of their own; the
# later ones share the last (a few MB at most, however many rows a step adds).
MAX_BUFFERS = 4


class RowStore:
    """Rows of one dtype and width on one device waiting for their statistics (NaN where a
    row holds no value); every :func:`batch_rows` rows, ``kernel`` computes them all in float64.
    The batches of a step have buffers of their own (up to ``MAX_BUFFERS``), so that a row is
    filled by the same tensor from one step to the next (a training step adds the same tensors
    in the same order) and its NaN padding stays as it was."""

    def __init__(self, device: torch.device, dtype: torch.dtype, width: int, extra: int,
                 kernel: Callable, fields: int) -> None:
        self.kernel = kernel
        self.fields = fields
        self.width = width
        self.device = device
        self.dtype = dtype
        self.batch = batch_rows(width + extra)
        self.shape = (self.batch, width + extra)
        self.buffers: list[torch.Tensor] = []
        self.work = _work_buffers(device, self.shape)
        self.count = 0
        self.total = 0
        self.kinds: set = set()
        self.done: list = []
        self.views: dict = {}
        self.kernels: dict = {}  # per (buffer, rows): the kernel with its views made
        # Per buffer, the plan each of its rows was last filled by: the same plan leaves the
        # row's NaN padding as it was.
        self.last: list[list] = []

    def _buffer(self) -> int:
        """The number of the buffer of this step's current batch (allocated, all NaN, when
        first needed)."""
        index = min(len(self.done), MAX_BUFFERS - 1)
        if index == len(self.buffers):
            self.buffers.append(torch.full(self.shape, math.nan, dtype=self.dtype,
                                           device=self.device))
            self.last.append([None] * self.batch)
        return index

    def add(self, x: torch.Tensor, plan: Plan, kind: Optional[str] = None) -> int:
        """Fill the next row from ``x`` following ``plan``; the row's number."""
        index, slot = self._buffer(), self.count
        rows, last = self.buffers[index], self.last[index]
        padded = last[slot] is plan
        last[slot] = plan
        for copy in plan.copies:
            if copy.how == "nan" and padded:
                continue
            key = (index, slot, copy, x.shape)
            out = self.views.get(key)
            if out is None:
                if len(self.views) >= _MAX_VIEWS:
                    self.views.clear()
                out = self.views[key] = shaped_for(
                    rows[slot, copy.offset:copy.offset + copy.length], copy, x.shape)
            fill(out, x, copy)
        self.kinds.add(kind)
        self.count += 1
        self.total += 1
        if self.count == self.batch:
            self.flush()
        return self.total - 1

    def flush(self) -> None:
        if self.count:
            index = self._buffer()
            key = (index, self.count)
            kernel = self.kernels.get(key)
            if kernel is None:
                rows, work = self.buffers[index], self.work
                if self.count < self.batch:
                    rows, work = rows[:self.count], [w[:self.count] for w in work]
                kernel = self.kernels[key] = self.kernel(rows, work, self.width)
            self.done.append(kernel(self.kinds))
            self.count = 0
            self.kinds = set()

    def take(self) -> torch.Tensor:
        """The raw statistics of every row added since the last ``take``, in order."""
        self.flush()
        done, self.done = self.done, []
        self.total = 0
        if not done:
            return torch.zeros((0, self.fields), dtype=_F64, device=self.device)
        return torch.cat(done) if len(done) > 1 else done[0]


# Statistics computed on the device for a batch of rows (``_RAW_ACT``, ``_RAW_MOMENTS``); the host
# turns them into ``ACT_FIELDS``/``GRAD_FIELDS`` vectors with the per-row sizes it knows.
_RAW_ACT = ("finite", "mean", "m2", "min", "max", "zeros", "tanh_tails", "sigmoid_tails",
            "signal_sum", "signal_count")
_RAW_MOMENTS = ("finite", "mean", "m2")
_KINDS = {"tanh": 1, "sigmoid": 2}


class _Kernel:
    """The statistics of the rows of one buffer (its first ``count`` rows), with every view
    it works on made once: on a CPU an op that only makes a view costs as much dispatch as a
    small reduction. Values are converted to float64 first (one copy into a work buffer);
    NaN/Inf and the NaN padding are counted, then stand in as 0 (zeros, tails, sums) or as the
    row's mean (extremes, moments), where they change nothing. Row ops only."""

    def __init__(self, rows: torch.Tensor, work: list, s: int) -> None:
        self.source = None if rows.dtype == _F64 else rows
        x = rows if rows.dtype == _F64 else work[3]
        self.x, self.s = x, s
        self.values = x[:, :s]
        self.bad, self.z, self.t = (w[:, :s] for w in work[:3])
        r = x.shape[0]
        self.mean = torch.empty(r, dtype=_F64, device=x.device)
        self.mean_col = self.mean.unsqueeze(1)

    def _moments(self, kinds: set) -> tuple:
        """``(finite, extra, z)``: the number of finite values per row, what
        :meth:`_before_centring` read, and ``z`` holding the values with each NaN/Inf at its
        row's mean (``self.mean``), for the caller to centre. Float ops only (on a CPU
        ``isfinite`` and a bool sum cost several times a float op)."""
        if self.source is not None:
            self.x.copy_(self.source)
        bad = torch.mul(self.values, 0.0, out=self.bad).nan_to_num_(1.0)
        count = torch.rsub(bad.sum(1), self.s)
        z = torch.nan_to_num(self.values, nan=0.0, posinf=0.0, neginf=0.0, out=self.z)
        torch.div(z.sum(1), count.clamp(min=1.0), out=self.mean)
        extra = self._before_centring(z, count, kinds)
        return count, extra, z.addcmul_(bad, self.mean_col)

    def _before_centring(self, z: torch.Tensor, count: torch.Tensor, kinds: set) -> tuple:
        """What a kernel reads of ``z`` while each NaN/Inf there is 0."""
        return ()


class _MomentKernel(_Kernel):
    """``_RAW_MOMENTS`` of the rows: ``(finite, mean, m2)``, NaN/Inf and padding left out."""

    def __call__(self, kinds: set) -> torch.Tensor:
        count, _, z = self._moments(kinds)
        z.sub_(self.mean_col)
        return torch.stack([count, self.mean, torch.linalg.vecdot(z, z)], dim=1)


class _ActKernel(_Kernel):
    """``_RAW_ACT`` of the rows: values in the first ``s`` columns, signal pairs (when present)
    after them."""

    def __init__(self, rows: torch.Tensor, work: list, s: int) -> None:
        super().__init__(rows, work, s)
        self.nothing = torch.zeros(self.x.shape[0], dtype=_F64, device=self.x.device)
        self.pairs = None
        if self.x.shape[1] > s:
            p = SIGNAL_WIDTH
            self.pairs = (self.x[:, s:s + p], self.x[:, s + p:s + 2 * p], work[1][:, s:s + p],
                          work[2][:, s:s + p])

    def __call__(self, kinds: set) -> torch.Tensor:
        count, (zeros, tanh, sigmoid), z = self._moments(kinds)
        low, high = z.amin(1), z.amax(1)  # (aminmax over a dim is several times slower)
        z.sub_(self.mean_col)
        columns = [count, self.mean, torch.linalg.vecdot(z, z), low, high, zeros, tanh, sigmoid]
        if self.pairs is None:
            return torch.stack(columns + [self.nothing, self.nothing], dim=1)
        a, b, d, bad = self.pairs
        torch.sub(a, b, out=d)
        missing = torch.mul(d, 0.0, out=bad).nan_to_num_(1.0).sum(1)
        d.nan_to_num_(0.0, 0.0, 0.0)
        return torch.stack(columns + [torch.linalg.vecdot(d, d).div_(2.0),
                                      torch.rsub(missing, SIGNAL_WIDTH)], dim=1)

    def _before_centring(self, z: torch.Tensor, count: torch.Tensor, kinds: set) -> tuple:
        """Exact zeros, and the tails of tanh/sigmoid rows (NaN/Inf and padding sit at 0: not
        a zero, and taken back out of a sigmoid's lower tail)."""
        zeros = count - torch.sign(z, out=self.t).abs_().sum(1)
        tanh = sigmoid = self.nothing
        if "tanh" in kinds:
            tanh = torch.abs(z, out=self.t).gt_(SATURATION_LEVEL).sum(1)
        if "sigmoid" in kinds:
            sigmoid = (torch.mul(z, 2.0, out=self.t).sub_(1.0).abs_().gt_(SATURATION_LEVEL)
                       .sum(1).add_(count).sub_(self.s))
        return zeros, tanh, sigmoid


class _Batch:
    """Rows of one observed step on one device, one :class:`RowStore` per dtype and row
    width, plus one full-tensor reduction per sampled tensor (``full``: tensor -> tuple of
    0-d tensors)."""

    def __init__(self, device: torch.device, kernel: Callable, fields: int,
                 full: Optional[Callable], with_signal: bool) -> None:
        self.device = device
        self.kernel = kernel
        self.fields = fields
        self.full = full
        self.with_signal = with_signal
        self.stores: dict[tuple, RowStore] = {}
        self.reduced: dict[tuple, list] = {}
        self.meta: list = []

    def _add(self, x: torch.Tensor, extra: tuple, kind: Optional[str] = None,
             full: Optional[Callable] = None) -> int:
        if x.requires_grad and torch.is_grad_enabled():
            x = x.detach()
        if x.is_complex():
            x = x.abs()
        elif not x.is_floating_point():  # an integer or bool parameter: its values as float32
            x = x.float()
        plan = plan_for(x, self.with_signal)
        key = (x.dtype, plan.width)
        store = self.stores.get(key)
        if store is None:
            extra_columns = 2 * SIGNAL_WIDTH if self.with_signal else 0
            store = self.stores[key] = RowStore(self.device, x.dtype, plan.width, extra_columns,
                                                self.kernel, self.fields)
            self.reduced[key] = []
        row = store.add(x, plan, kind)
        reduced = -1
        full = full or self.full
        if plan.m < plan.n and full is not None:
            reduced = len(self.reduced[key])
            self.reduced[key].append(full(x))
        self.meta.append((key, row, reduced, plan) + extra)
        return len(self.meta) - 1

    def device_part(self) -> torch.Tensor:
        """Everything the host needs, as one float64 device tensor (empty when unused)."""
        parts = []
        for key, store in self.stores.items():
            parts.append(store.take().reshape(-1))
            reduced = self.reduced[key]
            if reduced:
                parts.append(torch.stack([v for r in reduced for v in r]).to(_F64))
        if not parts:
            return torch.zeros(0, dtype=_F64, device=self.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _split(self, host: np.ndarray, reduced_width: int) -> tuple:
        """Per added tensor, in order: its raw row and its full-reduction values (NaN when
        the tensor was not sampled)."""
        host = np.asarray(host, dtype=np.float64)
        if not self.meta:
            for key in self.stores:
                self.reduced[key] = []
            return np.zeros((0, self.fields)), np.zeros((0, reduced_width))
        counts: dict = {}
        for meta in self.meta:
            counts[meta[0]] = counts.get(meta[0], 0) + 1
        raw, red, raw_base, red_base, offset = [], [], {}, {}, 0
        for key in self.stores:
            rows, k = counts.get(key, 0), len(self.reduced[key])
            raw_base[key] = sum(len(r) for r in raw)
            raw.append(host[offset:offset + rows * self.fields].reshape(rows, self.fields))
            offset += rows * self.fields
            red_base[key] = sum(len(r) for r in red)
            red.append(host[offset:offset + k * reduced_width].reshape(k, reduced_width))
            offset += k * reduced_width
            self.reduced[key] = []
        # One extra all-NaN reduction row stands for the tensors that were not sampled.
        red.append(np.full((1, reduced_width), np.nan))
        missing = sum(len(r) for r in red) - 1
        rows_at = [raw_base[key] + row for key, row, *_ in self.meta]
        reduced_at = [red_base[key] + i if i >= 0 else missing for key, _, i, *_ in self.meta]
        return np.concatenate(raw)[rows_at], np.concatenate(red)[reduced_at]


class ActivationBatch(_Batch):
    """Activation statistics of one observed step on one device, computed in batches.

    Per tensor: its row (one copy or gather), and for a sampled one a full read that finds
    every NaN/Inf: the sum (16-bit tensors: ``aminmax``), or what the caller already read in
    full (``known``: the per-unit record of a ReLU/GELU output gives its exact max, and min).
    :meth:`add` returns the row number; :meth:`rows` (after the step's one copy to the host)
    gives the ``ACT_FIELDS`` vectors, in order, and the between-sample signal
    ``[sum of d**2 / 2, pairs]`` of each (count 0: not measured)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device, _ActKernel, len(_RAW_ACT), _full_read, True)

    def add(self, x: torch.Tensor, kind: Optional[str] = None,
            known: Optional[tuple] = None) -> int:
        """Add ``x``; ``known``: ``(probe, min, max)`` 0-d tensors in ``x``'s dtype from a full
        read of ``x`` (``probe`` finite exactly when ``x`` is all finite; NaN for an
        unknown min or max), used instead of a read of our own when ``x`` is sampled."""
        if known is None:
            return self._add(x, (_KINDS.get(kind, 0),), kind)
        return self._add(x, (_KINDS.get(kind, 0),), kind, lambda _: known)

    def rows(self, host: np.ndarray) -> tuple:
        """``(ACT_FIELDS rows, signal rows)`` from :meth:`device_part` as copied to the host."""
        raw, full = self._split(host, 3)
        meta = np.asarray([(p.n, p.m, code) for _, _, _, p, code in self.meta],
                          dtype=np.float64).reshape(-1, 3)
        self.meta = []
        signal = raw[:, [_RAW_ACT.index("signal_sum"), _RAW_ACT.index("signal_count")]]
        return finish_activations(raw, full, meta), signal


def unknown(x: torch.Tensor) -> torch.Tensor:
    """A NaN 0-d tensor of ``x``'s dtype and device (cached): a value not read."""
    key = ("nan", x.dtype, x.device)
    found = _cache.get(key)
    if found is None:
        found = _cached(key, lambda: torch.full((), math.nan, dtype=x.dtype, device=x.device))
    return found


def finite_probe(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """0 when both 0-d tensors are finite, NaN otherwise (no overflow, whatever the dtype)."""
    return torch.mul(lo, 0).add_(hi * 0)


def _full_read(x: torch.Tensor) -> tuple:
    """``(probe, min, max)`` of one full read of ``x``: the sum (finite exactly when every
    element is, short of finite values summing beyond 3.4e38) with min and max not read, or
    for 16-bit dtypes, whose sums overflow too easily, ``aminmax``."""
    if x.dtype in (torch.float16, torch.bfloat16):
        lo, hi = torch.aminmax(x)
        return finite_probe(lo, hi), lo, hi
    nan = unknown(x)
    return x.sum(), nan, nan


def full_probe(x: torch.Tensor) -> tuple:
    """``(probe,)`` of :func:`_full_read`: finite exactly when every element of ``x`` is."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return _full_read(x)[:1]
    total = x.sum()
    return (total.abs() if total.is_complex() else total,)  # a NaN/Inf imaginary part too


def target_range(t: torch.Tensor) -> torch.Tensor:
    """``[min, max, share < 0, share > 1, share < -1]`` of a target tensor, on its device (a
    check's targets: a few reductions a step, no sync)."""
    x = t.detach().float()
    low, high = torch.aminmax(x)
    return torch.stack([low, high, (x < 0).float().mean(), (x > 1).float().mean(),
                        (x < -1).float().mean()])


def full_probes(xs: list, batched: Optional[bool] = None) -> list:
    """:func:`full_probe` of each tensor in ``xs``, in order (0 for an empty one). On CUDA
    (``batched`` None) the plain float32/float64 tensors of each device and dtype take one
    multi-tensor L1 norm instead: a few kernels for all of them, not one reduction each, and like
    the sum finite exactly when every element is (a tensor subclass keeps its own sum, which a
    multi-tensor op may not reach). On a CPU one sum each reads faster (measured: the norm costs
    2-5x the sum per element above 16k elements)."""
    probes: list = [None] * len(xs)
    groups: dict = {}
    for i, x in enumerate(xs):
        if not x.numel():
            probes[i] = x.new_zeros(())
        elif ((x.is_cuda if batched is None else batched) and type(x) in PLAIN_TYPES
              and x.dtype in (torch.float32, torch.float64)):
            groups.setdefault((x.device, x.dtype), []).append(i)
        else:
            probes[i] = full_probe(x)[0]
    with torch.no_grad():
        for members in groups.values():
            for i, norm in zip(members, torch._foreach_norm([xs[i] for i in members], 1)):
                probes[i] = norm
    return probes


def nan_probe(x: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor that is NaN when ``x`` holds a NaN, else 0 (an Inf is a mask's -inf, not a
    fault, in a model input). One reduction: the max propagates a NaN and nothing else makes
    one (6x faster here than ``isnan(x).any()``, which writes a bool tensor and reads it)."""
    x = x.detach()  # nothing recorded for autograd (a checkpointed region's saved tensors)
    top = (torch.view_as_real(x) if x.is_complex() else x).amax()
    return torch.where(top.isnan(), math.nan, 0.0)


def batch_probe(x: torch.Tensor) -> torch.Tensor:
    """``[flag, min, max]`` in float32 (of a complex tensor's real and imaginary parts), from
    one ``aminmax`` read: the flag is NaN when ``x`` holds a NaN, +inf when it holds ±Inf and
    no NaN, else 0. An Inf in a model input may be a mask's -inf, which is no fault: the
    caller decides."""
    x = x.detach()  # nothing recorded for autograd (a checkpointed region's saved tensors)
    lo, hi = torch.aminmax(torch.view_as_real(x) if x.is_complex() else x)
    infinite = torch.where(lo.isinf() | hi.isinf(), math.inf, 0.0)
    flag = torch.where(hi.isnan(), math.nan, infinite)
    return torch.stack([flag, lo.float(), hi.float()])


def extremes_probe(x: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor, non-finite exactly when ``x`` holds NaN/Inf, from its min and max (a
    sum of huge finite values, such as a mask filled with finfo.min, would overflow)."""
    x = x.detach()  # nothing recorded for autograd (a checkpointed region's saved tensors)
    lo, hi = torch.aminmax(x.abs() if x.is_complex() else x)
    return finite_probe(lo, hi)


def finish_activations(raw: np.ndarray, full: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """``ACT_FIELDS`` rows from raw batch results (``_RAW_ACT``), the full read of each
    sampled tensor (``probe, min, max``; all NaN for a tensor copied whole) and per-row
    ``(n, m, kind code)``. A sampled tensor's min/max are exact where the full read has them
    and it is all finite; else they are the sample's."""
    r = {name: raw[:, i] for i, name in enumerate(_RAW_ACT)}
    n, m, kind = meta[:, 0], meta[:, 1], meta[:, 2]
    count = r["finite"]
    sampled = m < n
    clean = np.isfinite(full[:, 0])
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = np.minimum(np.round(count * n / np.maximum(m, 1)), n - 1)
    n_finite = np.where(sampled, np.where(clean, n, estimate), count)
    saturated = np.where(kind == 1, r["tanh_tails"], np.where(kind == 2, r["sigmoid_tails"], 0))
    lo = np.where(count > 0, r["min"], np.inf)
    hi = np.where(count > 0, r["max"], -np.inf)
    use_lo = sampled & clean & np.isfinite(full[:, 1])
    use_hi = sampled & clean & np.isfinite(full[:, 2])
    return np.stack([n, n_finite, m, count, r["mean"], r["m2"],
                     np.where(use_lo, full[:, 1], lo), np.where(use_hi, full[:, 2], hi),
                     r["zeros"], saturated], axis=1)


class MomentBatch(_Batch):
    """``(finite, mean, m2)`` of gradients and parameters of one observed step on one device,
    in batches of rows: output gradients, parameter gradients and parameter values share its
    rows and kernels. ``add(x, full_pass=True)`` also reads a sampled ``x`` in full once (the
    exact presence of NaN/Inf: output gradients); without it the presence in a sampled tensor
    comes from its sample (parameter gradients: a NaN/Inf there reaches the weight at the
    optimizer step, and the probe reads every weight in full after it)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device, _MomentKernel, len(_RAW_MOMENTS), None, False)

    def add(self, x: torch.Tensor, full_pass: bool = False) -> int:
        return self._add(x, (), None, full_probe if full_pass else None)

    def table(self, host: np.ndarray) -> np.ndarray:
        """Per added tensor, in order: ``[n, m, finite, mean, m2, clean]`` (``clean``: 1 when
        it holds no NaN/Inf, exact where it was read in full, else from its row)."""
        raw, probe = self._split(host, 1)
        meta = np.asarray([(plan.n, plan.m, reduced >= 0) for _, _, reduced, plan in self.meta],
                          dtype=np.float64).reshape(-1, 3)
        self.meta = []
        clean = np.where(meta[:, 2] > 0, np.isfinite(probe[:, 0]), raw[:, 0] >= meta[:, 1])
        return np.column_stack([meta[:, :2], raw, clean.astype(np.float64)])


def gradient_fields(table: np.ndarray) -> np.ndarray:
    """``GRAD_FIELDS`` rows from :meth:`MomentBatch.table` rows."""
    n, m, count, mean, m2, clean = table.T
    sumsq = np.maximum(m2, 0) + count * mean * mean
    return finish_gradients(np.column_stack([count, sumsq, clean]), np.column_stack([n, m]))


def parameter_moments(table: np.ndarray) -> tuple:
    """``(std, sumsq, finite, m)`` per :meth:`MomentBatch.table` row: the unbiased standard
    deviation of its finite values (0 for fewer than two), their sum of squares and number,
    and the number of values in the row. For a sampled parameter the relative error of the std
    is about ``1 / sqrt(2 m)`` (1.6% for Gaussian weights at m = 2048), of the norm half the
    sum of squares' ``sqrt((kurtosis - 1) / m)`` (1.6%)."""
    _, m, count, mean, m2, _ = table.T
    m2 = np.maximum(m2, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(count > 1, np.sqrt(m2 / (count - 1)), 0.0)
    return std, m2 + count * mean * mean, count, m


def finish_gradients(raw: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """``GRAD_FIELDS`` rows from ``(finite, sumsq, all-finite flag)`` rows and per-row
    ``(n, m)``."""
    count, sumsq, clean = raw[:, 0], raw[:, 1], raw[:, 2] > 0
    n, m = meta[:, 0], meta[:, 1]
    sampled = m < n
    scale = n / np.maximum(m, 1)
    missing = m - count
    estimate = np.clip(np.round(missing * scale), 1, np.maximum(n, 1))
    nonfinite = np.where(sampled, np.where(clean, 0, estimate), missing)
    return np.stack([n, np.where(sampled, sumsq * scale, sumsq), nonfinite], axis=1)


def _host_rows(batch: _Batch) -> np.ndarray:
    return batch.device_part().cpu().numpy()


def activation_stats(x: torch.Tensor, kind: Optional[str]) -> torch.Tensor:
    """Statistics of an activation tensor as a float64 vector laid out as ``ACT_FIELDS``.

    Up to ``SAMPLE_ABOVE`` elements everything is exact (float64). Above it: the element count
    is exact, and so is the presence of NaN/Inf (``n_finite < n``; ``n_finite`` is exact when
    the tensor is all finite); the moments, the zero and saturated fractions, min and max
    (16-bit tensors: exact min/max) and the number of non-finite values when there are any
    come from the sample (``m`` elements, ``m_finite`` of them finite). All arithmetic on the
    values is float64, so 16-bit inputs and magnitudes from 1e-300 to 1e300 stay exact.
    One tensor at a time (this reads the result on the host); the probe batches
    :class:`ActivationBatch` instead.
    """
    batch = ActivationBatch(x.device)
    batch.add(x, kind)
    return torch.from_numpy(batch.rows(_host_rows(batch))[0][0])


def between_sample(x: torch.Tensor) -> torch.Tensor:
    """``[sum of d**2 / 2, count]`` over ``d = x[2i] - x[2i + 1]`` (finite ``d`` only) for up to
    ``SIGNAL_PAIRS`` pairs of samples (dim 0) at the same positions (at most ``SIGNAL_WIDTH``
    of them, spread over the pairs): the between-sample variance, averaged over units and
    positions. An output that no longer depends on the input (e.g. only its biases survive a
    vanishing signal) scores 0 however large its values. Count 0: not measurable (fewer than two
    samples). One tensor at a time; the probe reads it from :class:`ActivationBatch` rows."""
    batch = ActivationBatch(x.device)
    batch.add(x)
    return torch.from_numpy(batch.rows(_host_rows(batch))[1][0])


def grad_stats(g: torch.Tensor) -> torch.Tensor:
    """Gradient statistics as a float64 vector laid out as ``GRAD_FIELDS`` (NaN/Inf skipped).

    Exact up to ``SAMPLE_ABOVE`` elements. Above it one reduction reads every element, so the
    presence of NaN/Inf is exact (float32/float64 gradients: their sum is non-finite, which
    finite values cannot cause short of summing beyond 3.4e38; 16-bit ones: min/max); the sum
    of squares of the finite elements and, when there are any NaN/Inf, their number are scaled
    up from the sample (relative error of the sum of squares about ``sqrt((kurtosis - 1) / m)``:
    3% for Gaussian values at m = 2048, the norm half that). One tensor at a time; the probe
    batches :class:`MomentBatch`.
    """
    batch = MomentBatch(g.device)
    batch.add(g, full_pass=True)
    return torch.from_numpy(gradient_fields(batch.table(_host_rows(batch)))[0])


# A GELU-family unit (GELU, SiLU, Mish) counts as dead when it never outputs a positive value
# (its output is positive exactly when its input is) nor one below -GELU_ACTIVE_LEVEL: its
# input stayed below about -3.4, where the local derivative is < 1% as well. A unit whose
# outputs are tiny but positive at times sits near input 0, where the slope is 0.5: small
# (TL103's concern), not dead.
GELU_ACTIVE_LEVEL = 1e-3


def unit_active(x: torch.Tensor, unit_dim: int, kind: str = "relu") -> torch.Tensor:
    """Per unit along ``unit_dim``: was any element of this call active? (bool vector).

    Active means > 0 for the ReLU family, and > 0 or < ``-GELU_ACTIVE_LEVEL`` for the GELU
    family.
    One max (and for the GELU family one min) reduction over the other dims; a unit holding a
    NaN counts as active, so that a NaN never reads as a dead unit.
    """
    return active_units(*unit_extremes(x, unit_dim, kind), kind)


def unit_extremes(x: torch.Tensor, unit_dim: int, kind: str = "relu") -> tuple:
    """Per unit along ``unit_dim``: the max, and for the GELU family the min (else None), over
    the other dims. Merge calls with ``torch.maximum``/``torch.minimum``."""
    y = x.detach() if x.requires_grad and torch.is_grad_enabled() else x
    if y.dim() == 0:
        y = y.reshape(1)
    unit_dim %= y.dim()
    if y.numel() == 0:
        empty = torch.full((y.shape[unit_dim],), -math.inf, dtype=y.dtype, device=y.device)
        return empty, (None if kind == "relu" else -empty)
    hi = _per_unit(y, unit_dim, torch.amax)
    return hi, (None if kind == "relu" else _per_unit(y, unit_dim, torch.amin))


def active_units(hi: torch.Tensor, lo: Optional[torch.Tensor], kind: str = "relu") -> torch.Tensor:
    """:func:`unit_active` from :func:`unit_extremes` (possibly merged over calls)."""
    if kind == "relu" or lo is None:
        return ~(hi <= 0)
    return ~((hi <= 0) & (lo >= -GELU_ACTIVE_LEVEL))


def _per_unit(y: torch.Tensor, unit_dim: int, reduce: Callable) -> torch.Tensor:
    """``reduce`` (amax/amin) over every dim but ``unit_dim``; on a CPU in a layout it reduces
    fast: contiguous runs first; when the units are the last dim of a large or narrow tensor, rows
    are folded into wider rows (reducing a tall, narrow matrix column-wise is several times
    slower; a wide one of up to 2^20 elements reduces fastest as it is)."""
    if y.dim() >= 2 and one_reduction(y):
        return reduce(y, dim=tuple(d for d in range(y.dim()) if d != unit_dim))
    units = y.shape[unit_dim]
    before = math.prod(y.shape[:unit_dim])
    after = y.numel() // (before * units)
    if after > 1:
        return reduce(reduce(y.reshape(before, units, after), 2), 0)
    if units >= 64 and y.numel() <= 1 << 20:
        return reduce(y.reshape(before, units), 0)
    fold = 1
    while fold < 64 and before % (2 * fold) == 0 and fold * units < (1 << 16):
        fold *= 2
    return reduce(reduce(y.reshape(before // fold, fold * units), 0).view(fold, units), 0)


def one_reduction(y: torch.Tensor) -> bool:
    """Whether :func:`_per_unit` reduces ``y`` in one op over all its other dims: on CUDA,
    where each op is a kernel launch that the host waits to issue, and the GPU reads any
    layout fast enough."""
    return y.is_cuda


def fold_moments(rows: np.ndarray) -> np.ndarray:
    """Per-call activation vectors (``ACT_FIELDS`` rows) folded into one row that
    :func:`merge_moments` reads as it reads them all: counts, zeros and saturated summed, the
    moments by Chan's formula, min and max over the rows. A running summary of many calls
    keeps one row, not one per call."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(ACT_FIELDS))
    if len(rows) == 1:
        return rows
    return fold_stacked(rows[None])


def fold_stacked(rows: np.ndarray) -> np.ndarray:
    """:func:`fold_moments` of many points at once: ``[points, calls, ACT_FIELDS]`` rows, each
    point's calls folded into one row; ``[points, ACT_FIELDS]``."""
    out = rows.sum(axis=1)
    weights, means = rows[..., A["m_finite"]], rows[..., A["mean"]]
    weight = out[:, A["m_finite"]]
    some = weight > 0
    mean = np.where(some, (weights * means).sum(axis=1) / np.where(some, weight, 1.0), 0.0)
    spread = (weights * (means - mean[:, None]) ** 2).sum(axis=1)
    out[:, A["mean"]] = mean
    out[:, A["m2"]] = rows[..., A["m2"]].sum(axis=1) + np.where(some, spread, 0.0)
    out[:, A["min"]] = rows[..., A["min"]].min(axis=1)
    out[:, A["max"]] = rows[..., A["max"]].max(axis=1)
    return out


def moment_summaries(rows: np.ndarray) -> dict:
    """:func:`merge_moments`' fields for each folded row (``[points, ACT_FIELDS]``, from
    :func:`fold_moments`/:func:`fold_stacked`), as arrays."""
    n_total, n_finite = rows[:, A["n"]], rows[:, A["n_finite"]]
    weight = rows[:, A["m_finite"]]
    some = weight > 0
    per = np.where(some, weight, 1.0)
    mean = np.where(some, rows[:, A["mean"]], 0.0)
    var = np.where(some, rows[:, A["m2"]] / per, 0.0)
    has_finite = n_finite > 0
    return {
        "count": n_total,
        "mean": mean,
        "std": np.sqrt(np.maximum(var, 0.0)),
        "rms": np.sqrt(np.maximum(var + mean * mean, 0.0)),
        "min": np.where(has_finite, rows[:, A["min"]], np.nan),
        "max": np.where(has_finite, rows[:, A["max"]], np.nan),
        "zero_fraction": np.where(some, rows[:, A["zeros"]] / per, 0.0),
        "saturated_fraction": np.where(some, rows[:, A["saturated"]] / per, 0.0),
        "nonfinite": n_total - n_finite,
        "sampled": rows[:, A["m"]] < n_total,
    }


def merge_moments(rows: np.ndarray) -> dict:
    """Merge per-call activation vectors (one row each, ``ACT_FIELDS``) into one summary.

    Chan's parallel formula on float64 partial moments (:func:`fold_moments`), so merging is
    exact up to rounding.
    """
    summary = moment_summaries(fold_moments(rows))
    out = {name: float(values[0]) for name, values in summary.items()}
    out["count"], out["nonfinite"] = int(out["count"]), int(out["nonfinite"])
    out["sampled"] = bool(summary["sampled"][0])
    return out


def merge_grads(rows: np.ndarray) -> dict:
    """Merge per-call gradient vectors into norm, RMS and the non-finite count."""
    n, sumsq, nonfinite = np.asarray(rows, dtype=np.float64).reshape(
        -1, len(GRAD_FIELDS)).sum(axis=0).tolist()
    return {
        "norm": math.sqrt(sumsq),
        "rms": math.sqrt(sumsq / n) if n else 0.0,
        "nonfinite": int(nonfinite),
    }
