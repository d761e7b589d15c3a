"""The hooks trainlint puts on objects the user owns (the model's modules, the optimizer).

Each hook holds its owner (the probe or the monitor) weakly, and it is never copied with the
object it sits on: ``copy.deepcopy(model)`` (an EMA or teacher copy, a best-model snapshot) or
``torch.save(model)`` while a Monitor watches the model gives the copy an :class:`InertHook`,
which does nothing and takes itself off a module at its first call, instead of a copy of the
monitor with all its statistics and live hooks. (Unpickling such a model needs trainlint
importable, as it needs the model's own classes.)
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch.nn as nn

# The dicts of an nn.Module that hold forward hooks and their flags, by hook id.
_MODULE_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_MODULE_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called")


class OwnedHook:
    """A bound method of the probe or monitor, as a hook that holds it weakly (a hook outliving
    its owner does nothing)."""

    __slots__ = ("_owner", "_func")

    def __init__(self, method: Callable) -> None:
        self._owner = weakref.ref(method.__self__)  # type: ignore[attr-defined]
        self._func = method.__func__  # type: ignore[attr-defined]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._owner()
        if owner is None:
            return None
        return self._func(owner, *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> InertHook:
        return InertHook()

    def __reduce__(self) -> tuple:
        return (InertHook, ())


class InertHook:
    """A copied or unpickled trainlint hook: it does nothing, and on a module it removes itself
    when called (an optimizer's hooks are left as they are: it iterates over them as it calls
    them)."""

    __slots__ = ()

    def __call__(self, owner: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(owner, nn.Module):
            for name in _MODULE_HOOK_DICTS:
                hooks = getattr(owner, name, None)
                if not isinstance(hooks, dict):
                    continue
                for key in [k for k, hook in hooks.items() if hook is self]:
                    del hooks[key]
                    for flags in _MODULE_HOOK_FLAGS:
                        getattr(owner, flags, {}).pop(key, None)
        return None
