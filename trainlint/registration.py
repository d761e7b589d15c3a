"""Layers a model uses but does not register: modules or Parameters kept in a plain Python
list, tuple or dict attribute instead of ``nn.ModuleList``/``nn.ModuleDict``/
``nn.ParameterList``. ``model.parameters()`` leaves them out, so an optimizer built from it
never trains them (TL506)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

MAX_ITEMS = 1000


def unregistered_holders(model: nn.Module, ids: frozenset) -> dict[str, int]:
    """``{"proj" (or "block.proj"): how many of the Parameters in ``ids`` it holds}`` for each
    plain list, tuple or dict attribute of the model or a submodule that holds modules or
    Parameters with ids in ``ids`` (those the loss depends on beyond the model's)."""
    found: dict[str, int] = {}
    if not ids:
        return found
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or not isinstance(value, (list, tuple, dict)):
                continue
            items = list(value.values()) if isinstance(value, dict) else list(value)
            held = {id(p) for item in items[:MAX_ITEMS] for p in _params_of(item)} & ids
            if held:
                found[f"{name}.{attr}" if name else attr] = len(held)
    return found


def _params_of(item: Any) -> list:
    if isinstance(item, nn.Module):
        return list(item.parameters())
    if isinstance(item, nn.Parameter):
        return [item]
    return []
