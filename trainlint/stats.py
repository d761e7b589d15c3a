"""On-device statistics of one tensor, as a small float64 vector; merged on the host.

Every function here runs inside hooks: it only launches tensor ops and never syncs
(no ``.item()``, ``.cpu()``, ``bool(tensor)``); its branches depend on shapes and dtypes only.
The host merges the per-call vectors with :func:`merge_moments` once per observed step.

Cost model (CPU): reading a tensor that is not in cache costs what memory bandwidth allows
(the floor: one read of each observed tensor); an element-wise op writing a new tensor costs
3-5x a read, boolean ops 10x, and each fresh temporary of 128 KiB or more pays page faults
(about 80 us) first. So a tensor of up to ``SAMPLE_ABOVE`` elements is measured exactly, in
float64. A larger one is read in full by one reduction (min/max of an activation, the sum of a
gradient: exact extremes and exact presence of NaN/Inf) plus, for ReLU/GELU outputs, one
per-unit max (exact dead-unit records); everything else comes from a sample of at most
``SAMPLE_TARGET`` elements taken right after, while the tensor is still in cache. Temporaries
live in reused per-thread buffers on the CPU (CUDA's caching allocator makes fresh ones cheap)."""

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
    if device.type != "cpu" or n > max(SAMPLE_TARGET, SAMPLE_ABOVE):
        return torch.empty(n, dtype=dtype, device=device)
    pool = getattr(_buffers, "pool", None)
    if pool is None:
        pool = _buffers.pool = {}
    buffer = pool.get((slot, dtype))
    if buffer is None or buffer.numel() < n:
        buffer = pool[(slot, dtype)] = torch.empty(max(SAMPLE_TARGET, SAMPLE_ABOVE), dtype=dtype)
    return buffer[:n]


def _flat(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1)
    return flat.abs() if flat.is_complex() else flat


def _full(value: float, like: torch.Tensor) -> torch.Tensor:
    # torch.full launches a fill (no host-to-device copy), unlike torch.tensor(value, device=).
    return torch.full((), value, dtype=_F64, device=like.device)


def _exact_copy(flat: torch.Tensor) -> torch.Tensor:
    """All of a small tensor, in float64 (in scratch slot 0)."""
    return _scratch(0, flat.numel(), _F64, flat.device).copy_(flat)


def _sample(flat: torch.Tensor, target: int, dtype: torch.dtype) -> torch.Tensor:
    """The sample of a large tensor (in scratch slot 0), as ``dtype``."""
    index = sample_index(flat.numel(), target, flat.device)
    out = _scratch(0, index.numel(), dtype, flat.device)
    if flat.dtype == dtype:
        return torch.index_select(flat, 0, index, out=out)
    return out.copy_(flat.index_select(0, index))


def _moments(s: torch.Tensor, kind: Optional[str]) -> list:
    """Statistics of the finite elements of a 1-D float tensor, ``ACT_FIELDS[3:]`` in order.

    Float element-wise ops and reductions only: NaN/Inf become 0 in ``z`` and are counted back
    out. Temporaries go to scratch slots 1 and 2 (``s`` may be slot 0).
    """
    n = s.numel()
    work = _scratch(1, n, s.dtype, s.device)
    z = _scratch(2, n, s.dtype, s.device)
    nonfinite = torch.mul(s, 0, out=work).nan_to_num_(1.0).sum()
    torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0, out=z)
    count = n - nonfinite
    mean = z.sum() / count.clamp(min=1)
    centred = torch.sub(z, mean, out=work)
    m2 = (torch.dot(centred, centred) - nonfinite * mean * mean).clamp(min=0)
    zeros = count - torch.sign(z, out=work).abs_().sum()
    if kind == "tanh":
        saturated = torch.abs(z, out=work).sub_(SATURATION_LEVEL).clamp_min_(0).sign_().sum()
    elif kind == "sigmoid":
        tails = torch.mul(z, 2, out=work).sub_(1).abs_().sub_(SATURATION_LEVEL)
        saturated = tails.clamp_min_(0).sign_().sum() - nonfinite  # NaN/Inf sit at z = 0
    else:
        saturated = torch.zeros((), dtype=s.dtype, device=s.device)
    lo = torch.nan_to_num(s, nan=math.inf, posinf=math.inf, neginf=math.inf, out=work).amin()
    hi = torch.nan_to_num(s, nan=-math.inf, posinf=-math.inf, neginf=-math.inf,
                          out=work).amax()
    return [count, mean, m2, lo, hi, zeros, saturated]


def activation_stats(x: torch.Tensor, kind: Optional[str]) -> torch.Tensor:
    """Statistics of an activation tensor as a float64 vector laid out as ``ACT_FIELDS``.

    Up to ``SAMPLE_ABOVE`` elements everything is exact (float64). Above it: the element count
    is exact; min, max and ``n_finite`` are exact whenever the tensor is all finite, and the
    presence of NaN/Inf always is (``n_finite < n``); the moments and the zero and saturated
    fractions come from the sample (``m`` elements, ``m_finite`` of them finite), as do min,
    max and the number of non-finite values when the tensor has any. All arithmetic on the
    values is float64, so 16-bit inputs and magnitudes from 1e-300 to 1e300 stay exact.
    """
    flat = _flat(x)
    n = flat.numel()
    if n == 0:
        zero = torch.zeros((), dtype=_F64, device=flat.device)
        return torch.stack([zero, zero, zero, zero, zero, zero, _full(math.inf, flat),
                            _full(-math.inf, flat), zero, zero])
    if n <= SAMPLE_ABOVE:
        m_finite, mean, m2, lo, hi, zeros, saturated = _moments(_exact_copy(flat), kind)
        return torch.stack([_full(n, flat), m_finite, _full(n, flat), m_finite, mean, m2, lo,
                            hi, zeros, saturated])
    full_lo, full_hi = (v.to(_F64) for v in torch.aminmax(flat))
    sample = _sample(flat, SAMPLE_TARGET, _F64)  # after the full pass: still in cache
    m = sample.numel()
    m_finite, mean, m2, s_lo, s_hi, zeros, saturated = _moments(sample, kind)
    clean = torch.isfinite(full_lo) & torch.isfinite(full_hi)
    estimate = torch.round(m_finite * (n / m)).clamp(max=n - 1)
    return torch.stack([_full(n, flat), torch.where(clean, n, estimate), _full(m, flat),
                        m_finite, mean, m2, torch.where(clean, full_lo, s_lo),
                        torch.where(clean, full_hi, s_hi), zeros, saturated])


# A GELU-family unit (GELU, SiLU, Mish) counts as active when |y| exceeds this: below it the
# input is < about -3.4, where the local derivative is < 1% as well.
GELU_ACTIVE_LEVEL = 1e-3


def unit_active(x: torch.Tensor, unit_dim: int, kind: str = "relu") -> torch.Tensor:
    """Per unit along ``unit_dim``: was any element of this call active? (bool vector).

    Active means > 0 for the ReLU family and ``|y| > GELU_ACTIVE_LEVEL`` for the GELU family.
    One max (and for the GELU family one min) reduction over the other dims; a unit holding a
    NaN counts as active, so that a NaN never reads as a dead unit.
    """
    y = x.detach()
    if y.dim() == 0:
        y = y.reshape(1)
    unit_dim %= y.dim()
    if y.numel() == 0:
        return torch.zeros(y.shape[unit_dim], dtype=torch.bool, device=y.device)
    hi = _per_unit(y, unit_dim, torch.amax)
    if kind == "relu":
        return ~(hi <= 0)
    lo = _per_unit(y, unit_dim, torch.amin)
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


def grad_stats(g: torch.Tensor) -> torch.Tensor:
    """Gradient statistics as a float64 vector laid out as ``GRAD_FIELDS`` (NaN/Inf skipped).

    Exact up to ``SAMPLE_ABOVE`` elements. Above it one reduction reads every element, so the
    presence of NaN/Inf is exact (float32/float64 gradients: their sum is non-finite, which
    finite values cannot cause short of summing beyond 3.4e38; 16-bit ones: min/max); the sum
    of squares of the finite elements and, when there are any NaN/Inf, their number are scaled
    up from the sample (relative error of the sum of squares about ``sqrt((kurtosis - 1) / m)``:
    1% for Gaussian values).
    """
    flat = _flat(g)
    n = flat.numel()
    if n <= SAMPLE_ABOVE:
        s = _exact_copy(flat)
        nonfinite = torch.mul(s, 0, out=_scratch(1, n, _F64, s.device)).nan_to_num_(1.0).sum()
        z = s.nan_to_num_(0.0, 0.0, 0.0)
        return torch.stack([_full(n, flat), torch.dot(z, z), nonfinite])
    clean = _all_finite(flat)
    sample = _sample(flat, SAMPLE_TARGET, _F64)  # after the full pass: the tensor is in cache
    scale = n / sample.numel()
    work = _scratch(1, sample.numel(), _F64, sample.device)
    missing = torch.mul(sample, 0, out=work).nan_to_num_(1.0).sum()
    z = sample.nan_to_num_(0.0, 0.0, 0.0)
    return torch.stack([_full(n, flat), torch.dot(z, z) * scale,
                        torch.where(clean, 0.0, (missing * scale).round().clamp(1, n))])


def _all_finite(flat: torch.Tensor) -> torch.Tensor:
    """Whether every element is finite, in one reduction (a 0-d bool tensor)."""
    if flat.dtype in (torch.float16, torch.bfloat16):  # their sums overflow too easily
        lo, hi = torch.aminmax(flat)
        return torch.isfinite(lo) & torch.isfinite(hi)
    return torch.isfinite(flat.sum())


def norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm as a float64 scalar: exact up to ``SAMPLE_ABOVE`` elements, accumulated in the
    tensor's precision above (float32: relative error about 1e-5; an element above 1.8e19
    overflows the float32 sum of squares to Inf). NaN/Inf propagate."""
    flat = _flat(t)
    if flat.numel() <= SAMPLE_ABOVE:
        return torch.linalg.vector_norm(_exact_copy(flat))
    return _sum_of_squares(flat).to(_F64).sqrt()


def norm_and_std(t: torch.Tensor) -> tuple:
    """L2 norm (as :func:`norm`) and standard deviation (unbiased; exact up to ``SAMPLE_ABOVE``
    elements, from the sample above) of a tensor, as float64 scalars."""
    flat = _flat(t)
    n = flat.numel()
    if n <= 1:
        return norm(flat), torch.zeros((), dtype=_F64, device=flat.device)
    if n <= SAMPLE_ABOVE:
        s = _exact_copy(flat)
        return torch.linalg.vector_norm(s), s.std()
    return norm(flat), _sample(flat, SAMPLE_TARGET, _F64).std()


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
