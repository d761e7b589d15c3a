"""Samples of the optimizer's parameters taken right before and right after its step.

Each parameter's sample (the statistics' sample: all of a small parameter, else its runs of
``RUN`` values) is written straight into one flat buffer per device and sample dtype, so the
update's size of every parameter of the group takes a few ops in all, not a few per
parameter: ``after - before``, the squares of both, and one reduction per run of
equal-length samples into per-parameter sums. The moments of the sample after the step
(the parameter's statistics) and of the gradient's sample come from the same buffer in a few
more ops. The host scales the sums to the whole parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
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
    the step) and 1 (after it), row 2 their difference, row 3 the gradient. Slots of the same
    length sit side by side (``runs``), so a per-parameter sum is one reduction per run over a
    ``[slots, length]`` view: a model has few distinct sample lengths (``index_add_`` over
    segments was several times slower per value on a CPU)."""

    def __init__(self, slots: list, device: torch.device, dtype: torch.dtype) -> None:
        self.slots = slots
        total = sum(s.length for s in slots)
        self.buffer = torch.zeros((4, total), dtype=dtype, device=device)
        # float64 work rows: the squares of before and of the update; the NaN/Inf flags and
        # the values of the sample after the step; those of the gradient (then its squares);
        # the centred squares after the step.
        self.work = torch.zeros((7, total), dtype=_F64, device=device)
        # (first slot, end slot, first value, end value, length) of each run.
        self.runs: list[tuple] = []
        for i, slot in enumerate(slots):
            if self.runs and self.runs[-1][4] == slot.length:
                first, _, begin, _, length = self.runs[-1]
                self.runs[-1] = (first, i + 1, begin, slot.offset + length, length)
            else:
                self.runs.append((i, i + 1, slot.offset, slot.offset + slot.length,
                                  slot.length))
        # Each slot's length, filled in on the device one run at a time (a tensor made from a
        # host list is a copy that waits for the GPU).
        self.lengths = torch.empty(len(slots), dtype=_F64, device=device)
        for first, end, _, _, length in self.runs:
            self.lengths[first:end].fill_(length)
        self.sizes = np.asarray([s.length for s in slots], dtype=np.float64)  # the same, host
        self.grad_views = [self._view(3, s) for s in slots]
        # Per row of samples (before, after), the slots copied whole in their own dtype go in
        # one multi-tensor copy (one call for all of them, a few kernels on CUDA); the others
        # take an op each.
        self.batched: list[tuple] = [([], []) for _ in range(2)]
        self.single: list[list] = [[], []]
        for row in range(2):
            for slot in slots:
                out = self._view(row, slot)
                if _copied_whole(slot, slot.param, out):
                    self.batched[row][0].append(out)
                    self.batched[row][1].append(slot.param)
                else:
                    self.single[row].append((slot, out))
        self._views()

    def _views(self) -> None:
        """The views :meth:`sums` works on, made once: on a CPU an op that only makes a view
        costs a few microseconds of dispatch, as much as a small reduction."""
        buffer, work = self.buffer, self.work
        self.rows = buffer.unbind(0)
        self.pair, self.pair_work = buffer[0::2], work[0:2]      # before, delta
        self.values, self.values_work = buffer[1::2], work[3:6:2]  # after, grad
        self.flags = work[2:5:2]
        self.grad_work, self.after_work, self.centred = work[5], work[3], work[6]
        self.out = torch.empty((len(SUMS), len(self.slots)), dtype=_F64, device=buffer.device)
        out = self.out
        self.counts = out[S["finite"]:S["grad_finite"] + 1:2]
        self.finite, self.mean = out[S["finite"]], out[S["mean"]]
        # Per run of equal-length slots: the values as [rows, slots, length] and the sums'
        # columns; the centring views of the values after the step, their flags and means.
        self.segments, self.centring, self.m2_segments = [], [], []
        for first, end, begin, stop, length in self.runs:
            slots = end - first
            self.segments.append((work[:6, begin:stop].view(6, slots, length),
                                  out[:6, first:end]))
            self.centring.append((work[3, begin:stop].view(slots, length),
                                  work[2, begin:stop].view(slots, length),
                                  out[S["mean"], first:end].unsqueeze(1)))
            self.m2_segments.append((work[6, begin:stop].view(slots, length),
                                     out[S["m2"], first:end]))

    def _view(self, row: int, slot: _Slot) -> torch.Tensor:
        return stats.shaped_for(self.buffer[row, slot.offset:slot.offset + slot.length],
                                slot.copy, slot.shape)

    def fill(self, row: int) -> None:
        """Sample every parameter into ``row`` (0: before the step, 1: after it)."""
        with torch.no_grad():
            outs, params = self.batched[row]
            if outs:
                torch._foreach_copy_(outs, params)
            for slot, out in self.single[row]:
                _fill(out, slot.param, slot.copy)

    def fill_grads(self) -> list:
        """Sample each parameter's gradient into row 3 (the parameter's own positions) where
        it is laid out as the parameter; the parameters whose gradient it sampled."""
        taken, outs, grads = [], [], []
        with torch.no_grad():
            for slot, out in zip(self.slots, self.grad_views):
                g, p = slot.param.grad, slot.param
                if (g is not None and g.layout == torch.strided and g.shape == p.shape
                        and g.dtype == p.dtype and (g.is_contiguous() or slot.copy.how != "runs")):
                    if _copied_whole(slot, g, out):
                        outs.append(out)
                        grads.append(g)
                    else:
                        _fill(out, g, slot.copy)
                    taken.append(p)
            if outs:
                torch._foreach_copy_(outs, grads)
        return taken

    def sums(self) -> torch.Tensor:
        """``[len(SUMS), params]`` float64, per parameter (moduli for a complex one):

        * ``before``, ``update``: the sums of squares of its sample before the step and of
          (after - before) (NaN where the sample holds NaN/Inf);
        * ``finite``, ``mean``, ``m2``: of its sample after the step, the number of finite
          values, their mean and their sum of squared deviations from it;
        * ``grad_finite``, ``grad_sumsq``: of its gradient's sample (row 3, where
          :meth:`fill_grads` wrote it), the number of finite values and the sum of their
          squares."""
        if self.buffer.is_complex():
            return self._complex_sums()
        before, after, delta, _ = self.rows
        torch.sub(after, before, out=delta)
        # In float64: a float32 weight of 1e20 squares past float32's range, and the weights
        # would read as NaN/Inf before the step. Rows 0, 1: the squares of before and delta
        # (NaN/Inf stay); rows 2, 4: 1 where the value after the step / the gradient is
        # NaN/Inf; rows 3, 5: those values, 0 where NaN/Inf (row 5 then squared).
        self.pair_work.copy_(self.pair).square_()
        self.values_work.copy_(self.values)
        return self._finish()

    def _complex_sums(self) -> torch.Tensor:
        """:meth:`sums` of complex samples: of their moduli."""
        before, after, delta, grad = self.rows
        torch.sub(after, before, out=delta)
        self.pair_work.copy_(self.pair.abs()).square_()
        self.values_work.copy_(torch.stack([after.abs(), grad.abs()]))
        return self._finish()

    def _finish(self) -> torch.Tensor:
        """The sums from the float64 work rows :meth:`sums` filled."""
        torch.mul(self.values_work, 0.0, out=self.flags).nan_to_num_(1.0)
        self.values_work.nan_to_num_(0.0, 0.0, 0.0)
        self.grad_work.square_()
        for values, out in self.segments:
            torch.sum(values, 2, out=out)
        torch.sub(self.lengths, self.counts, out=self.counts)  # NaN/Inf counts -> finite
        self.mean.div_(self.finite.clamp(min=1.0))
        # Deviations from the mean, 0 where the value was NaN/Inf (it stands in as the mean).
        for values, flags, mean in self.centring:
            values.addcmul_(flags, mean).sub_(mean)
        torch.square(self.after_work, out=self.centred)
        for values, out in self.m2_segments:
            torch.sum(values, 1, out=out)
        return self.out.clone()  # the buffer is reused by the next step


# The rows of :meth:`_Group.sums`.
SUMS = ("before", "update", "finite", "mean", "grad_finite", "grad_sumsq", "m2")
S = {name: i for i, name in enumerate(SUMS)}


def _copied_whole(slot: _Slot, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``x`` (the slot's parameter or its gradient) goes whole, as it is, into the
    row's one multi-tensor copy: a plain tensor (a subclass keeps its own ``copy_``, which a
    multi-tensor op may not reach)."""
    return slot.copy.how == "whole" and x.dtype == out.dtype and type(x) in stats.PLAIN_TYPES


def _fill(out: torch.Tensor, x: torch.Tensor, copy: stats.Copy) -> None:
    """Write the sample of ``x`` into ``out`` (one op; two for 16-bit tensors)."""
    if copy.how != "whole" and x.dtype != out.dtype:  # a gather keeps the dtype: cast after it
        out.copy_(stats.sample_values(x).view(out.shape))
    else:
        stats.fill(out, x, copy)


def sample_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype a parameter's sample is kept in: float32 for 16-bit parameters."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class UpdateSampler:
    """Before/after samples of a list of parameters; the layout is built once per list of
    parameters (and their shapes) and reused while it stays the same."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.groups: list[_Group] = []
        self.taken = False

    def before(self, params: list) -> set:
        """Sample ``params`` and their gradients before the optimizer changes them; the ids of
        the parameters whose gradient was sampled (laid out as the parameter)."""
        key = tuple((id(p), p.shape, p.dtype, p.device, p.is_contiguous()) for p in params)
        if key != self.key:
            self._layout(params)
            self.key = key
        taken = set()
        for group in self.groups:
            group.fill(0)
            taken.update(id(p) for p in group.fill_grads())
        self.taken = True
        return taken

    def _layout(self, params: list) -> None:
        by_group: dict = {}
        for p in params:
            plan = stats.plan_for(p, False)
            by_group.setdefault((p.device, sample_dtype(p)), []).append((p, plan))
        self.groups = []
        for (device, dtype), members in by_group.items():
            slots, offset = [], 0
            # Samples of the same length side by side (see _Group); the order is otherwise kept.
            members.sort(key=lambda member: -member[1].m)
            for p, plan in members:
                slots.append(_Slot(p, offset, plan.m, plan.copies[0], tuple(p.shape)))
                offset += plan.m
            self.groups.append(_Group(slots, device, dtype))

    def after(self) -> list:
        """Sample the parameters again after the step: per group, ``(params, sample sizes,
        sums)``, the sizes a float64 array, the sums :meth:`_Group.sums` (device tensors);
        empty when :meth:`before` did not run."""
        if not self.taken:
            return []
        self.taken = False
        out = []
        for group in self.groups:
            group.fill(1)
            out.append(([s.param for s in group.slots], group.sizes, group.sums()))
        return out

    def clear(self) -> None:
        """Forget the samples of this step (the buffers stay for the next)."""
        self.taken = False
