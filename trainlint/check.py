"""``trainlint.check``: run a few training steps under the probe and lint what was seen."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from .assemble import TraceBuilder
from .batch import Batch, LossChoice, default_loss, loss_kind_of, primary_output, split_batch
from .engine import Selection
from .errors import ConfigError, TargetError, TrainlintError, UserCodeError
from .probe import Probe, _model_device
from .report import Report, build_report
from .state import restore, snapshot
from .usercode import user_traceback

MAX_STEPS = 1000
BN_SINGLE_VALUE = "Expected more than 1 value per channel when training"

OptimizerArg = Union[None, torch.optim.Optimizer, Callable[[Any], torch.optim.Optimizer]]


def check(model: nn.Module, batch: Any, loss_fn: Optional[Callable] = None,
          optimizer: OptimizerArg = None, steps: int = 3, *,
          selection: Optional[Selection] = None, target: str = "",
          notes: Optional[list] = None) -> Report:
    """Run ``steps`` training steps of ``model`` on ``batch`` under the probe; lint the trace.

    ``batch`` is ``inputs`` or ``(inputs, targets)`` (or a zero-argument callable returning
    one, called each step). ``optimizer`` is an Optimizer over ``model``'s parameters or a
    factory ``params -> Optimizer`` (default: SGD lr=0.01, momentum=0.9). The model, its
    optimizer and the RNG states are left exactly as they were, and no hook stays behind.
    """
    notes = list(notes or [])
    model = _probe_target(model, notes)
    _validate_steps(steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TargetError("the model has no trainable parameters (every requires_grad is False); "
                          "there is no training step to check")
    opt, made_here = _optimizer(optimizer, model, trainable, notes)
    saved = snapshot(model, None if made_here else opt)
    probe = Probe(model, opt)
    builder = TraceBuilder(model, mode="check")
    run: dict = {"loss_kind": None, "num_classes": None, "batch_size": None}
    try:
        probe.attach()
        model.train()
        for step in range(steps):
            if not _one_step(model, batch, loss_fn, opt, probe, builder, step, run, notes):
                break
    finally:
        probe.detach()
        restore(saved, model, None if made_here else opt)
    device = str(_model_device(model))
    trace = builder.build(steps=steps, batch_size=run["batch_size"], device=device,
                          loss_kind=run["loss_kind"], num_classes=run["num_classes"])
    return build_report(trace, selection or Selection(), target=target, notes=notes)


def _probe_target(model: Any, notes: list) -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        raise TargetError("the model is a TorchScript module: scripted modules do not run Python "
                          "hooks, so trainlint cannot observe them. Check the eager nn.Module "
                          "before torch.jit.script/trace instead")
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        notes.append("the model is torch.compile'd: the original module was probed eagerly")
        return original
    if not isinstance(model, nn.Module):
        raise TargetError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _validate_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")


def _optimizer(optimizer: OptimizerArg, model: nn.Module, trainable: list,
               notes: list) -> tuple[torch.optim.Optimizer, bool]:
    if optimizer is None:
        notes.append("default optimizer used: SGD(lr=0.01, momentum=0.9)")
        return torch.optim.SGD(trainable, lr=0.01, momentum=0.9), True
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer, False
    if callable(optimizer):
        try:
            made = optimizer(trainable)
        except Exception as exc:
            raise UserCodeError(f"building the optimizer raised {type(exc).__name__}: {exc}",
                                user_traceback(exc), phase="optimizer") from exc
        if not isinstance(made, torch.optim.Optimizer):
            raise TargetError(f"the optimizer factory returned {type(made).__name__}, "
                              "not a torch.optim.Optimizer")
        return made, True
    raise TargetError(
        f"optimizer must be an Optimizer or a factory, got {type(optimizer).__name__}")


def _check_devices(batch: Batch, model: nn.Module) -> None:
    device = _model_device(model)
    for t in batch.tensors():
        if t.device != device:
            raise TargetError(f"an input is on {t.device} but the model is on {device}: move the "
                              f"batch with .to({str(device)!r}) (the CLI's --device does this)")


def _one_step(model: nn.Module, batch: Any, loss_fn: Optional[Callable],
              opt: torch.optim.Optimizer, probe: Probe, builder: TraceBuilder, step: int,
              run: dict, notes: list) -> bool:
    """One observed training step; False when the run cannot go on (the reason is recorded)."""
    data = split_batch(batch() if callable(batch) else batch)
    _check_devices(data, model)
    run["batch_size"] = data.size
    probe.begin_step()
    try:
        opt.zero_grad(set_to_none=True)
        try:
            outputs = model(*data.args, **data.kwargs)
        except ValueError as exc:
            if BN_SINGLE_VALUE not in str(exc):
                raise
            builder.errors.append({"module": probe.failed_module or "", "phase": "forward",
                                   "kind": "batchnorm-single-value", "message": str(exc)})
            builder.add(probe.collect(), step)
            return False
        choice = _loss_choice(loss_fn, outputs, data, notes, step)
        loss = choice.fn(outputs, data.targets)
        _validate_loss(loss)
        if step == 0:
            run["loss_kind"] = choice.kind
            run["num_classes"] = _num_classes(choice, outputs)
        loss.backward()
        opt.step()
        builder.add(probe.collect(extra={"loss": loss.detach().float()}), step)
    except TrainlintError:
        raise
    except torch.OutOfMemoryError as exc:
        raise UserCodeError(
            f"out of memory during training step {step + 1}: {str(exc).splitlines()[0]}. "
            "Try a smaller --batch-size", user_traceback(exc), phase="step") from exc
    except Exception as exc:
        phase = "forward" if probe.failed_module is not None else "training step"
        where = f" in module {probe.failed_module!r}" if probe.failed_module else ""
        raise UserCodeError(f"the model's {phase} raised {type(exc).__name__}{where}: {exc}",
                            user_traceback(exc), phase=phase) from exc
    finally:
        probe.end_step()
    return True


def _loss_choice(loss_fn: Optional[Callable], outputs: Any, data: Batch, notes: list,
                 step: int) -> LossChoice:
    if loss_fn is not None:
        return LossChoice(loss_fn, loss_kind_of(loss_fn))
    choice = default_loss(outputs, data.targets)
    if step == 0 and choice.note:
        notes.append(choice.note)
    return choice


def _validate_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TargetError(f"the loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise TargetError(f"the loss must be a scalar, got shape {tuple(loss.shape)}: reduce it "
                          "(e.g. .mean()) in loss_fn")
    if not loss.requires_grad:
        raise TargetError("the loss does not require grad: nothing in it depends on a trainable "
                          "parameter (is the forward under torch.no_grad()?)")


def _num_classes(choice: LossChoice, outputs: Any) -> Optional[int]:
    if choice.kind != "cross_entropy":
        return None
    out = primary_output(outputs)
    if out is None or out.dim() < 2:
        return None
    return int(out.shape[choice.class_dim])
