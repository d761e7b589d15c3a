"""What a loss function computes, seen while it runs: the torch loss it calls (also inside a
user's ``def loss_fn(o, t): return F.cross_entropy(o, t)`` or an ``nn.Module`` wrapping
``nn.CrossEntropyLoss``), its reduction, and which of the model's outputs it reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOSS_FUNCTIONS = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll",
    F.binary_cross_entropy_with_logits: "bce_with_logits",
    F.mse_loss: "mse",
}


def loss_items(kind: str, shape: Optional[tuple]) -> Optional[int]:
    """How many items a torch loss of ``kind`` averages over an input of ``shape``: for
    cross-entropy/NLL the samples times positions of an ``(N, C, ...)`` input (1 for an
    unbatched ``(C,)``), else every element; None when the shape is not known."""
    if shape is None:
        return None
    if kind in ("cross_entropy", "nll"):
        return int(shape[0] * math.prod(shape[2:])) if len(shape) >= 2 else 1
    return int(math.prod(shape))


@dataclass(frozen=True)
class LossCall:
    """The first torch loss a loss function called: its family, reduction and input."""

    kind: str
    reduction: str
    shape: tuple
    storage: int  # the input's storage address: a view or reshape of an output shares it
    calls: int = 1  # torch losses the loss function called in all (an auxiliary head's too)

    @property
    def items(self) -> Optional[int]:
        """How many items the loss averages (see :func:`loss_items`)."""
        return loss_items(self.kind, self.shape)

    @property
    def num_classes(self) -> Optional[int]:
        """C of a (N, C, ...) cross-entropy or NLL input (dim 1, as torch reads it)."""
        if self.kind in ("cross_entropy", "nll") and len(self.shape) >= 2:
            return int(self.shape[1])
        return None


class LossWatch(TorchFunctionMode):
    """A ``TorchFunctionMode`` around a loss computation that notes its first torch loss."""

    def __init__(self) -> None:
        super().__init__()
        self.call: Optional[LossCall] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        kind = LOSS_FUNCTIONS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor):
            if self.call is None:
                x = args[0]
                self.call = LossCall(kind, str(kwargs.get("reduction", "mean")),
                                     tuple(x.shape), _storage(x))
            else:
                self.call = replace(self.call, calls=self.call.calls + 1)
        return func(*args, **kwargs)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass)
        return -1


def output_index(call: Optional[LossCall], outputs: list) -> Optional[int]:
    """The position in ``outputs`` of the tensor the loss read (a view of it counts), or None."""
    if call is None or call.storage in (-1, 0):
        return None
    for i, t in enumerate(outputs):
        if isinstance(t, torch.Tensor) and _storage(t) == call.storage:
            return i
    return None


def watched(loss_fn: Any, outputs: Any, targets: Any) -> tuple[Any, Optional[LossCall]]:
    """``loss_fn(outputs, targets)`` and the first torch loss it called."""
    watch = LossWatch()
    with watch:
        loss = loss_fn(outputs, targets)
    return loss, watch.call
