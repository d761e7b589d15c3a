"""Samples of the optimizer's parameters taken right before and right after its step.

Each parameter's sample (the statistics' sample: all of a small parameter, else its runs of
``RUN`` values) is written straight into one flat buffer per device and sample dtype, so the
update's size of every parameter of the group takes a few ops in all, not a few per
parameter: ``after - before``, the squares of both, and one ``index_add_`` per group into
per-parameter sums. The host scales the sums to the whole parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import stats

_F64 = torch.float64


@dataclass
class _Slot:
    param: torch.Tensor
    offset: int
    length: int
    copy: stats.Copy
    shape: tuple


class _Group:
    """The parameters of one device and sample dtype: their slots in ``buffer`` rows 0 (before
    the step) and 1 (after it), row 2 their difference."""

    def __init__(self, slots: list, device: torch.device, dtype: torch.dtype) -> None:
        self.slots = slots
        total = sum(s.length for s in slots)
        self.buffer = torch.zeros((3, total), dtype=dtype, device=device)
        self.squares = torch.zeros((2, total), dtype=_F64, device=device)
        self.segments = torch.repeat_interleave(
            torch.arange(len(slots), device=device),
            torch.tensor([s.length for s in slots], device=device))
        self.views = [[self._view(row, s) for s in slots] for row in (0, 1)]

    def _view(self, row: int, slot: _Slot) -> torch.Tensor:
        return stats.shaped_for(self.buffer[row, slot.offset:slot.offset + slot.length],
                                slot.copy, slot.shape)

    def fill(self, row: int) -> None:
        with torch.no_grad():
            for slot, out in zip(self.slots, self.views[row]):
                _fill(out, slot)

    def sums(self) -> torch.Tensor:
        """``[2, params]`` float64: per parameter, the sum of squares of its sample before the
        step and of (after - before) (NaN where the sample holds NaN/Inf)."""
        before, after, delta = self.buffer
        torch.sub(after, before, out=delta)
        pair = self.buffer[0::2]
        if pair.is_complex():  # |z|^2
            pair = pair.abs()
        # Squared in float64: a float32 weight of 1e20 squares past float32's range, and the
        # weights would read as NaN/Inf before the step.
        self.squares.copy_(pair).mul_(self.squares)
        out = torch.zeros((2, len(self.slots)), dtype=_F64, device=self.buffer.device)
        return out.index_add_(1, self.segments, self.squares)

    def after(self, slot_index: int) -> torch.Tensor:
        slot = self.slots[slot_index]
        return self.buffer[1, slot.offset:slot.offset + slot.length]


def _fill(out: torch.Tensor, slot: _Slot) -> None:
    """Write ``slot.param``'s sample into ``out`` (one op; two for 16-bit parameters)."""
    p, copy = slot.param.detach(), slot.copy
    if copy.how != "whole" and p.dtype != out.dtype:  # a gather keeps the dtype: cast after it
        out.copy_(stats.sample_values(p).view(out.shape))
    else:
        stats.fill(out, p, copy)


def sample_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype a parameter's sample is kept in: float32 for 16-bit parameters."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class UpdateSampler:
    """Before/after samples of a list of parameters; the layout is built once per list of
    parameters (and their shapes) and reused while it stays the same."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.groups: list[_Group] = []
        self.where: dict = {}
        self.taken = False
        # Whether the buffers hold samples from after a step not yet collected.
        self.fresh = False

    def before(self, params: list) -> None:
        """Sample ``params`` before the optimizer changes them."""
        key = tuple((id(p), p.shape, p.dtype, p.device, p.is_contiguous()) for p in params)
        if key != self.key:
            self._layout(params)
            self.key = key
        for group in self.groups:
            group.fill(0)
        self.taken = True

    def _layout(self, params: list) -> None:
        by_group: dict = {}
        for p in params:
            plan = stats.plan_for(p, False)
            by_group.setdefault((p.device, sample_dtype(p)), []).append((p, plan))
        self.groups, self.where = [], {}
        for (device, dtype), members in by_group.items():
            slots, offset = [], 0
            for p, plan in members:
                slots.append(_Slot(p, offset, plan.m, plan.copies[0], tuple(p.shape)))
                self.where[p] = (len(self.groups), len(slots) - 1)
                offset += plan.m
            self.groups.append(_Group(slots, device, dtype))

    def after(self) -> list:
        """Sample the parameters again after the step: per group, ``(params, sums)`` with
        :meth:`_Group.sums` (device tensors); empty when :meth:`before` did not run."""
        if not self.taken:
            return []
        self.taken = False
        self.fresh = True
        out = []
        for group in self.groups:
            group.fill(1)
            out.append(([s.param for s in group.slots], group.sums()))
        return out

    def after_sample(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """``p``'s sample from the last :meth:`after` (a view of the group's buffer)."""
        found = self.where.get(p) if self.fresh else None
        if found is None:
            return None
        return self.groups[found[0]].after(found[1])

    def sample_size(self, p: torch.Tensor) -> int:
        """The number of values in ``p``'s sample (0 when ``p`` is not laid out)."""
        found = self.where.get(p)
        return 0 if found is None else self.groups[found[0]].slots[found[1]].length

    def clear(self) -> None:
        """Forget the samples of this step (the buffers stay for the next)."""
        self.taken = self.fresh = False
