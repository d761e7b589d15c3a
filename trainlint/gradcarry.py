"""Gradients carried over from one optimizer step to the next: ``optimizer.zero_grad()`` not
called between steps, so each step applies the sum of every gradient so far (TL502).

After an observed optimizer step, one of its parameters that had a gradient gets a tensor hook
(it runs with each new gradient, before it is added to ``.grad``) and the optimizer a step
pre-hook, both for that optimizer's next step only. The hook notes whether ``.grad`` was reset
since (``None``, or all zeros for ``zero_grad(set_to_none=False)``); at the next step the
verdict is whether it never was. Two hooks per observed step, one call each: nothing runs on
the steps between. Values are compared on the device and read at the report.
"""

from __future__ import annotations

from typing import Any

import torch

from .optimizers import optimizer_params

# Elements of .grad read to tell a reset (all zeros) from held values.
SAMPLE = 4096


class _Sentinel:
    """The watch on one optimizer's gradients from an observed step to its next step."""

    def __init__(self, owner: GradCarry, optimizer: Any, param: torch.Tensor, step: int) -> None:
        self.owner, self.step, self.param = owner, step, param
        self.reset = self.done = False
        self.kept: list = []  # per new gradient: a device bool, .grad held values then
        self.on_gradient = param.register_hook(self._on_gradient)
        # Taken off at the next arm or at disarm, not by itself: torch is iterating the
        # optimizer's pre-hooks when it runs.
        self.on_step = optimizer.register_step_pre_hook(self._on_next_step)

    def _on_gradient(self, grad: torch.Tensor) -> None:
        held = self.param.grad
        if held is None:
            self.reset = True
        elif not self.reset:  # a strided sample: zeros in place read as zeros throughout
            flat = held.detach().reshape(-1)
            self.kept.append(flat[::max(1, flat.numel() // SAMPLE)].ne(0).any())

    def _on_next_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if self.done:
            return
        self.done = True
        self.on_gradient.remove()
        if not self.reset and self.kept:  # a backward ran and never found .grad reset
            self.owner.verdicts.append((self.step, torch.stack(self.kept).all()))
        self.kept = []

    def remove(self) -> None:
        self.on_gradient.remove()
        self.on_step.remove()


class GradCarry:
    """Sentinels armed at observed optimizer steps, and their verdicts."""

    def __init__(self) -> None:
        self.pending: dict[int, _Sentinel] = {}  # by id of the optimizer watched
        self.verdicts: list[tuple] = []  # (observed step, device bool: .grad never reset)
        self.step = 0  # the training step under way (the Monitor's count)

    def arm(self, optimizer: Any) -> None:
        """Watch ``optimizer``'s gradients from its step just taken to its next."""
        watching = self.pending.get(id(optimizer))
        if watching is not None:
            if not watching.done:
                return  # already watched from an earlier observed step
            watching.remove()  # spent at this step's start: torch has run its pre-hooks
            del self.pending[id(optimizer)]
        param = next((p for p in optimizer_params([optimizer])
                      if p.requires_grad and p.grad is not None), None)
        if param is not None:
            self.pending[id(optimizer)] = _Sentinel(self, optimizer, param, self.step)

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
        held = torch.stack([v.to(device) for _, v in self.verdicts]).tolist()
        return [step for (step, _), kept in zip(self.verdicts, held) if kept]

    def disarm(self) -> None:
        """Remove every hook (the Monitor closes)."""
        for sentinel in self.pending.values():
            sentinel.remove()
        self.pending.clear()
