"""``trainlint.check``: run a few training steps under the probe and lint what was seen."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .assemble import TraceBuilder
from .batch import (
    Batch,
    LossChoice,
    default_loss,
    output_loss,
    primary_output,
    split_batch,
    tensors_in,
)
from .default_optimizer import DefaultSGD
from .engine import Selection
from .errors import ConfigError, TargetError, TrainlintError, UserCodeError
from .lossgraph import LossGraph, foreign_parameters, read_loss_graph
from .losswatch import LossCall, compared_output, output_index, watched
from .optimizers import needs_closure, wrapper_notes
from .origins import function_line
from .probe import (
    Probe,
    _model_device,
    compiled_inside,
    exclusive,
    frozen,
    scripted_part,
    training_flags,
)
from .registration import unregistered_holders
from .report import Report, build_report
from .state import restore, snapshot
from .usercode import flat_message, raised_by_trainlint, user_traceback

MAX_STEPS = 1000
BN_SINGLE_VALUE = "Expected more than 1 value per channel when training"

OptimizerArg = Union[None, torch.optim.Optimizer, Callable[[Any], torch.optim.Optimizer]]
StepOptimizer = Union[torch.optim.Optimizer, DefaultSGD]


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
    trainable = _trainable(model)
    opt, made_here = _optimizer(optimizer, model, trainable, notes)
    saved = snapshot(model, None if made_here else opt)
    probe = Probe(model, opt)
    notes += wrapper_notes(opt)
    probe.inputs_every_step = True  # a feature constant in one batch may vary in the next
    builder = TraceBuilder(model, mode="check")
    run: dict = {"loss_kind": None, "loss_reduction": None, "loss_terms": None,
                 "loss_summed": None, "loss_ops": (),
                 "loss_reads_output": None, "loss_squash": None, "loss_weighted": False,
                 "loss_transforms_output": False, "loss_items": None,
                 "loss_soft_targets": False,
                 "num_classes": None,
                 "batch_size": None,
                 "graph_output": None,
                 "unregistered": {}}
    given = {**training_flags(model), "classes": [c.__name__ for c in type(model).__mro__]}
    try:
        probe.attach()
        held = train_mode(model)
        if held:
            notes.append(held)
        with _eager(model, notes), _grad_on(notes), exclusive(probe):
            for step in range(steps):
                if not _one_step(model, batch, loss_fn, opt, probe, builder, step, run, notes):
                    break
    finally:
        probe.detach()
        restore(saved, model, None if made_here else opt)
    device = str(_model_device(model))
    trace = builder.build(steps=steps, batch_size=run["batch_size"], device=device,
                          loss_kind=run["loss_kind"], loss_reduction=run["loss_reduction"],
                          loss_terms=run["loss_terms"], loss_summed=run["loss_summed"],
                          loss_ops=run["loss_ops"],
                          loss_reads_output=run["loss_reads_output"],
                          loss_squash=run["loss_squash"], loss_weighted=run["loss_weighted"],
                          loss_transforms_output=run["loss_transforms_output"],
                          loss_items=run["loss_items"],
                          loss_soft_targets=run["loss_soft_targets"],
                          amp_dtype=probe.autocast,
                          num_classes=run["num_classes"],
                          unregistered=run["unregistered"])
    if made_here and optimizer is not None:
        trace.optimizer_location = function_line(optimizer)
    trace.given_flags = given
    trace.remade_params = run.get("remade", ())
    return build_report(trace, selection or Selection(), target=target, notes=notes)


def train_mode(model: nn.Module) -> Optional[str]:
    """``model.train()``, as a training loop starts, but a submodule the user froze on purpose
    stays as it was: one in eval mode whose parameters are all frozen (a fine-tuned backbone's
    BatchNorm, put in eval with ``requires_grad_(False)``), as the user's own loop runs it.
    Returns a note for the report when such a submodule holds BatchNorm or Dropout layers in
    eval mode: a loop that calls ``model.train()`` every epoch switches them back on."""
    flags = {m: m.training for m in model.modules()}
    kept = [m for m in model.modules() if m is not model and not m.training and frozen(m)]
    model.train()
    for part in kept:
        for m in part.modules():
            m.training = flags[m]
    names = {m: n for n, m in model.named_modules()}
    held = sorted({names[m] for part in kept for m in part.modules()
                   if not m.training and isinstance(m, _MODE_LAYERS)})
    if not held:
        return None
    listed = ", ".join(repr(n) for n in held[:4]) + (f" (+{len(held) - 4} more)"
                                                     if len(held) > 4 else "")
    return (f"{len(held)} BatchNorm/Dropout layer(s) of frozen submodules (eval mode, parameters "
            f"frozen) ran in eval mode, as the model was built: {listed}; a training loop that "
            f"calls model.train() every epoch switches them back to training (BatchNorm then "
            f"normalizes with the batch and updates its running statistics): put them back in "
            f"eval after each model.train(), or override train() in their module")


_MODE_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _eager(model: nn.Module, notes: list) -> Any:
    """Run the compiled submodules of ``model`` eagerly (their compiled code runs no hook, and
    dynamo would trace the probe's hooks); a no-op context for an eager model."""
    if not compiled_inside(model):
        return contextlib.nullcontext()
    if not hasattr(torch.compiler, "set_stance"):
        raise TargetError("a submodule is torch.compile'd: checking it needs torch>=2.6 (to run "
                          "it eagerly); check the model before torch.compile instead")
    notes.append("torch.compile'd submodules ran eagerly (torch.compiler.set_stance"
                 "('force_eager'))")
    return torch.compiler.set_stance("force_eager")


def _grad_on(notes: list) -> Any:
    """Gradients on for the training steps: a check called under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (from an evaluation function) still trains, as a loop would."""
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    notes.append("trainlint.check was called with gradients off (torch.no_grad or "
                 "torch.inference_mode): its training steps ran with them on")
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _probe_target(model: Any, notes: list) -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        raise TargetError(scripted_part(model))
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        notes.append("the model is torch.compile'd: the original module was probed eagerly")
        model = original
    if not isinstance(model, nn.Module):
        raise TargetError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    scripted = scripted_part(model)
    if scripted is not None:
        raise TargetError(scripted)
    return model


def _trainable(model: nn.Module) -> list:
    """The trainable parameters, after checking the model can run a training step at all."""
    params = list(model.parameters())
    if any(nn.parameter.is_lazy(p) for p in params):
        raise TargetError("the model has uninitialized lazy parameters (nn.LazyLinear, ...): run "
                          "one forward pass on a real batch before checking it, so that the "
                          "parameters exist")
    if any(p.device.type == "meta" for p in params):
        raise TargetError("the model's parameters are on the meta device (shapes without data): "
                          "materialize them first, e.g. model.to_empty(device='cpu') and then "
                          "initialize the weights")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise TargetError(
            f"the model has no trainable parameters ({len(params)} parameter(s), every "
            "requires_grad is False), so there is no training step to check: unfreeze the "
            "layers you train (e.g. model.requires_grad_(True) or layer.requires_grad_(True))")
    return trainable


def _validate_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")


def _optimizer(optimizer: OptimizerArg, model: nn.Module, trainable: list,
               notes: list) -> tuple[StepOptimizer, bool]:
    if optimizer is None:
        default = DefaultSGD(trainable, lr=0.01, momentum=0.9)
        notes.append(f"default optimizer used: {default!r}")
        return default, True
    if isinstance(optimizer, torch.optim.Optimizer):
        return _steppable(optimizer), False
    if callable(optimizer):
        try:
            made = optimizer(trainable)
        except Exception as exc:
            raise UserCodeError(f"building the optimizer raised {type(exc).__name__}: "
                                f"{flat_message(exc)}", user_traceback(exc),
                                phase="optimizer") from exc
        if not isinstance(made, torch.optim.Optimizer):
            several = isinstance(made, (list, tuple)) and all(
                isinstance(o, torch.optim.Optimizer) for o in made)
            raise TargetError(f"the optimizer factory returned {type(made).__name__}, "
                              "not a torch.optim.Optimizer" + (
                                  "; a check steps one optimizer: lint a model trained by "
                                  "several (Muon + AdamW) with trainlint.Monitor(model, "
                                  "optimizer=[...]) in its training loop" if several else ""))
        return _steppable(made), True
    raise TargetError(
        f"optimizer must be an Optimizer or a factory, got {type(optimizer).__name__}")


def _steppable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer``, unless its step needs a closure, which a check does not write for it."""
    if needs_closure(optimizer):
        raise TargetError(f"{type(optimizer).__name__}.step() needs a closure that re-evaluates "
                          "the loss, which trainlint check does not write: lint this model with "
                          "another optimizer (the default SGD: no build_optimizer), or with a "
                          "trainlint.Monitor in your own training loop")
    return optimizer


def _check_devices(batch: Batch, model: nn.Module) -> None:
    device = _model_device(model)
    for name, t in _named_inputs(batch) + [("the targets", batch.targets)]:
        if isinstance(t, torch.Tensor) and t.device != device:
            raise TargetError(
                f"{name} is on {t.device} but the model is on {device}: move the batch to the "
                f"model's device (e.g. .to({str(device)!r}); the CLI's --device does this)")


def _next_batch(batch: Any) -> Batch:
    if not callable(batch):
        return split_batch(batch)
    try:
        value = batch()
    except TrainlintError:
        raise
    except Exception as exc:
        raise UserCodeError(f"the batch function raised {type(exc).__name__}: "
                            f"{flat_message(exc)}", user_traceback(exc), phase="batch") from exc
    return split_batch(value)


def _one_step(model: nn.Module, batch: Any, loss_fn: Optional[Callable],
              opt: StepOptimizer, probe: Probe, builder: TraceBuilder, step: int,
              run: dict, notes: list) -> bool:
    """One observed training step; False when the run cannot go on (the reason is recorded)."""
    data = _next_batch(batch)
    _check_devices(data, model)
    run["batch_size"] = data.size
    probe.begin_step()
    probe.record_targets(data.targets)
    try:
        loss = _train_step(model, data, loss_fn, opt, probe, builder, step, run, notes)
        if loss is None:
            return False
        # (collect reads it in float64: a float64 model's loss of 1e40 stays finite)
        extra = {"loss": loss.detach() if loss.is_floating_point() else loss.detach().float()}
        pending = run.pop("pending_graph", None)
        if pending is not None:  # a check of the loss's divisor on the device: read it now
            extra["count_check"] = pending.count_check
        snapshot = probe.collect(extra=extra)
        if pending is not None:
            check = snapshot.values.pop(("extra", "count_check"))
            _note_loss_graph(run, pending.resolve(bool(check.reshape(-1)[0])))
        builder.add(snapshot, step)
    finally:
        probe.end_step()
    return True


def _train_step(model: nn.Module, data: Batch, loss_fn: Optional[Callable],
                opt: StepOptimizer, probe: Probe, builder: TraceBuilder, step: int,
                run: dict, notes: list) -> Optional[torch.Tensor]:
    """Forward, loss, backward, optimizer step; the loss, or None when a BatchNorm saw a single
    value (recorded as a run error). The user's exceptions become :class:`UserCodeError`."""
    phase = "forward"
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
            notes.append(f"the check stopped at training step {step + 1}: a BatchNorm saw one "
                         "value per channel (TL404)")
            return None
        phase = "loss"
        choice = _loss_choice(loss_fn, outputs, data, notes, step)
        compared: list = []
        loss, call = watched(choice.fn, outputs, data.targets, compared)
        _validate_loss(loss)
        tensors = tensors_in(outputs)
        found = compared_output(compared, tensors)
        if found is not None:
            probe.record_compared(*found, count=len(tensors))
        probe.loss_output_first(output_index(call, tensors) if call is not None else
                                run["graph_output"], len(tensors))
        graph = None
        if step == 0:
            _note_loss(run, choice, call)
            # Before the backward frees the saved values: a sum's divisor tells a count
            # (a mean) from another number.
            graph = read_loss_graph(loss, model.parameters(), probe.output_nodes)
            run["unregistered"] = unregistered_holders(model, graph.foreign_ids)
            if graph.foreign_ids and not run["unregistered"]:  # held until the next step
                # (those the model's outputs reach: a loss's own nets, a perceptual one built
                # per call or a sliced-Wasserstein loss's random projections, are no layers)
                run["foreign_kept"] = foreign_parameters(tensors, model.parameters())
        elif step == 1 and run.get("foreign_kept"):
            run["remade"] = _remade(run.pop("foreign_kept"),
                                    foreign_parameters(tensors, model.parameters()))
        phase = "backward"
        loss.backward()
        phase = "optimizer step"
        opt.step()
    except TrainlintError:
        raise
    except Exception as exc:
        if raised_by_trainlint(exc):
            raise
        if phase == "loss" and _nonfinite(outputs):
            # The loss choked on NaN/Inf the model made (BCE: "all elements of input should be
            # between 0 and 1"): where the model made it is the finding (TL504).
            message = f"{type(exc).__name__}: {flat_message(exc)}"
            builder.errors.append({"module": "", "phase": "loss", "kind": "nonfinite-outputs",
                                   "message": message, "step": step})
            builder.add(probe.collect(), step)
            notes.append(f"the check stopped at training step {step + 1}: the loss raised "
                         f"{message}, on model outputs that hold NaN/Inf (TL504)")
            return None
        raise _user_error(exc, phase, step, data, probe.failed_module,
                          probe.failed_args) from exc
    if graph is not None:
        _note_loss_graph(run, graph)
        if graph.count_check is not None:
            run["pending_graph"] = graph
        if run["graph_output"] is not None:  # a loss the model made: the graph says what it read
            probe.loss_output_first(graph.output_index, graph.output_count)
    return loss


def _remade(before: list, now: list) -> tuple:
    """The shapes of ``now``'s Parameters when they stand in for ``before``'s, none of which the
    model's outputs reached again (the same shapes, new tensors: layers built anew each step);
    else ()."""
    again = {id(p) for p in now}
    shapes = sorted(tuple(p.shape) for p in now)
    if not now or any(id(p) in again for p in before) or \
            shapes != sorted(tuple(p.shape) for p in before):
        return ()
    return tuple(shapes)


def _nonfinite(outputs: Any) -> bool:
    """Whether a floating-point tensor among the model's outputs holds NaN/Inf (a host sync:
    only on the way out of a failed step)."""
    return any((t.is_floating_point() or t.is_complex())
               and not bool(torch.isfinite(t.detach()).all()) for t in tensors_in(outputs))


PHASES = {"forward": "the model's forward pass", "loss": "computing the loss",
          "backward": "the backward pass", "optimizer step": "the optimizer step"}


def _fed_the_batch(data: Batch, args: Sequence) -> bool:
    """Whether the module that raised was fed a batch input as it is (or nothing is known of
    what it was fed: ``args``, the probe's (dtype, shape) of its tensors, is empty)."""
    batch = {(str(v.dtype).replace("torch.", ""), tuple(v.shape))
             for _, v in _named_inputs(data) if isinstance(v, torch.Tensor)}
    return not args or bool(batch.intersection(a for a in args if isinstance(a, tuple)))


def _user_error(exc: Exception, phase: str, step: int, data: Batch,
                failed_module: Optional[str], failed_args: Sequence = ()) -> UserCodeError:
    """The user's code raised during ``phase``: say where, with what, and what to try
    (``failed_args``: what the module that raised was fed, as the probe saw it)."""
    where = PHASES[phase]
    if phase == "forward" and failed_module:
        where += f" (in module {failed_module!r})"
    if out_of_memory(exc):
        message = (f"out of memory in {where} of training step {step + 1}, fed "
                   f"{_describe_batch(data)}: {flat_message(exc)}; try a smaller batch "
                   "(--batch-size, or fewer samples from get_batch()), shorter inputs or a "
                   "smaller model")
    else:
        message = (f"{where} raised {type(exc).__name__} in training step {step + 1}: "
                   f"{flat_message(exc)}")
        if phase == "forward" and failed_module and not _fed_the_batch(data, failed_args):
            fed = ", ".join(f"a {a[0]} tensor of shape {a[1]}" if isinstance(a, tuple)
                            else f"a {a}" for a in failed_args)
            message += (f"; {failed_module!r} was fed {fed} (the batch: "
                        f"{_describe_batch(data)}): check that module's sizes against what "
                        "reaches it")
        elif phase == "forward":
            message += (f"; it was fed {_describe_batch(data)}: check that the batch is what "
                        "the model's forward expects")
        elif phase == "backward" and step > 0 and SECOND_BACKWARD in message:
            message += ("; the first step's backward ran, so most likely a tensor carried over "
                        "from an earlier step (an RNN's hidden state kept on the module, a "
                        "running total of losses) still holds that step's graph: .detach() it "
                        "where it is carried over, or recompute it every step where it must "
                        "carry a gradient (a tensor computed once from parameters and cached); "
                        "retain_graph=True would keep every earlier step's graph alive and "
                        "backpropagate through all of them")
    return UserCodeError(message, user_traceback(exc), phase=phase)


# What autograd says when a backward reaches a graph an earlier backward has freed.
SECOND_BACKWARD = "backward through the graph a second time"

# What the CPU allocator says when an allocation fails (CUDA's is a torch.OutOfMemoryError).
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed, on a GPU or on the CPU."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and CPU_OUT_OF_MEMORY in flat_message(exc))


def _named_inputs(data: Batch) -> list:
    named = [(f"input {i}", a) for i, a in enumerate(data.args)]
    return named + [(f"input {k!r}", v) for k, v in data.kwargs.items()]


def _describe_batch(data: Batch) -> str:
    """``input 0: float32 tensor of shape (8, 5); targets: int64 tensor of shape (8,)``."""
    parts = [f"{name}: {_describe_value(v)}" for name, v in _named_inputs(data)]
    if data.targets is not None:
        parts.append(f"targets: {_describe_value(data.targets)}")
    return "; ".join(parts)


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        inner = ", ".join(f"{k!r}: {_describe_value(v)}" for k, v in value.items())
        return f"a dict {{{inner}}}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe_value(v) for v in value)
        return f"a {type(value).__name__} ({inner})"
    return f"a {type(value).__name__}"


def _loss_choice(loss_fn: Optional[Callable], outputs: Any, data: Batch, notes: list,
                 step: int) -> LossChoice:
    if loss_fn is not None:
        return LossChoice(loss_fn, "custom")  # known by the torch loss it calls (_note_loss)
    if output_loss(outputs) is None and primary_output(outputs) is None:
        raise TargetError(
            f"the model's forward returned {_describe_value(outputs)}, with no floating-point "
            "tensor to compute a loss on: return the logits (or any float tensor), a .loss / "
            "['loss'] tensor, or give a loss_fn that handles this output")
    choice = default_loss(outputs, data.targets)
    if step == 0 and choice.note:
        notes.append(choice.note)
    return choice


def _validate_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TargetError(f"the loss must be a scalar tensor, got {_describe_value(loss)}: "
                          "return the loss tensor from loss_fn (not loss.item())")
    if loss.numel() != 1:
        raise TargetError(f"the loss must be a scalar, got shape {tuple(loss.shape)}: reduce it "
                          "(e.g. .mean()) in loss_fn")
    if not loss.requires_grad:
        raise TargetError("the loss does not require grad: nothing in it depends on a trainable "
                          "parameter (is the forward under torch.no_grad()?)")


def _note_loss_graph(run: dict, graph: LossGraph) -> None:
    """What the loss's graph adds to what its calls showed: whether it reads an output as it
    is, terms computed from the outputs outside torch losses (a distillation KL), and a
    per-sample loss (reduction "none") or a sum that is then averaged. A loss the model
    computed itself (its ``.loss``, taken by default or returned by a loss_fn: no loss call
    was seen) is known by the graph alone, as a Monitor knows it."""
    run["loss_reads_output"] = graph.reads_output
    run["loss_squash"] = graph.squash
    run["loss_weighted"] = graph.weighted
    run["loss_transforms_output"] = graph.transforms_output
    run["loss_summed"] = graph.summed
    run["loss_ops"] = graph.ops
    # A loss_fn that called no torch loss (it returns the model's own outputs.loss) is known
    # by the graph as well.
    by_graph = run["loss_kind"] == "model" or (run["loss_kind"] == "custom"
                                               and run["loss_terms"] is None)
    if by_graph and graph.kind is not None:
        run.update(loss_kind=graph.kind, loss_reduction=graph.reduction, loss_terms=graph.terms,
                   num_classes=graph.num_classes, graph_output=graph.output_index,
                   loss_items=graph.items, loss_soft_targets=graph.soft_targets)
        return
    if graph.kind is None or run["loss_terms"] is None:
        return
    run["loss_terms"] = max(run["loss_terms"], graph.terms)
    if run["loss_reduction"] in ("none", "sum") and graph.reduction == "mean":
        run["loss_reduction"] = "mean"


def _note_loss(run: dict, choice: LossChoice, call: Optional[LossCall]) -> None:
    """The loss family (a user's function, or nn.CrossEntropyLoss, is known by the torch loss
    it calls), its reduction, its terms and the number of classes it reads."""
    kind = choice.kind
    if kind == "custom" and call is not None:
        kind = call.kind
    seen = call is not None and call.kind == kind
    run["loss_kind"] = kind
    run["loss_reduction"] = call.reduction if seen else None
    run["loss_terms"] = call.calls if seen else None
    run["num_classes"] = call.num_classes if seen else None
    run["loss_items"] = call.items if seen else None
