"""Batches and losses: how a user's batch becomes model inputs, targets and a scalar loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .errors import TargetError
from .lossgraph import made_by


def leading_size(tensors: list) -> Optional[int]:
    """A batch's size: dim 0 of its first tensor that has dims."""
    for t in tensors:
        if t.dim() > 0:
            return int(t.size(0))
    return None


@dataclass
class Batch:
    """Model inputs (positional and keyword) and optional targets."""

    args: tuple
    kwargs: dict
    targets: Any = None

    def tensors(self) -> list:
        """The input tensors, in order, also inside lists, tuples and dicts."""
        return tensors_in(list(self.args) + list(self.kwargs.values()))

    @property
    def size(self) -> Optional[int]:
        for value in list(self.args) + list(self.kwargs.values()):
            if isinstance(value, PackedSequence):  # its data's dim 0 counts time steps too
                return int(value.batch_sizes[0]) if value.batch_sizes.numel() else 0
        return leading_size(self.tensors())

    def to(self, device: torch.device) -> Batch:
        return Batch(tuple(move_to(a, device) for a in self.args),
                     {k: move_to(v, device) for k, v in self.kwargs.items()},
                     move_to(self.targets, device))


def tensors_in(obj: Any, depth: int = 0) -> list:
    """The tensors in ``obj``, in order: itself, or those inside its lists, tuples, dicts and
    dataclasses, up to 3 levels of containers deep (an output can refer to itself)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 2:
        return []
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif hasattr(obj, "__dataclass_fields__"):
        obj = [getattr(obj, name) for name in obj.__dataclass_fields__]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item, depth + 1)]
    return []


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with the tensors in it (through lists, tuples, named tuples and dicts) on
    ``device``."""
    if isinstance(value, (torch.Tensor, PackedSequence)):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # a named tuple
        return type(value)(*(move_to(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


# One model input as it is: a PackedSequence is a named tuple, yet one argument of an RNN.
SINGLE_INPUTS = (torch.Tensor, PackedSequence)


def split_batch(batch: Any) -> Batch:
    """``inputs`` or ``(inputs, targets)``; inputs: a tensor (or a PackedSequence), a tuple of
    them or a dict. A two-item list is ``[inputs, targets]`` too: what a DataLoader yields for
    (x, y) samples."""
    targets = None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # (a PackedSequence holds 4)
        batch, targets = batch
    if isinstance(batch, SINGLE_INPUTS):
        result = Batch((batch,), {}, targets)
    elif isinstance(batch, dict):
        result = Batch((), dict(batch), targets)
    elif isinstance(batch, (list, tuple)) and batch and all(
            isinstance(b, SINGLE_INPUTS) for b in batch):
        result = Batch(tuple(batch), {}, targets)
    else:
        raise TargetError(
            f"the batch must be a tensor, a tuple of tensors or a dict of tensors (optionally "
            f"as (inputs, targets)); got {_describe(batch)}")
    if not result.tensors():
        raise TargetError("the batch holds no tensor to feed the model")
    for t in result.tensors():
        if t.dim() > 0 and t.size(0) == 0:  # size(0): nested tensors have no .shape
            raise TargetError(f"the batch is empty: an input has shape {tuple(t.shape)}; the "
                              "batch must hold at least one sample (check get_batch() and "
                              "--batch-size)")
    return result


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        kinds = ", ".join(type(v).__name__ for v in value)
        return f"a {type(value).__name__} of {len(value)} ({kinds})"
    return f"a {type(value).__name__}"


def output_loss(outputs: Any) -> Optional[torch.Tensor]:
    """The loss a model computed itself (transformers' ``ModelOutput.loss``, a dict 'loss',
    or the forward's only output when it is a floating-point scalar: ``loss = model(x, y)``)."""
    loss = None
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dim() == 0 and outputs.is_floating_point() else None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
    elif hasattr(outputs, "loss"):
        loss = getattr(outputs, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def primary_output(outputs: Any) -> Optional[torch.Tensor]:
    """The tensor a default loss is computed on: the output, the 'logits', or the first one."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "logits"):
        logits = outputs.get("logits") if isinstance(outputs, dict) else outputs.logits
        if isinstance(logits, torch.Tensor):
            return logits
    from .probe import first_float_tensor

    return first_float_tensor(outputs)


@dataclass
class LossChoice:
    fn: Callable[[Any, Any], torch.Tensor]
    kind: str
    note: Optional[str] = None


def default_loss(outputs: Any, targets: Any) -> LossChoice:
    """SPEC's defaults: the model's own loss, cross-entropy, MSE, or a synthetic loss."""
    if output_loss(outputs) is not None:
        what = "a scalar" if isinstance(outputs, torch.Tensor) else ".loss"
        return LossChoice(lambda out, _t: output_loss(out), "model",
                          f"loss taken from the model's output ({what})")
    out = primary_output(outputs)
    if out is None:
        raise TargetError("the model's forward returned no floating-point tensor to train on")
    if isinstance(targets, torch.Tensor):
        # Log-probabilities (a model ending in log_softmax, as pytorch/examples' MNIST) take
        # NLLLoss: cross-entropy over them is the same value, but it is TL601's double softmax.
        logs = made_by(out) == "LogSoftmaxBackward"
        ce, kind, what = ((F.nll_loss, "nll", "negative log-likelihood (the model's output is "
                           "log_softmax)") if logs else
                          (F.cross_entropy, "cross_entropy", "cross-entropy"))
        if not targets.is_floating_point() and out.dim() >= 2 and \
                targets.shape == out.shape[:1] + out.shape[2:]:
            return LossChoice(lambda o, t: ce(primary_output(o), t), kind,
                              f"default loss: {what}")
        if not targets.is_floating_point() and out.dim() >= 2 and \
                targets.shape == out.shape[:-1]:
            return LossChoice(
                lambda o, t: ce(primary_output(o).flatten(0, -2), t.flatten()), kind,
                f"default loss: {what} over the last dim")
        if targets.is_floating_point() and targets.shape == out.shape:
            return LossChoice(lambda o, t: F.mse_loss(primary_output(o), t), "mse",
                              "default loss: mean squared error")
    return LossChoice(lambda o, _t: primary_output(o).float().pow(2).mean() / 2, "synthetic",
                      "synthetic loss used (mean of squared outputs / 2): no loss_fn and no "
                      "targets that match the output")

