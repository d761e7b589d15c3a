"""Gradients cleared between ``loss.backward()`` and ``optimizer.step()``: a ``zero_grad()``
(the optimizer's or the model's, at its default ``set_to_none=True``) called between them, so
every step applies no gradient and the weights never change (TL506).

While a step is observed, up to ``WATCHED`` of each watched optimizer's trainable parameters
(the first, the last and between, as :mod:`trainlint.gradcarry` picks them) get a
post-accumulate hook: it keeps, once backward has added a gradient to ``.grad``, whether a
strided sample of it (``SAMPLE`` elements) held a value other than 0 (a device bool). At the
optimizer's step pre-hook, the parameters the latest backward gave a gradient are read
again: cleared where ``.grad`` is None (known on the host). A ``.grad`` zeroed in place
(``set_to_none=False``) is not judged: a sample cannot tell it from a loop that zeroes all
but a few rows on purpose (textual inversion: TL506 said error on a run that trained, loss
0.83 -> 0.49), and a full read of each gradient would cost a pass over it. The step's
verdict, a device bool (some parameter got a gradient that was not 0, and each that did had
``.grad`` set to None), travels in the observed step's one copy to the host. A step that
runs a closure (LBFGS, a SAM's ``step(closure)``) computes its gradients inside ``step()``:
not judged. Nothing runs outside observed steps.
"""

from __future__ import annotations

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
        # id(parameter) -> (its gradient's sample held a value other than 0 (device bool), the
        # backward's id), for the watched parameters.
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
            self.added[id(param)] = (_nonzero(grad), _task())

    def judge(self, params: list) -> None:
        """At an optimizer's step (its pre-hook, no closure): whether the gradients the latest
        backward gave its watched parameters were cleared since. ``params``: the parameters
        the optimizer steps. The watched ones' records are spent by this step."""
        if not self.added:
            return
        found = [(p, self.added.pop(id(p))) for p in params if id(p) in self.added]
        if not found:
            return
        latest = max(task for _, (_, task) in found)
        # Cleared where every .grad is None now; one still there is kept, or zeroed in place,
        # or in part (textual inversion zeroes each row of an embedding's gradient but its new
        # token's): a sample cannot tell those apart, and a full read costs a pass over it.
        had = [nonzero for p, (nonzero, task) in found if task == latest]
        kept = any(p.grad is not None for p, (_, task) in found if task == latest)
        with torch.no_grad():
            verdict = _verdict(had)
            if verdict is not None:
                self.verdicts.append(verdict & False if kept else verdict)

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


def _verdict(had: list) -> Optional[torch.Tensor]:
    """A device bool: some parameter got a gradient other than 0 (each had it set to None
    since, or the step was not judged)."""
    if not had:
        return None
    device = had[0].device
    return torch.stack([h.to(device) for h in had]).any()
