"""Gradients carried over from one optimizer step to the next: ``optimizer.zero_grad()`` not
called between steps, so each step applies the sum of every gradient so far (TL502).

After an observed optimizer step, up to ``WATCHED`` of its parameters that had a dense
gradient (spread over its parameter list: the first, the last and between) get a tensor hook
(it runs with each new gradient, before backward adds it to ``.grad``), a post-accumulate hook
(it runs once backward has added it) and the optimizer a step pre-hook, for that optimizer's
next step only. A parameter carried its gradient when, at that step, its ``.grad`` is still the
tensor the observed step applied, never set to ``None`` nor zeroed in place
(``zero_grad(set_to_none=False)``) before backward added a new gradient to it. A ``.grad`` the
loop assigned anew (``p.grad = g`` after ``torch.autograd.grad``) is a reset; gradients that
``torch.autograd.grad`` returns, copied into ``.grad`` in place, were never added to it. The
values are compared on the device (a strided sample of ``SAMPLE`` elements) and read at the
report; nothing runs on the steps between.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .optimizers import optimizer_params

# Elements of .grad read to tell a reset (all zeros) from held values.
SAMPLE = 4096
# Parameters watched per optimizer (a loop may zero only part of the model).
WATCHED = 4


def sampled_nonzero(grad: torch.Tensor) -> torch.Tensor:
    """Whether a strided sample of ``SAMPLE`` elements of ``grad`` holds a value other than 0
    (a device bool)."""
    flat = grad.detach().reshape(-1)
    return flat[::max(1, flat.numel() // SAMPLE)].ne(0).any()


def spread(params: list) -> list:
    """Up to ``WATCHED`` of ``params``, spread over the list: the first, the last and between."""
    if not params:
        return []
    picks = {round(i * (len(params) - 1) / max(WATCHED - 1, 1)) for i in range(WATCHED)}
    return [params[i] for i in sorted(picks)]


class _Watch:
    """One parameter's ``.grad`` from an observed step to its optimizer's next step."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param
        self.applied = weakref.ref(param.grad)  # the tensor the observed step applied
        self.reset = False
        self.seen: Any = None  # .grad held values when the new gradient came (device bool)
        self.kept: Any = None  # ... at every gradient backward added since (device bool)
        self.handles = [param.register_hook(self._on_gradient),
                        param.register_post_accumulate_grad_hook(self._on_added)]

    def _on_gradient(self, grad: torch.Tensor) -> None:
        held = self.param.grad
        if held is None or held is not self.applied() or held.layout != torch.strided:
            self.reset = True
        elif not self.reset:  # a strided sample: zeros in place read as zeros throughout
            self.seen = sampled_nonzero(held)

    def _on_added(self, param: torch.Tensor) -> None:
        # Backward added the gradient to .grad (torch.autograd.grad does not come here).
        seen, self.seen = self.seen, None
        if seen is not None and not self.reset:
            self.kept = seen if self.kept is None else self.kept & seen

    def carried(self) -> Any:
        """A device bool (the gradient was added to held values), or None (it was reset, was
        replaced, or backward added no new gradient)."""
        if self.seen is not None and _in_backward():
            # The optimizer steps inside the backward (from the user's post-accumulate hook,
            # which ran before this watch's): the gradient is added by now.
            self._on_added(self.param)
        if self.reset or self.kept is None or self.param.grad is not self.applied():
            return None
        return self.kept

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.seen = self.kept = None


def graph_task() -> int:
    """The running backward's id (increasing from one backward call to the next), or -1."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if task is None else task()


def _in_backward() -> bool:
    """Whether a backward pass is running (this code is called from one of its hooks)."""
    return graph_task() != -1


class _Sentinel:
    """The watch on one optimizer's gradients from an observed step to its next step."""

    def __init__(self, owner: GradCarry, optimizer: Any, params: list, step: int) -> None:
        self.owner, self.step = owner, step
        self.done = False
        self.watches = [_Watch(p) for p in params]
        # Taken off at the next arm or sweep, not by itself: torch is iterating the
        # optimizer's pre-hooks when it runs.
        self.on_step = optimizer.register_step_pre_hook(self._on_next_step)

    def _on_next_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if self.done:
            return
        self.done = True
        verdicts = [v for v in (w.carried() for w in self.watches) if v is not None]
        for watch in self.watches:
            watch.remove()
        if verdicts:
            device = verdicts[0].device
            self.owner.verdicts.append(
                (self.step, torch.stack([v.to(device) for v in verdicts]).any(), optimizer))

    def remove(self) -> None:
        for watch in self.watches:
            watch.remove()
        self.on_step.remove()


class GradCarry:
    """Sentinels armed at observed optimizer steps, and their verdicts."""

    def __init__(self) -> None:
        self.pending: dict[int, _Sentinel] = {}  # by id of the optimizer watched
        # (observed step, device bool: .grad never reset, the optimizer watched)
        self.verdicts: list[tuple] = []
        # The optimizers whose verdicts :meth:`carried` read as held, in order of first step.
        self.carried_by: list = []
        self.step = 0  # the training step under way (the Monitor's count)

    def arm(self, optimizer: Any) -> None:
        """Watch ``optimizer``'s gradients from its step just taken to its next."""
        watching = self.pending.get(id(optimizer))
        if watching is not None:
            if not watching.done:
                return  # already watched from an earlier observed step
            watching.remove()  # spent at this step's start: torch has run its pre-hooks
            del self.pending[id(optimizer)]
        with_grad = [p for p in optimizer_params([optimizer]) if p.requires_grad
                     and p.grad is not None and p.grad.layout == torch.strided]
        if with_grad:
            self.pending[id(optimizer)] = _Sentinel(self, optimizer, spread(with_grad),
                                                    self.step)

    def sweep(self) -> None:
        """Take off the sentinels spent since (at their optimizer's next step)."""
        for key in [k for k, s in self.pending.items() if s.done]:
            self.pending.pop(key).remove()

    def carried(self) -> list[int]:
        """The observed steps whose gradients were still held, never reset, when the optimizer
        stepped next (one copy of the device verdicts)."""
        if not self.verdicts:
            return []
        device = self.verdicts[0][1].device
        held = torch.stack([v.to(device) for _, v, _ in self.verdicts]).tolist()
        kept = [(step, optimizer) for (step, _, optimizer), h in zip(self.verdicts, held) if h]
        self.carried_by = list({id(o): o for _, o in kept}.values())
        return [step for step, _ in kept]

    def disarm(self) -> None:
        """Remove every hook (the Monitor closes)."""
        for sentinel in self.pending.values():
            sentinel.remove()
        self.pending.clear()
