"""Gradients cleared between ``loss.backward()`` and ``optimizer.step()``: a ``zero_grad()``
(the optimizer's or the model's, ``set_to_none`` either way) called between them, so every
step applies no gradient and the weights never change (TL506).

While a step is observed, up to ``WATCHED`` of each watched optimizer's trainable parameters
(the first, the last and between, as :mod:`trainlint.gradcarry` picks them) get a
post-accumulate hook: it keeps, once backward has added a gradient to ``.grad``, that tensor
and whether a strided sample of it (``SAMPLE`` elements) held a value other than 0 (a device
bool). At the optimizer's step pre-hook, where one of them did, the step's gradients were
cleared when every parameter the optimizer holds has ``.grad`` None (known on the host), or
when those left are all zeros, read whole where they hold at most ``FULL_READ`` elements in
all (``set_to_none=False``; a larger model's are not judged). Fewer would not do: a loop may
keep one layer's gradient, or a few rows of an embedding's (textual inversion: TL506 said
error on runs that trained, 0.83 -> 0.49 and 1.52 -> 0.83), and clear the rest on purpose.
A watched ``.grad`` the loop replaced by another tensor is no clearing. The step's verdict, a
device bool, travels in the observed step's one copy to the host. A step that runs a closure
(LBFGS, a SAM's ``step(closure)``) computes its gradients inside ``step()``: not judged.
Nothing runs outside observed steps, nor after the run's first ``JUDGED`` verdicts.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.nn.parameter import is_lazy

from .gradcarry import graph_task, sampled_nonzero, spread
from .optimizers import optimizer_params


class GradClear:
    """Post-accumulate hooks on a few parameters per optimizer during an observed step, and
    the verdicts of the optimizer steps taken in it."""

    def __init__(self) -> None:
        self.handles: list = []
        # id(parameter) -> (its gradient's sample held a value other than 0 (device bool), the
        # backward's id, a weak reference to that gradient), for the watched parameters.
        self.added: dict[int, tuple] = {}
        self.verdicts: list = []  # device bools, one per optimizer step judged
        self.judged = 0  # verdicts taken so far

    def arm(self, optimizers: list) -> None:
        """Watch a few trainable parameters of each optimizer for this observed step (the
        first ``JUDGED`` verdicts of a run only)."""
        self.disarm()
        if self.judged >= JUDGED:
            return
        seen: set = set()
        for optimizer in optimizers:
            # (A lazy module's parameter takes no hook before its first forward.)
            trainable = [p for p in optimizer_params([optimizer]) if p.requires_grad
                         and p.is_leaf and p.layout == torch.strided and not is_lazy(p)
                         and id(p) not in seen]
            for p in spread(trainable):
                seen.add(id(p))
                self.handles.append(p.register_post_accumulate_grad_hook(self._on_added))

    def _on_added(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None or grad.layout != torch.strided or grad.is_nested:
            self.added.pop(id(param), None)
            return
        with torch.no_grad():
            self.added[id(param)] = (sampled_nonzero(grad), graph_task(), weakref.ref(grad))

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
        # Cleared: every gradient of the optimizer's parameters is None now, or all those left
        # are zeros, read whole, where they are few elements in all; another tensor put in a
        # watched .grad is no clearing. Watched gradients alone, or samples, would not do: a
        # loop may keep one layer's, or a few rows of an embedding's (textual inversion), and
        # zero the rest on purpose.
        present = [p.grad for p in params if p.requires_grad and p.grad is not None]
        replaced = any(p.grad is not None and p.grad is not ref() for p, _, ref in current)
        with torch.no_grad():
            if present and (replaced or sum(g.numel() for g in present) > FULL_READ
                            or any(g.layout != torch.strided for g in present)):
                verdict = verdict & False
            elif present:
                largest = torch._foreach_norm(present, float("inf"))  # one call for all
                verdict = verdict & ~torch.stack(
                    [n.to(verdict.device, torch.float32) for n in largest]).ne(0).any()
        self.verdicts.append(verdict)

    def forget(self, params: list) -> None:
        """Spend the watched records of ``params`` without a verdict (a closure's step)."""
        for p in params:
            self.added.pop(id(p), None)

    def take(self) -> list:
        """The verdicts of the observed step (device bools), and forget them."""
        verdicts, self.verdicts = self.verdicts, []
        self.judged += len(verdicts)
        return verdicts

    def disarm(self) -> None:
        """Remove the hooks and forget the step's records (its verdicts stay until taken)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.added.clear()


# Verdicts a run takes: a loop that clears its gradients before the step does so at every
# step, and the watch costs ~2% of an observed step of a small CNN on a CPU.
JUDGED = 8
# The most elements, over all of an optimizer's gradients left in place, read whole to
# judge whether they were zeroed (a small model's: next to nothing beside its step).
FULL_READ = 2 ** 20


def _verdict(had: list) -> Optional[torch.Tensor]:
    """A device bool: some watched parameter got a gradient other than 0."""
    if not had:
        return None
    device = had[0].device
    return torch.stack([h.to(device) for h in had]).any()
