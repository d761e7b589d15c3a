"""Statistics of the observed tensors, computed on their device; merged on the host.

The probe hands every observed activation and gradient to an :class:`ActivationBatch` /
:class:`GradientBatch`. Per tensor that launches a handful of ops and never syncs (no
``.item()``, ``.cpu()``, ``bool(tensor)``; branches depend on shapes and dtypes only): a
tensor of up to ``SAMPLE_ABOVE`` elements is copied whole into a float64 row; a larger one is
read in full by one reduction (min/max of an activation, the sum of a gradient: exact extremes
and exact presence of NaN/Inf) and its sample (at most ``SAMPLE_TARGET`` elements, gathered
right after, while the tensor is still in cache) becomes the row. Every ``BATCH_ROWS`` rows,
one batch of float64 ops computes all their moments. After the observed step's one copy to
the host, :func:`finish_activations` / :func:`finish_gradients` turn the raw numbers into
``ACT_FIELDS`` / ``GRAD_FIELDS`` vectors, which :func:`merge_moments` / :func:`merge_grads`
merge over calls and steps.

Why (CPU, measured): each eager op costs a few microseconds of dispatch, which dominated the
per-tensor cost when every tensor ran ~40 ops; an element-wise op costs 3-5x a reduction and a
boolean one 10x; a fresh temporary of 128 KiB or more pays about 80 us of page faults; and a
gather of single elements from a tensor out of cache waits on memory once per element, while
runs of a cache line's length cost one wait per run."""

from __future__ import annotations

import math
import threading
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
# SAMPLE_TARGET / 2 to SAMPLE_TARGET elements.
SAMPLE_ABOVE = 1 << 14
SAMPLE_TARGET = 1 << 14
# The sample is made of runs of this many consecutive elements.
RUN = 16
# Sample positions: one per window of ``stride`` elements, at an offset that moves by the
# golden ratio from window to window, so the sample never aliases with the tensor's layout.
_GOLDEN = (math.sqrt(5) - 1) / 2
_MAX_CACHED = 64
_F64 = torch.float64
_index_cache: dict = {}
_buffers = threading.local()


def sample_index(n: int, target: int, device: torch.device) -> torch.Tensor:
    """Positions of the sample of an ``n``-element tensor: ``ceil(n / stride)`` of them, with
    ``stride = ceil(n / target)``. Built on ``device`` (no host copy) and cached."""
    key = (n, target, str(device))
    index = _index_cache.get(key)
    if index is None:
        stride = -(-n // target)
        k = torch.arange(-(-n // stride), dtype=_F64, device=device)
        offset = torch.floor(torch.frac(k * _GOLDEN) * stride)
        index = (k * stride + offset).clamp(max=n - 1).to(torch.int64)
        if len(_index_cache) >= _MAX_CACHED:
            _index_cache.pop(next(iter(_index_cache)))
        _index_cache[key] = index
    return index


def _scratch(slot: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An ``n``-element work tensor: on the CPU a view of this thread's reused buffer number
    ``slot``, elsewhere a fresh tensor."""
    size = max(SAMPLE_TARGET, SAMPLE_ABOVE)
    if device.type != "cpu" or n > size:
        return torch.empty(n, dtype=dtype, device=device)
    pool = getattr(_buffers, "pool", None)
    if pool is None:
        pool = _buffers.pool = {}
    buffer = pool.get((slot, dtype))
    if buffer is None or buffer.numel() < n:
        buffer = pool[(slot, dtype)] = torch.empty(size, dtype=dtype)
    return buffer[:n]


def _flat(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    return flat.abs() if flat.is_complex() else flat


def _exact_copy(flat: torch.Tensor) -> torch.Tensor:
    """All of a small tensor, in float64 (in scratch slot 0)."""
    return _scratch(0, flat.numel(), _F64, flat.device).copy_(flat)


def sample(flat: torch.Tensor, target: int) -> torch.Tensor:
    """At most ``target`` elements of a 1-D tensor (all of it when it is that small), always at
    the same positions for the same size: runs of ``RUN`` consecutive elements (a cache line
    of float32) at golden-ratio positions. Reading whole cache lines makes the gather several
    times cheaper than picking single elements from a tensor out of cache."""
    return flat if flat.numel() <= target else _runs(flat, target).reshape(-1)


def _runs(flat: torch.Tensor, target: int) -> torch.Tensor:
    """The sample of :func:`sample` for a tensor above ``target`` elements, as ``[runs, RUN]``
    (``[target]`` when it cannot be read in runs)."""
    n = flat.numel()
    if target < RUN or not flat.is_contiguous():
        return torch.take(flat, sample_index(n, target, flat.device))
    runs = flat[: n - n % RUN].view(-1, RUN)
    return runs.index_select(0, sample_index(runs.shape[0], target // RUN, flat.device))


def _values(flat: torch.Tensor) -> torch.Tensor:
    """What the element-wise statistics read: all of a tensor of up to ``SAMPLE_ABOVE``
    elements, else its sample (as ``[runs, RUN]``)."""
    return flat if flat.numel() <= SAMPLE_ABOVE else _runs(flat, SAMPLE_TARGET)


# Statistics computed on the device for a batch of rows (``_RAW_ACT``, ``_RAW_GRAD``); the host
# turns them into ``ACT_FIELDS``/``GRAD_FIELDS`` vectors with the per-row sizes it knows.
_RAW_ACT = ("finite", "mean", "m2", "min", "max", "zeros", "tanh_tails", "sigmoid_tails")
_RAW_GRAD = ("finite", "sumsq")
# Rows per batch: the statistics of this many tensors are computed together.
BATCH_ROWS = 8
_KINDS = {"tanh": 1, "sigmoid": 2}


class RowBatch:
    """Tensors waiting for their statistics, one NaN-padded float64 row each (the values that
    :func:`_values` picks); every ``BATCH_ROWS`` rows one batch of ops computes them all, on
    the device and without a host sync. ``take()`` returns the raw results so far."""

    def __init__(self, device: torch.device, kernel: Callable, fields: int) -> None:
        self.device = device
        self.kernel = kernel
        self.fields = fields
        self.rows: Optional[torch.Tensor] = None
        self.work: list = []
        self.count = 0
        self.done: list = []
        self.kinds: set = set()
        self.views: dict = {}

    def add(self, values: torch.Tensor, kind: Optional[str] = None) -> None:
        if self.rows is None:
            shape = (BATCH_ROWS, max(SAMPLE_TARGET, SAMPLE_ABOVE))
            self.rows = torch.full(shape, math.nan, dtype=_F64, device=self.device)
            self.work = [torch.empty(shape, dtype=_F64, device=self.device) for _ in range(3)]
        key = (self.count, values.shape)
        view = self.views.get(key)
        if view is None:  # each (row, shape) is sliced once: per tensor, one copy op remains
            view = self.views[key] = self.rows[self.count, :values.numel()].view(values.shape)
        view.copy_(values)
        self.kinds.add(kind)
        self.count += 1
        if self.count == BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.count:
            rows = self.rows[:self.count]
            self.done.append(self.kernel(rows, [w[:self.count] for w in self.work], self.kinds))
            rows.fill_(math.nan)
            self.count = 0
            self.kinds = set()

    def take(self) -> torch.Tensor:
        """The raw statistics of every row added since the last ``take``, in order."""
        self._flush()
        done, self.done = self.done, []
        if not done:
            return torch.zeros((0, self.fields), dtype=_F64, device=self.device)
        return torch.cat(done) if len(done) > 1 else done[0]


def _act_kernel(rows: torch.Tensor, work: list, kinds: set) -> torch.Tensor:
    """``_RAW_ACT`` of NaN-padded rows: NaN/Inf (and padding) become 0 in ``z``, the row's
    mean in ``y``, and are counted back out. Float ops and row reductions only."""
    bad, z, y = work
    torch.mul(rows, 0, out=bad).nan_to_num_(1.0)
    nonfinite = bad.sum(1)
    torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0, out=z)
    count = rows.shape[1] - nonfinite
    mean = z.sum(1) / count.clamp(min=1)
    torch.addcmul(z, bad, mean[:, None], out=y).sub_(mean[:, None])  # 0 where not finite
    m2 = torch.mul(y, y, out=bad).sum(1)
    lo = torch.nan_to_num(rows, nan=math.inf, posinf=math.inf, neginf=math.inf, out=y).amin(1)
    hi = torch.nan_to_num(rows, nan=-math.inf, posinf=-math.inf, neginf=-math.inf,
                          out=y).amax(1)
    zeros = count - torch.sign(z, out=y).abs_().sum(1)
    tails = torch.zeros_like(count)
    tanh, sigmoid = tails, tails
    if "tanh" in kinds:
        tanh = torch.abs(z, out=y).sub_(SATURATION_LEVEL).clamp_min_(0).sign_().sum(1)
    if "sigmoid" in kinds:
        torch.mul(z, 2, out=y).sub_(1).abs_().sub_(SATURATION_LEVEL).clamp_min_(0)
        sigmoid = y.sign_().sum(1) - nonfinite  # NaN/Inf/padding sit at z = 0, a lower tail
    return torch.stack([count, mean, m2, lo, hi, zeros, tanh, sigmoid], dim=1)


def _grad_kernel(rows: torch.Tensor, work: list, kinds: set) -> torch.Tensor:
    """``_RAW_GRAD`` of NaN-padded rows."""
    bad, z, _ = work
    nonfinite = torch.mul(rows, 0, out=bad).nan_to_num_(1.0).sum(1)
    torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0, out=z)
    sumsq = torch.mul(z, z, out=bad).sum(1)
    return torch.stack([rows.shape[1] - nonfinite, sumsq], dim=1)


class ActivationBatch:
    """Activation statistics of one observed step on one device, computed in batches.

    Per tensor: for a large one, one full reduction (``aminmax``: exact extremes and exact
    presence of NaN/Inf) and a gather of its sample; for a small one, a copy. :meth:`add`
    returns the row number; :meth:`rows` (after the step's one copy to the host) gives the
    ``ACT_FIELDS`` vectors, in order."""

    def __init__(self, device: torch.device) -> None:
        self.batch = RowBatch(device, _act_kernel, len(_RAW_ACT))
        self.meta: list = []
        self.lo: list = []
        self.hi: list = []
        self._none = torch.full((), math.nan, dtype=_F64, device=device)

    def add(self, x: torch.Tensor, kind: Optional[str]) -> int:
        flat = _flat(x)
        n = flat.numel()
        if n <= SAMPLE_ABOVE:
            values = flat
            self.lo.append(self._none)
            self.hi.append(self._none)
        else:
            lo, hi = torch.aminmax(flat)
            self.lo.append(lo)
            self.hi.append(hi)
            values = _runs(flat, SAMPLE_TARGET)  # after the full pass: still in cache
        self.batch.add(values, kind)
        self.meta.append((n, values.numel(), _KINDS.get(kind, 0)))
        return len(self.meta) - 1

    def device_part(self) -> torch.Tensor:
        """Everything the host needs, as one float64 device tensor (empty when unused)."""
        raw = self.batch.take()
        if not self.meta:
            return raw.reshape(-1)
        extremes = torch.stack([torch.stack(self.lo).to(_F64), torch.stack(self.hi).to(_F64)], 1)
        return torch.cat([raw, extremes], dim=1).reshape(-1)

    def rows(self, host: np.ndarray) -> np.ndarray:
        """``ACT_FIELDS`` rows from :meth:`device_part` as copied to the host."""
        raw = np.asarray(host, dtype=np.float64).reshape(len(self.meta), len(_RAW_ACT) + 2)
        meta = np.asarray(self.meta, dtype=np.float64).reshape(-1, 3)
        self.meta, self.lo, self.hi = [], [], []
        return finish_activations(raw, meta)


def finish_activations(raw: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """``ACT_FIELDS`` rows from raw batch results (``_RAW_ACT`` + full-tensor min/max) and
    per-row ``(n, m, kind code)``."""
    r = {name: raw[:, i] for i, name in enumerate(_RAW_ACT)}
    n, m, kind = meta[:, 0], meta[:, 1], meta[:, 2]
    count = r["finite"]
    full_lo, full_hi = raw[:, len(_RAW_ACT)], raw[:, len(_RAW_ACT) + 1]
    sampled = m < n
    clean = np.isfinite(full_lo) & np.isfinite(full_hi)
    use_full = sampled & clean
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = np.minimum(np.round(count * n / np.maximum(m, 1)), n - 1)
    n_finite = np.where(sampled, np.where(clean, n, estimate), count)
    saturated = np.where(kind == 1, r["tanh_tails"], np.where(kind == 2, r["sigmoid_tails"], 0))
    return np.stack([n, n_finite, m, count, r["mean"], r["m2"],
                     np.where(use_full, full_lo, r["min"]), np.where(use_full, full_hi, r["max"]),
                     r["zeros"], saturated], axis=1)


class GradientBatch:
    """Gradient statistics of one observed step on one device, as :class:`ActivationBatch`:
    per large tensor one full reduction (the presence of NaN/Inf) and a gather of its sample;
    the sum of squares and the number of non-finite values come from the sample."""

    def __init__(self, device: torch.device) -> None:
        self.batch = RowBatch(device, _grad_kernel, len(_RAW_GRAD))
        self.meta: list = []
        self.sums: list = []
        self._exact = torch.zeros((), dtype=_F64, device=device)

    def add(self, g: torch.Tensor) -> int:
        flat = _flat(g)
        n = flat.numel()
        if n <= SAMPLE_ABOVE:
            values = flat
            self.sums.append(self._exact)
        else:
            self.sums.append(_finite_probe(flat))
            values = _runs(flat, SAMPLE_TARGET)
        self.batch.add(values)
        self.meta.append((n, values.numel()))
        return len(self.meta) - 1

    def device_part(self) -> torch.Tensor:
        raw = self.batch.take()
        if not self.meta:
            return raw.reshape(-1)
        clean = torch.isfinite(torch.stack(self.sums).to(_F64)).to(_F64)[:, None]
        return torch.cat([raw, clean], dim=1).reshape(-1)

    def rows(self, host: np.ndarray) -> np.ndarray:
        raw = np.asarray(host, dtype=np.float64).reshape(len(self.meta), len(_RAW_GRAD) + 1)
        meta = np.asarray(self.meta, dtype=np.float64).reshape(-1, 2)
        self.meta, self.sums = [], []
        return finish_gradients(raw, meta)


def finish_gradients(raw: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """``GRAD_FIELDS`` rows from raw batch results (``_RAW_GRAD`` + all-finite flag) and per-row
    ``(n, m)``."""
    count, sumsq, clean = raw[:, 0], raw[:, 1], raw[:, 2] > 0
    n, m = meta[:, 0], meta[:, 1]
    sampled = m < n
    scale = n / np.maximum(m, 1)
    missing = m - count
    estimate = np.clip(np.round(missing * scale), 1, np.maximum(n, 1))
    nonfinite = np.where(sampled, np.where(clean, 0, estimate), missing)
    return np.stack([n, np.where(sampled, sumsq * scale, sumsq), nonfinite], axis=1)


def activation_stats(x: torch.Tensor, kind: Optional[str]) -> torch.Tensor:
    """Statistics of an activation tensor as a float64 vector laid out as ``ACT_FIELDS``.

    Up to ``SAMPLE_ABOVE`` elements everything is exact (float64). Above it: the element count
    is exact; min, max and ``n_finite`` are exact whenever the tensor is all finite, and the
    presence of NaN/Inf always is (``n_finite < n``); the moments and the zero and saturated
    fractions come from the sample (``m`` elements, ``m_finite`` of them finite), as do min,
    max and the number of non-finite values when the tensor has any. All arithmetic on the
    values is float64, so 16-bit inputs and magnitudes from 1e-300 to 1e300 stay exact.
    One tensor at a time (this reads the result on the host); the probe batches
    :class:`ActivationBatch` instead.
    """
    batch = ActivationBatch(x.device)
    batch.add(x, kind)
    return torch.from_numpy(batch.rows(batch.device_part().cpu().numpy())[0])


def grad_stats(g: torch.Tensor) -> torch.Tensor:
    """Gradient statistics as a float64 vector laid out as ``GRAD_FIELDS`` (NaN/Inf skipped).

    Exact up to ``SAMPLE_ABOVE`` elements. Above it one reduction reads every element, so the
    presence of NaN/Inf is exact (float32/float64 gradients: their sum is non-finite, which
    finite values cannot cause short of summing beyond 3.4e38; 16-bit ones: min/max); the sum
    of squares of the finite elements and, when there are any NaN/Inf, their number are scaled
    up from the sample (relative error of the sum of squares about ``sqrt((kurtosis - 1) / m)``:
    1% for Gaussian values). One tensor at a time; the probe batches :class:`GradientBatch`.
    """
    batch = GradientBatch(g.device)
    batch.add(g)
    return torch.from_numpy(batch.rows(batch.device_part().cpu().numpy())[0])


# A GELU-family unit (GELU, SiLU, Mish) counts as active when |y| exceeds this: below it the
# input is < about -3.4, where the local derivative is < 1% as well.
GELU_ACTIVE_LEVEL = 1e-3


# Sample pairs compared by :func:`between_sample`.
SIGNAL_PAIRS = 4


def between_sample(x: torch.Tensor) -> torch.Tensor:
    """``[sum of d**2 / 2, count]`` over ``d = x[2i] - x[2i + 1]`` for up to ``SIGNAL_PAIRS``
    pairs of samples (dim 0) at the same position: the between-sample variance, averaged over
    units and positions. An output that no longer depends on the input (e.g. only its biases
    survive a vanishing signal) scores 0 however large its values. Needs ``x.shape[0] >= 2``.
    Above ``SAMPLE_TARGET`` values per side, the same runs of positions are read in each pair."""
    pairs = min(x.shape[0] // 2, SIGNAL_PAIRS)
    rows = x.detach().reshape(x.shape[0], -1)
    a, b = rows[0:2 * pairs:2], rows[1:2 * pairs:2]
    width = rows.shape[1]
    if pairs * width > SAMPLE_TARGET:
        if width % RUN == 0 and rows.is_contiguous():
            first, second = _pair_runs(pairs, width // RUN, x.device)
            cells = rows.view(-1, RUN)  # gathering along dim 0 only: other dims are slow paths
            a, b = cells.index_select(0, first), cells.index_select(0, second)
        else:
            index = sample_index(pairs * width, SAMPLE_TARGET, x.device)
            a, b = a.reshape(-1).take(index), b.reshape(-1).take(index)
    size = a.numel()
    d = _scratch(1, size, _F64, a.device).view(a.shape).copy_(a)
    other = _scratch(2, size, _F64, a.device).view(a.shape).copy_(b)
    d = d.sub_(other).reshape(-1)
    bad = torch.mul(d, 0, out=other.reshape(-1)).nan_to_num_(1.0).sum()
    d.nan_to_num_(0.0, 0.0, 0.0)
    return torch.stack([torch.dot(d, d) / 2, size - bad])


def _pair_runs(pairs: int, runs: int, device: torch.device) -> tuple:
    """Rows of ``view(-1, RUN)`` for :func:`between_sample`: the same sampled runs in samples
    0, 2, 4 ... (first) and 1, 3, 5 ... (second), ``runs`` runs per sample. Cached."""
    key = ("pairs", pairs, runs, str(device))
    found = _index_cache.get(key)
    if found is None:
        picked = sample_index(runs, max(SAMPLE_TARGET // (RUN * pairs), 1), device)
        starts = torch.arange(pairs, device=device) * (2 * runs)
        first = (starts[:, None] + picked[None, :]).reshape(-1)
        found = _index_cache[key] = (first, first + runs)
    return found


def unit_active(x: torch.Tensor, unit_dim: int, kind: str = "relu") -> torch.Tensor:
    """Per unit along ``unit_dim``: was any element of this call active? (bool vector).

    Active means > 0 for the ReLU family and ``|y| > GELU_ACTIVE_LEVEL`` for the GELU family.
    One max (and for the GELU family one min) reduction over the other dims; a unit holding a
    NaN counts as active, so that a NaN never reads as a dead unit.
    """
    return active_units(*unit_extremes(x, unit_dim, kind), kind)


def unit_extremes(x: torch.Tensor, unit_dim: int, kind: str = "relu") -> tuple:
    """Per unit along ``unit_dim``: the max, and for the GELU family the min (else None), over
    the other dims. Merge calls with ``torch.maximum``/``torch.minimum``."""
    y = x.detach()
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
    return ~((hi <= GELU_ACTIVE_LEVEL) & (lo >= -GELU_ACTIVE_LEVEL))


def _per_unit(y: torch.Tensor, unit_dim: int, reduce: Callable) -> torch.Tensor:
    """``reduce`` (amax/amin) over every dim but ``unit_dim``, in a layout CPUs reduce fast:
    contiguous runs first; when the units are the last dim, rows are folded into wider rows
    (reducing a tall, narrow matrix column-wise is several times slower)."""
    units = y.shape[unit_dim]
    before = math.prod(y.shape[:unit_dim])
    after = y.numel() // (before * units)
    if after > 1:
        return reduce(reduce(y.reshape(before, units, after), 2), 0)
    fold = 1
    while fold < 64 and before % (2 * fold) == 0 and fold * units < (1 << 16):
        fold *= 2
    return reduce(reduce(y.reshape(before // fold, fold * units), 0).view(fold, units), 0)


def _finite_probe(flat: torch.Tensor) -> torch.Tensor:
    """One reduction whose 0-d result is finite exactly when every element is: the sum for
    float32/float64 (short of finite values summing beyond 3.4e38), min + max in float32 for
    16-bit dtypes, whose own sums overflow too easily."""
    if flat.dtype in (torch.float16, torch.bfloat16):
        return torch.stack(torch.aminmax(flat)).float().sum()
    return flat.sum()


def norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm as a float64 scalar: exact up to ``SAMPLE_ABOVE`` elements, accumulated in the
    tensor's precision above (float32: relative error about 1e-5; an element above 1.8e19
    overflows the float32 sum of squares to Inf). NaN/Inf propagate."""
    flat = _flat(t)
    if flat.numel() <= SAMPLE_ABOVE:
        return torch.linalg.vector_norm(_exact_copy(flat))
    return _sum_of_squares(flat).to(_F64).sqrt()


def norm_and_std(t: torch.Tensor) -> tuple:
    """L2 norm and standard deviation (unbiased) of a parameter, as float64 scalars: exact up to
    ``SAMPLE_ABOVE`` elements; above, both come from its sample (relative error about
    ``1 / sqrt(2 m)``, 0.6% for Gaussian weights), so the weights are never read in full: a NaN
    or Inf in a weight shows exactly in the output of the layer that uses it."""
    flat = _flat(t)
    n = flat.numel()
    if n <= 1:
        return norm(flat), torch.zeros((), dtype=_F64, device=flat.device)
    if n <= SAMPLE_ABOVE:
        s = _exact_copy(flat)
        return torch.linalg.vector_norm(s), s.std()
    values = sample(flat, SAMPLE_TARGET)
    s = _scratch(0, values.numel(), _F64, flat.device).copy_(values)
    return torch.linalg.vector_norm(s) * math.sqrt(n / s.numel()), s.std()


def _sum_of_squares(flat: torch.Tensor) -> torch.Tensor:
    if flat.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(flat, dtype=torch.float32) ** 2
    return torch.dot(flat, flat)


def merge_moments(rows: np.ndarray) -> dict:
    """Merge per-call activation vectors (one row each, ``ACT_FIELDS``) into one summary.

    Chan's parallel formula on float64 partial moments, so merging is exact up to rounding.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(ACT_FIELDS))
    n_total = rows[:, A["n"]].sum()
    n_finite = rows[:, A["n_finite"]].sum()
    weights = rows[:, A["m_finite"]]
    weight = weights.sum()
    if weight > 0:
        mean = float((rows[:, A["mean"]] * weights).sum() / weight)
        m2 = float(rows[:, A["m2"]].sum() + (weights * (rows[:, A["mean"]] - mean) ** 2).sum())
        var = m2 / weight
    else:
        mean, var = 0.0, 0.0
    has_finite = n_finite > 0
    return {
        "count": int(n_total),
        "mean": mean,
        "std": float(np.sqrt(max(var, 0.0))),
        "rms": float(np.sqrt(max(var + mean * mean, 0.0))),
        "min": float(rows[:, A["min"]].min()) if has_finite else float("nan"),
        "max": float(rows[:, A["max"]].max()) if has_finite else float("nan"),
        "zero_fraction": float(rows[:, A["zeros"]].sum() / weight) if weight else 0.0,
        "saturated_fraction": float(rows[:, A["saturated"]].sum() / weight) if weight else 0.0,
        "nonfinite": int(n_total - n_finite),
        "sampled": bool((rows[:, A["m"]] < rows[:, A["n"]]).any()),
    }


def merge_grads(rows: np.ndarray) -> dict:
    """Merge per-call gradient vectors into norm, RMS and the non-finite count."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(GRAD_FIELDS))
    n = rows[:, G["n"]].sum()
    sumsq = rows[:, G["sumsq"]].sum()
    return {
        "norm": float(np.sqrt(sumsq)),
        "rms": float(np.sqrt(sumsq / n)) if n else 0.0,
        "nonfinite": int(rows[:, G["nonfinite"]].sum()),
    }
