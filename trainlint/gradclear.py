"""Gradients cleared between ``loss.backward()`` and ``optimizer.step()``: a ``zero_grad()``
(the optimizer's or the model's, ``set_to_none`` either way) called between them, so every
step applies no gradient and the weights never change (TL506).

While a step is observed, up to ``WATCHED`` of each watched optimizer's trainable parameters
(the first, the last and between, as :mod:`trainlint.gradcarry` picks them) get a
post-accumulate hook: it keeps, once backward has added a gradient to ``.grad``, that tensor
and whether its strided sample (``SAMPLE`` elements) held a value other than 0 (a device
bool). At the optimizer's step pre-hook, the parameters the latest backward gave a gradient
are read again: ``.grad`` is None (known on the host), or is the tensor backward made and its
sample is now all zeros (a device bool); a ``.grad`` the loop replaced by another tensor is
no clearing. The step's verdict, a device bool (some parameter got a gradient that was not
0, and each that did had it cleared), travels in the observed step's one copy to the host.
A step that runs a closure (LBFGS, a SAM's ``step(closure)``) computes its gradients inside
``step()``: not judged. Nothing runs outside observed steps.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.nn.parameter import is_lazy

from .gradcarry import SAMPLE, WATCHED
from .optimizers import optimizer_params


def _nonzero(grad: torch.Tensor) -> torch.Tensor:
    """Whether a strided sample of ``grad`` holds a value other than 0 (a device bool)."""
    flat = grad.detach().reshape(-1)
    return flat[::max(1, flat.numel() // SAMPLE)].ne(0).any()


def _task() -> int:
    """The running backward's id (increasing from one backward call to the next), or -1."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if task is None else task()


class GradClear:
    """Post-accumulate hooks on a few parameters per optimizer during an observed step, and
    the verdicts of the optimizer steps taken in it."""

    def __init__(self) -> None:
        self.handles: list = []
        # id(parameter) -> (weak .grad backward added to, its sample held a value other than 0
        # (device bool), the backward's id), for the watched parameters.
        self.added: dict[int, tuple] = {}
        self.verdicts: list = []  # device bools, one per optimizer step judged

    def arm(self, optimizers: list) -> None:
        """Watch a few trainable parameters of each optimizer for this observed step."""
        self.disarm()
        seen: set = set()
        for optimizer in optimizers:
            # (A lazy module's parameter takes no hook before its first forward.)
            trainable = [p for p in optimizer_params([optimizer]) if p.requires_grad
                         and p.is_leaf and p.layout == torch.strided and not is_lazy(p)
                         and id(p) not in seen]
            if not trainable:
                continue
            picks = sorted({round(i * (len(trainable) - 1) / max(WATCHED - 1, 1))
                            for i in range(WATCHED)})
            for i in picks:
                p = trainable[i]
                seen.add(id(p))
                self.handles.append(p.register_post_accumulate_grad_hook(self._on_added))

    def _on_added(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None or grad.layout != torch.strided or grad.is_nested:
            self.added.pop(id(param), None)
            return
        with torch.no_grad():
            self.added[id(param)] = (weakref.ref(grad), _nonzero(grad), _task())

    def judge(self, params: list) -> None:
        """At an optimizer's step (its pre-hook, no closure): whether the gradients the latest
        backward gave its watched parameters were cleared since. ``params``: the parameters
        the optimizer steps. The watched ones' records are spent by this step."""
        if not self.added:
            return
        found = [(p, self.added.pop(id(p))) for p in params if id(p) in self.added]
        if not found:
            return
        latest = max(task for _, (_, _, task) in found)
        had, cleared = [], []
        with torch.no_grad():
            for p, (ref, nonzero, task) in found:
                if task != latest:  # an earlier backward's (another loss's): not this step's
                    continue
                grad = p.grad
                if grad is None:
                    cleared.append(None)
                elif grad is ref():
                    cleared.append(~_nonzero(grad))  # zeroed in place (set_to_none=False)
                else:
                    return  # the loop put another tensor in .grad: not a clearing
                had.append(nonzero)
        verdict = _verdict(had, cleared)
        if verdict is not None:
            self.verdicts.append(verdict)

    def forget(self, params: list) -> None:
        """Spend the watched records of ``params`` without a verdict (a closure's step)."""
        for p in params:
            self.added.pop(id(p), None)

    def take(self) -> list:
        """The verdicts of the observed step (device bools), and forget them."""
        verdicts, self.verdicts = self.verdicts, []
        return verdicts

    def disarm(self) -> None:
        """Remove the hooks and forget the step's records (its verdicts stay until taken)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.added.clear()


def _verdict(had: list, cleared: list) -> Optional[torch.Tensor]:
    """A device bool: some parameter got a gradient other than 0 and each that did had it
    cleared (``cleared``: None where ``.grad`` was None, else a device bool)."""
    if not had:
        return None
    device = had[0].device
    got = torch.stack([h.to(device) for h in had])
    if all(c is None for c in cleared):
        return got.any()
    gone = torch.stack([torch.ones_like(h) if c is None else c.to(device)
                        for h, c in zip(had, cleared)])
    return got.any() & (gone | ~got).all()
