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


# Losses that compare an output with a target of its shape, value for value: the target they
# are handed (after any mask or rescaling in the loss function) is what the output must reach.
COMPARED_LOSSES = frozenset({F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
                             F.binary_cross_entropy})


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
        # (the storage of the input, the target) of each comparing loss (see
        # COMPARED_LOSSES) given a floating-point target of the input's size, in call order.
        self.compared: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in COMPARED_LOSSES:
            _compare(self, args, kwargs)
        kind = LOSS_FUNCTIONS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor):
            if self.call is None:
                x = args[0]
                self.call = LossCall(kind, str(kwargs.get("reduction", "mean")),
                                     tuple(x.shape), _storage(x))
            else:
                self.call = replace(self.call, calls=self.call.calls + 1)
        return func(*args, **kwargs)


def _compare(watch: LossWatch, args: tuple, kwargs: dict) -> None:
    """Note a comparing loss's input and target (the first that reads a model output decides:
    each is kept until one does; one with ``reduction='none'`` is masked or weighted after,
    so it is left out)."""
    x = args[0] if args else kwargs.get("input")
    y = args[1] if len(args) > 1 else kwargs.get("target")
    if kwargs.get("reduction", "mean") == "none" or not (
            isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            and y.is_floating_point() and y.numel() == x.numel() > 0):
        return
    watch.compared.append((_storage(x), y))


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


def watched(loss_fn: Any, outputs: Any, targets: Any,
            compared: Optional[list] = None) -> tuple[Any, Optional[LossCall]]:
    """``loss_fn(outputs, targets)`` and the first torch loss it called (``compared``: a list
    that gets the :attr:`LossWatch.compared` of the call)."""
    watch = LossWatch()
    with watch:
        loss = loss_fn(outputs, targets)
    if compared is not None:
        compared.extend(watch.compared)
    return loss, watch.call


def compared_output(compared: list, outputs: list) -> Optional[tuple]:
    """``(position in outputs, target)`` of the first comparing loss whose input is (a view
    of) one of the model's outputs, else None (losses that compare a mix of them, a rescaled
    one, a mean over the batch)."""
    storages = {_storage(t): i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)}
    for storage, target in compared:
        if storage not in (-1, 0) and storage in storages:
            return storages[storage], target
    return None
