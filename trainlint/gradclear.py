"""Gradients cleared between ``loss.backward()`` and ``optimizer.step()``: a ``zero_grad()``
(the optimizer's or the model's, ``set_to_none`` either way) called between them, so every
step applies no gradient and the weights never change (TL506).

While a step is observed, up to ``WATCHED`` of each watched optimizer's trainable parameters
(the first, the last and between, as :mod:`trainlint.gradcarry` picks them), and its
smallest, get a post-accumulate hook: it keeps, once backward has added a gradient to
``.grad``, that tensor and whether a strided sample of it (``SAMPLE`` elements) held a value
other than 0 (a device bool). At the optimizer's step pre-hook, the parameters the latest
backward gave a gradient are read again: cleared where ``.grad`` is None (known on the host),
or where it is the tensor backward made, the smallest of those read whole (at most
``FULL_READ`` elements: a bias) is all zeros, and so are the others' samples. A sample alone
would not do: textual inversion zeroes every row of an embedding's gradient but its new
token's (TL506 said error on a run that trained, loss 0.83 -> 0.49). A ``.grad`` the loop
replaced by another tensor is no clearing. The step's verdict, a device bool, travels in the
observed step's one copy to the host. A step that runs a closure (LBFGS, a SAM's
``step(closure)``) computes its gradients inside ``step()``: not judged. Nothing runs
outside observed steps.
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
        # id(parameter) -> (its gradient's sample held a value other than 0 (device bool), the
        # backward's id, a weak reference to that gradient), for the watched parameters.
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
            picks = {round(i * (len(trainable) - 1) / max(WATCHED - 1, 1))
                     for i in range(WATCHED)}
            # ... and its smallest, whose gradient zeroed in place a full read can tell.
            picks.add(min(range(len(trainable)), key=lambda i: trainable[i].numel()))
            for i in sorted(picks):
                p = trainable[i]
                seen.add(id(p))
                self.handles.append(p.register_post_accumulate_grad_hook(self._on_added))

    def _on_added(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None or grad.layout != torch.strided or grad.is_nested:
            self.added.pop(id(param), None)
            return
        with torch.no_grad():
            self.added[id(param)] = (_nonzero(grad), _task(), weakref.ref(grad))

    def judge(self, params: list) -> None:
        """At an optimizer's step (its pre-hook, no closure): whether the gradients the latest
        backward gave its watched parameters were cleared since. ``params``: the parameters
        the optimizer steps. The watched ones' records are spent by this step."""
        if not self.added:
            return
        found = [(p, self.added.pop(id(p))) for p in params if id(p) in self.added]
        if not found:
            return
        latest = max(task for _, (_, task, _) in found)
        current = [(p, nonzero, ref) for p, (nonzero, task, ref) in found if task == latest]
        verdict = _verdict([nonzero for _, nonzero, _ in current])
        if verdict is None:
            return
        # Another tensor put in .grad is no clearing. One zeroed in place, or in part
        # (textual inversion zeroes each row of an embedding's gradient but its new token's),
        # a sample cannot tell: a full read of the smallest such gradient, where it is small.
        replaced = any(p.grad is not None and p.grad is not ref() for p, _, ref in current)
        in_place = [p for p, _, ref in current if p.grad is not None and p.grad is ref()]
        with torch.no_grad():
            if replaced:
                verdict = verdict & False
            elif in_place:
                # The smallest read whole, the others' samples: a loop that zeroes one bias's
                # gradient on purpose keeps the weights'.
                small = min(in_place, key=lambda p: p.numel())
                if small.numel() > FULL_READ:
                    verdict = verdict & False
                else:
                    left = [small.grad.ne(0).any()] + [_nonzero(p.grad) for p in in_place
                                                        if p is not small]
                    verdict = verdict & ~torch.stack(left).any()
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


# The most elements of a gradient zeroed in place read whole to judge it (a bias's, a norm
# scale's: next to nothing beside the step).
FULL_READ = 2 ** 16


def _verdict(had: list) -> Optional[torch.Tensor]:
    """A device bool: some watched parameter got a gradient other than 0."""
    if not had:
        return None
    device = had[0].device
    return torch.stack([h.to(device) for h in had]).any()
