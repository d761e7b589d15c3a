"""The optimizer a check uses when neither the caller nor model.py gives one.

Its update is ``torch.optim.SGD(params, lr=0.01, momentum=0.9)``'s, step for step (dampening 0,
no weight decay, no Nesterov): a parameter's first step sets ``buf = grad``, later steps
``buf = 0.9 * buf + grad``, then ``p -= lr * buf``; a parameter without a gradient is left
alone, its buffer too.

Why not ``torch.optim.SGD`` itself: start-up latency. ``Optimizer.__init__`` goes through
``add_param_group``, which ``torch._disable_dynamo`` wraps, and that imports ``torch._dynamo``
on first use: 1.8-2.4 s on a 2-core CPU machine where ``import torch`` itself takes 1.8-2.5 s,
the bulk of a quick ``trainlint check``. This class never imports it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch.utils.hooks import RemovableHandle

StepHook = Callable[[Any, tuple, dict], Any]


class DefaultSGD:
    """SGD with momentum: what trainlint reads of an optimizer, and the update.

    ``param_groups`` and ``state`` (``{param: {"momentum_buffer": tensor}}``) are laid out as in
    ``torch.optim``; step hooks are called as ``hook(optimizer, args, kwargs)`` like theirs.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.01,
                 momentum: float = 0.9) -> None:
        self.param_groups: list[dict] = [{"params": list(params), "lr": lr,
                                          "momentum": momentum}]
        self.state: dict[torch.Tensor, dict] = {}
        self._pre_hooks: OrderedDict[int, StepHook] = OrderedDict()
        self._post_hooks: OrderedDict[int, StepHook] = OrderedDict()

    def __repr__(self) -> str:
        group = self.param_groups[0]
        return f"SGD(lr={group['lr']}, momentum={group['momentum']})"

    def register_step_pre_hook(self, hook: StepHook) -> RemovableHandle:
        """Call ``hook(self, (), {})`` before each step; ``handle.remove()`` takes it off."""
        return _register(self._pre_hooks, hook)

    def register_step_post_hook(self, hook: StepHook) -> RemovableHandle:
        """Call ``hook(self, (), {})`` after each step; ``handle.remove()`` takes it off."""
        return _register(self._post_hooks, hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (or zero them in place with ``set_to_none=False``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                    continue
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def step(self) -> None:
        """One SGD-with-momentum update of every parameter that has a gradient."""
        for hook in list(self._pre_hooks.values()):
            hook(self, (), {})
        with torch.no_grad():
            for group in self.param_groups:
                self._update(group)
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})

    def _update(self, group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        seen = [p for p in params if p in self.state]
        if seen:
            bufs = [self.state[p]["momentum_buffer"] for p in seen]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, [p.grad for p in seen])
        for p in params:
            if p not in self.state:
                self.state[p] = {"momentum_buffer": torch.clone(p.grad)}
        if params:
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params],
                                alpha=-lr)


def _register(hooks: OrderedDict[int, StepHook], hook: StepHook) -> RemovableHandle:
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle
