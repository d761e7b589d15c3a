"""On-device statistics of one tensor, as a small float64 vector; merged on the host.

Every function here runs inside hooks: it only launches tensor ops and never syncs
(no ``.item()``, ``.cpu()``, ``bool(tensor)``). The host merges the per-call vectors
with :func:`merge_moments` once per observed step.
"""

from __future__ import annotations

import functools
import math

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
# Tensors above this many elements have their moments estimated on an evenly strided subset.
SAMPLE_ABOVE = 1 << 18
SAMPLE_TARGET = 1 << 16


@functools.lru_cache(maxsize=256)
def _prime_stride(base: int) -> int:
    """The smallest prime >= ``base``: a prime stride does not alias with the tensor's layout
    (a stride of 256 over 64x64 maps would sample one column of every map)."""
    stride = max(base, 2)
    while any(stride % d == 0 for d in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


def _moment_sample(flat: torch.Tensor) -> torch.Tensor:
    """An evenly strided view of at most ~SAMPLE_TARGET elements (the whole tensor when small)."""
    n = flat.numel()
    if n <= SAMPLE_ABOVE:
        return flat
    return flat[::_prime_stride(n // SAMPLE_TARGET)]


def activation_stats(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """Statistics of an activation tensor as a float64 vector laid out as ``ACT_FIELDS``.

    Exact over the whole tensor: element count, finite count, min, max. Moments, the zero
    fraction and the saturated fraction come from a strided sample when the tensor is large
    (``m`` elements, ``m_finite`` of them finite).
    """
    flat = x.detach().reshape(-1)
    finite_all = torch.isfinite(flat)
    n_finite = finite_all.sum(dtype=torch.float64)
    big = torch.finfo(flat.dtype).max if flat.is_floating_point() else float("inf")
    lo = torch.where(finite_all, flat, big).amin().to(torch.float64)
    hi = torch.where(finite_all, flat, -big).amax().to(torch.float64)

    sample = _moment_sample(flat)
    finite = finite_all if sample is flat else torch.isfinite(sample)
    m = finite.sum(dtype=torch.float64)
    xd = torch.where(finite, sample, 0).to(torch.float64)
    mean = xd.sum() / m.clamp(min=1)
    masked_out = sample.numel() - m
    m2 = ((xd - mean) ** 2).sum() - masked_out * mean * mean
    zeros = ((sample == 0) & finite).sum(dtype=torch.float64)
    if kind == "tanh":
        saturated = (xd.abs() > SATURATION_LEVEL).sum(dtype=torch.float64)
    elif kind == "sigmoid":
        saturated = (((2 * xd - 1).abs() > SATURATION_LEVEL) & finite).sum(dtype=torch.float64)
    else:
        saturated = torch.zeros((), dtype=torch.float64, device=flat.device)
    n = torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device)
    m_all = torch.tensor(float(sample.numel()), dtype=torch.float64, device=flat.device)
    return torch.stack([n, n_finite, m_all, m, mean, m2.clamp(min=0), lo, hi, zeros, saturated])


# A GELU-family unit (GELU, SiLU, Mish) counts as active when |y| exceeds this: below it the
# input is < about -3.4, where the local derivative is < 1% as well.
GELU_ACTIVE_LEVEL = 1e-3


def unit_active(x: torch.Tensor, unit_dim: int, kind: str = "relu") -> torch.Tensor:
    """Per unit along ``unit_dim``: was any element of this call active? (bool vector).

    Active means > 0 for the ReLU family and ``|y| > GELU_ACTIVE_LEVEL`` for the GELU family.
    """
    y = x.detach()
    active = y > 0 if kind == "relu" else y.abs() > GELU_ACTIVE_LEVEL
    if y.dim() == 0:
        return active.reshape(1)
    active = active.movedim(unit_dim, -1).reshape(-1, y.shape[unit_dim])
    return active.any(dim=0)


def grad_stats(g: torch.Tensor) -> torch.Tensor:
    """Gradient statistics as a float64 vector laid out as ``GRAD_FIELDS`` (NaN/Inf skipped)."""
    flat = g.detach().reshape(-1)
    finite = torch.isfinite(flat)
    gd = torch.where(finite, flat, 0).to(torch.float64)
    n = torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device)
    return torch.stack([n, (gd * gd).sum(), (~finite).sum(dtype=torch.float64)])


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
