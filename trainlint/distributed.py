"""Data-parallel runs: which module to hook, and merging every rank's step statistics.

Under an initialized ``torch.distributed`` process group, ``Monitor`` gathers each rank's
host snapshot once per observed step (one ``all_gather_object``) and merges them here, so
that the findings describe the global batch:

* activation rows (one per call) are concatenated: merging them is exactly the merge over
  the global batch;
* "ever active" unit records are OR-ed;
* gradient rows (w.r.t. observed outputs) are concatenated, their squared sums divided by
  ``world_size**2``: each rank differentiates the mean loss of its own shard, which is
  ``world_size`` times the global mean loss that DistributedDataParallel's averaged
  parameter gradients belong to;
* per-channel input statistics are merged with their sample counts;
* parameters are the same on every rank (rank 0's are kept); extra scalars (the losses) are
  the ranks' mean.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from . import stats
from .errors import ConfigError

FSDP_MESSAGE = (
    "trainlint does not support FSDP yet: sharded parameters and gradients are not whole on "
    "any rank. Lint the unsharded model with trainlint.check(...) on one process, or monitor "
    "a DistributedDataParallel run of it")


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group; ``(0, 1)`` when not distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule is sharded by FSDP (``FullyShardedDataParallel`` or
    ``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed import fsdp

    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None),
                              getattr(fsdp, "FSDPModule", None)) if k is not None)
    return any(isinstance(m, kinds) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose hooks see the computation: the module inside DistributedDataParallel
    / DataParallel, the original module of a ``torch.compile``'d one. FSDP raises."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    if is_fsdp(model):
        raise ConfigError(FSDP_MESSAGE)
    return model


def gather(payload: Any, group: Any = None) -> list:
    """Every rank's ``payload`` (picklable), in rank order, on every rank: one collective."""
    out: list = [None] * world(group)[1]
    torch.distributed.all_gather_object(out, payload, group=group)
    return out


def reduce_values(per_rank: list[dict], world_size: Optional[int] = None) -> dict:
    """Merge the ``ProbeSnapshot.values`` of every rank into the values of the global batch."""
    world_size = world_size or len(per_rank)
    first = per_rank[0]
    inputs: dict[tuple, list] = {}
    merged: dict = {}
    for tag, value in first.items():
        kind = tag[0]
        if kind == "input":
            continue
        found = [v[tag] for v in per_rank if tag in v]
        if kind == "act":
            merged[tag] = np.concatenate(found)
        elif kind == "grad":
            rows = np.array(np.concatenate(found), dtype=np.float64)
            rows[..., stats.G["sumsq"]] /= world_size ** 2
            merged[tag] = rows
        elif kind == "units":
            merged[tag] = np.logical_or.reduce([np.asarray(v, dtype=bool) for v in found])
        elif kind == "extra":
            merged[tag] = np.mean(np.stack(found), axis=0)
        else:
            merged[tag] = value
    for values in per_rank:
        for tag, value in values.items():
            if tag[0] == "input":
                _, index, name, _shape, _dtype, dim = tag
                inputs.setdefault((index, name, dim), []).append((tag, value))
    for parts in inputs.values():
        tag, value = merge_inputs(parts)
        merged[tag] = value
    return merged


def merge_inputs(parts: list[tuple]) -> tuple[tuple, np.ndarray]:
    """One input's per-channel ``[mean, std, min, max, count]`` rows from several ranks,
    merged.

    Each rank's weight per channel is its count of values read (the whole tensor over the
    channel dim, or a later step's sampled rows); the batch dim of the merged shape is the sum
    of the ranks' batch dims.
    """
    tag0 = parts[0][0]
    kind, index, name, shape, dtype, dim = tag0
    if len(parts) == 1:
        return tag0, parts[0][1]
    if dim == 0:
        values = np.concatenate([v for _, v in parts], axis=1)
        total = sum(t[3][0] for t, _ in parts)
        return (kind, index, name, (total,) + tuple(shape[1:]), dtype, dim), values
    rows = np.stack([np.asarray(v, dtype=np.float64) for _, v in parts])
    counts = rows[:, 4]
    weights = counts / np.maximum(counts.sum(axis=0), 1.0)
    mean = (weights * rows[:, 0]).sum(axis=0)
    var = (weights * (rows[:, 1] ** 2 + (rows[:, 0] - mean) ** 2)).sum(axis=0)
    merged = np.stack([mean, np.sqrt(var), rows[:, 2].min(axis=0), rows[:, 3].max(axis=0),
                       counts.sum(axis=0)])
    total = sum(t[3][0] for t, _ in parts)
    return (kind, index, name, (total,) + tuple(shape[1:]), dtype, dim), merged
