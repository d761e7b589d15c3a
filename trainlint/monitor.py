"""``trainlint.Monitor``: the probe inside a live training loop, observing every N-th step."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import weakref
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from . import distributed
from .assemble import TraceBuilder
from .batch import output_loss, tensors_in
from .eager import EagerHold
from .engine import Selection
from .errors import ConfigError, TrainlintError
from .gradcarry import GradCarry
from .gradclear import GradClear
from .hooks import OwnedHook
from .lossgraph import LossGraph, item_mean, output_nodes, read_loss_graph
from .optimizers import needs_closure, optimizer_params, optimizers_of, wrapper_notes
from .probe import (
    Probe,
    ProbeSnapshot,
    _model_device,
    autocast_dtype,
    compiled_inside,
    scripted_part,
    training_forward,
)
from .registration import unregistered_holders
from .report import FAIL_LEVELS, Report, build_report
from .sinks import make_sink, step_scalars
from .stats import G

# Observed steps in a row that a GradScaler may skip (inf/NaN gradients at its loss scale)
# before the step is linted as it is, once its scale is down to 1 (from Megatron-LM's 2**32,
# halved at each skip, that takes 32: a gradient that overflows unscaled is the model's own).
MAX_SCALER_SKIPS = 8
# Steps (micro-batches of gradient accumulation) that an observation runs on while the
# optimizer has not stepped; past it the observation ends as it is, and no later one runs on.
MAX_ACCUMULATION = 64
# The losses of the steps between observations wait in a list (a copy each: one op a step)
# and are folded into the window's sum and max this many at a time, and at each observation.
LOSS_FOLD = 256
# The Monitors not closed yet (weakly: one that is dropped leaves it).
_LIVE: weakref.WeakSet = weakref.WeakSet()


class RunFailed(TrainlintError):
    """Raised by ``Monitor.step`` when ``fail_on`` is set and an observed step produced a
    finding at or above it: the run is doomed, stop it early. ``report`` holds the findings."""

    def __init__(self, report: Report, fail_on: str) -> None:
        failing = report.failing(fail_on)
        lines = "".join(f"\n  {f.code} {f.rule} {f.module or '(model)'}: {f.message}"
                        for f in failing)
        super().__init__(f"trainlint stopped the run: {len(failing)} finding(s) at or above "
                         f"{fail_on!r}{lines}")
        self.report = report


class Monitor:
    """Observe every ``every``-th training step of ``model``; ``report()`` lints what was seen.

    Call ``step(loss)`` once per training step, after ``optimizer.step()``. Between
    observations no hook of its own is on the model (with ``every=1`` they stay on, idle);
    an observed step costs one host sync. Under
    gradient accumulation, calling it once per micro-batch works too (``every`` then counts
    micro-batches): an observed micro-batch that no optimizer step ended is observed on into
    the next ones, up to the one that steps (at most ``MAX_ACCUMULATION``), so its update
    ratios are read.
    ``optimizer`` may be a list of optimizers that each step part of the model's parameters
    (SparseAdam for a sparse embedding and Adam for the rest, Muon and AdamW).

    ``model`` may be wrapped in DistributedDataParallel or ``torch.compile`` (the module
    inside is hooked; observed steps of a compiled model run eagerly). Under a process group,
    every rank's statistics are merged once per observed step and only rank 0 logs.
    ``log_to`` receives per-layer scalars after each observed step (see ``trainlint.sinks``);
    ``scaler`` (a ``GradScaler``) lets gradient statistics be unscaled; with ``fail_on``
    (``"error"``, ``"warning"``, ``"info"``) ``step`` raises :class:`RunFailed` as soon as an
    observed step yields a finding at or above that severity.
    """

    def __init__(self, model: nn.Module, optimizer: Any = None, every: int = 100, *,
                 selection: Optional[Selection] = None, log_to: Any = None, scaler: Any = None,
                 fail_on: Optional[str] = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a whole number >= 1, got {every!r}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Monitor needs a torch.nn.Module, got {type(model).__name__}")
        scripted = scripted_part(model)
        if scripted is not None:
            raise ConfigError(scripted)
        if fail_on is not None and fail_on not in FAIL_LEVELS:
            raise ConfigError(f"fail_on must be one of {', '.join(FAIL_LEVELS)}, got {fail_on!r}")
        _check_optimizer(optimizer)
        if selection is not None and not isinstance(selection, Selection):
            raise ConfigError("selection must be a trainlint.engine.Selection (e.g. "
                              "Selection(select={'TL101'})), got "
                              f"{type(selection).__name__}")
        self.compiled = compiled_inside(model)
        if self.compiled and not hasattr(torch.compiler, "set_stance"):
            raise ConfigError("Monitor on a torch.compile'd model needs torch>=2.6 (to run the "
                              "observed steps eagerly); pass the model before torch.compile, or "
                              "lint it with trainlint.check(model, batch)")
        self.model = distributed.unwrap(model)
        self.optimizer = optimizer
        self.optimizers = optimizers_of(optimizer)
        # Training began before this Monitor (a resume): an optimizer has stepped already.
        self._resumed = any(_has_stepped(o) for o in self.optimizers)
        self.every = every
        self.selection = selection or Selection()
        self.scaler = scaler
        self.fail_on = fail_on
        self.rank, self.world_size = distributed.world()
        sink = make_sink(log_to)
        self.sink = sink if self.rank == 0 else None
        self.steps_seen = 0
        # The step number the sink logs at (a trainer's global step), when the caller sets it;
        # else steps_seen.
        self.log_step: Optional[int] = None
        self.batch_size: Optional[int] = None
        self.global_batch_size: Optional[int] = None
        self.scaler_skips = 0
        self._skips_in_row = 0
        self._scale: Optional[float] = None
        self._retry = False
        # Steps the current observation ran on without an optimizer step, and whether one may
        # still run on (not after one that reached MAX_ACCUMULATION).
        self._ran_on = 0
        self._run_on_allowed = True
        self._opened_at = 0  # the step the current observation began at
        self._explicit = False
        self._eager = EagerHold()
        self._autocast: Optional[str] = None
        self._model_loss: Optional[torch.Tensor] = None
        # Set by an adapter whose framework may hide the loss: what the report says when no
        # loss was observed (else: pass the loss to monitor.step(loss)).
        self.loss_hint: Optional[str] = None
        # Set by an adapter that saw a backward per optimizer in a training step (a GAN under
        # Lightning's manual optimization); the probe sees it where it hooks both optimizers.
        self.alternating = False
        self.probe = Probe(self.model, self.optimizers)
        self.probe.watch_others = bool(self.optimizers)
        self._carry = self.probe.carry = GradCarry()
        self.probe.cleared = GradClear()
        self.probe.attach()
        # (step, what was watched, what is now) of each optimizer the loop replaced.
        self._replaced: list = []
        # The live Monitors whose model this one's loss runs through, or whose loss runs
        # through this model (see _competition).
        self._partners: weakref.WeakSet = weakref.WeakSet()
        # The root forward hook, on the model only while a step is observed (as the probe's).
        self._hooks: list = []
        # A Monitor dropped without close() (the hooks hold the probe, not the Monitor) still
        # takes its hooks off the model and the optimizers when it is collected.
        self._release = weakref.finalize(self, _release, self.probe, self._hooks, self._eager,
                                         self._carry)
        # Device-side sum, max and min of the losses since the last observed step (no host
        # sync), and the losses not folded into them yet.
        self._loss_sum: Optional[torch.Tensor] = None
        self._loss_max: Optional[torch.Tensor] = None
        self._loss_min: Optional[torch.Tensor] = None
        self._loss_count = 0
        self._pending_losses: list = []
        # What the loss is and depends on (trainable tensors outside the model and its
        # optimizer), read once from the first observed loss that has an autograd graph.
        self._loss_graph: Optional[LossGraph] = None
        try:
            self.builder = TraceBuilder(self.model, mode="monitor")
            self._open()
        except BaseException:  # leave nothing behind: no hook, no stance
            self.close()
            raise
        _LIVE.add(self)

    @property
    def observing(self) -> bool:
        """Whether the current training step is being observed."""
        return self.probe.observing

    def step(self, loss: Any = None) -> None:
        """Mark the end of one training step (after ``optimizer.step()``)."""
        if not self.probe.attached:
            raise ConfigError("this Monitor is closed")
        if loss is None and self.probe.observing:
            loss = self._model_loss
        if self.probe.observing:
            self.read_loss(loss)
        value = self._accumulate(loss)
        running_on = self.probe.observing and self._runs_on()
        try:
            if self.probe.observing and not running_on:
                extra = {}
                if self._loss_graph is not None and self._loss_graph.count_check is not None:
                    extra["loss_count_check"] = self._loss_graph.count_check
                if value is not None:
                    self._fold_losses()
                    extra["loss"] = value
                    extra["loss_mean"] = self._loss_sum / self._loss_count
                    extra["loss_max"] = self._loss_max
                    extra["loss_min"] = self._loss_min
                    self._loss_sum = self._loss_max = self._loss_min = None
                    self._loss_count = 0
                self._observed(extra)
        finally:  # counted also when RunFailed: a loop that goes on stays on the every-N grid
            self.steps_seen += 1
            self._carry.step = self.steps_seen
            self._carry.sweep()
        if running_on:
            return
        if not self._explicit and self._due():
            self._open()
        else:
            self.probe.take_off()
            self._unhook()

    def start_step(self) -> None:
        """Mark the start of a training step (optional; the callbacks call it).

        Once called, a step is observed from its ``start_step()`` to its ``step()``, so
        evaluation run between training steps is never observed.
        """
        if not self.probe.attached:
            raise ConfigError("this Monitor is closed")
        self._explicit = True
        if not self.probe.observing and self._due():
            self._open()

    def _runs_on(self) -> bool:
        """Whether the observation goes on into the next step: gradients wait on the watched
        parameters and no optimizer stepped in it (``step()`` called per micro-batch of
        gradient accumulation), so the update ratios (TL503) wait for the micro-batch that
        steps it. Not without an optimizer to watch, nor when a GradScaler skipped the step
        (the retry handles that; reading its scale is a host sync, on this path only), nor
        past ``MAX_ACCUMULATION`` steps (then never again: the loop steps no watched
        optimizer)."""
        if not self.optimizers or self.probe.optimizer_stepped or not self._run_on_allowed or \
                self._replacement() is not None:  # (a new optimizer stepped: the step is over)
            return False
        if not any(p.grad is not None for p in optimizer_params(self.optimizers)):
            return False
        if self._ran_on >= MAX_ACCUMULATION:
            self._run_on_allowed = False
            return False
        if self.scaler is not None and float(self.scaler.get_scale()) < (self._scale or 1.0):
            return False
        self._ran_on += 1
        return True

    def _due(self, ahead: int = 0) -> bool:
        """Whether the step ``ahead`` steps after the current count is observed."""
        return self._retry or (self.steps_seen + ahead) % self.every == 0

    def _open(self) -> None:
        """Start observing: read the loss scale, run compiled code eagerly, arm the probe."""
        # A retry after steps the scaler skipped starts where they did: they left the weights
        # as they were (a first observed step so retried is still at the init).
        if not (self._retry and self._skips_in_row):
            self._opened_at = self.steps_seen
        self._retry = False
        self._ran_on = 0
        self._model_loss = None
        if self.scaler is not None:
            self._scale = float(self.scaler.get_scale())
        self._eager.take()
        if not self._hooks:
            self._hooks.append(self.model.register_forward_hook(OwnedHook(self._after_forward)))
        self.probe.begin_step()

    def _replacement(self) -> Optional[list]:
        """The optimizers the loop stepped the model with in this observed step instead of
        those given, where those given did not step and the others hold every parameter they
        did (a new optimizer built over the same model); None otherwise (an actor-critic's
        critic optimizer, stepping a shared encoder at a step where the actor's does not)."""
        found = self.probe.unwatched
        if not found or self.probe.optimizer_stepped:
            return None
        held = {id(p) for p in optimizer_params(found)}
        given = {id(p) for p in optimizer_params(self.optimizers)}
        return list(found) if given <= held else None

    def _replace_optimizers(self, found: list) -> None:
        """The loop stepped the model's parameters with optimizers it was not given, which hold
        all of those it was given, and not with those (a new optimizer built mid-run, as for a
        second phase): watch those from now on, and say so in the report."""
        before = ", ".join(_described(o) for o in self.optimizers)
        self.optimizers = list(found)
        self.optimizer = found[0] if len(found) == 1 else list(found)
        self.probe.watch(self.optimizers)
        self._replaced.append((self.steps_seen, before,
                               ", ".join(_described(o) for o in found)))

    def _close_stance(self) -> None:
        self._eager.release()

    def _observed(self, extra: dict) -> None:
        """The observed step is over: sync once, merge ranks, fold it into the trace."""
        snap = self.probe.collect(extra=extra)
        check = snap.values.pop(("extra", "loss_count_check"), None)
        if check is not None and self._loss_graph is not None:
            self._loss_graph = self._loss_graph.resolve(bool(check.reshape(-1)[0]))
        # Hooks stay on (idle) when the next step is observed too: every=1 re-installs nothing.
        self.probe.end_step(keep_hooks=not self._explicit and self._due(ahead=1))
        self._close_stance()
        replacement = self._replacement()
        if replacement is not None:
            self._replace_optimizers(replacement)
        if self.scaler is not None and not self._unscale(snap):
            return
        local_batch = _batch_size(snap)
        batches = [local_batch]
        if self.world_size > 1:
            gathered = distributed.gather({"values": snap.values, "batch": local_batch})
            snap.values = distributed.reduce_values([g["values"] for g in gathered],
                                                    self.world_size)
            batches = [g["batch"] for g in gathered]
        if local_batch is not None:
            self.batch_size = local_batch
        if all(b is not None for b in batches):
            self.global_batch_size = sum(batches)
        self.builder.add(snap, self.steps_seen, started=self._opened_at,
                         micro_batches=self._ran_on + 1)
        if self.sink is not None:
            step = self.steps_seen if self.log_step is None else self.log_step
            self.sink(step_scalars(self.builder.per_step[-1]), step)
        if self.fail_on is not None:
            report = self._report(interim=True)
            if report.failing(self.fail_on):
                self.probe.take_off()
                raise RunFailed(report, self.fail_on)

    def _unscale(self, snap: ProbeSnapshot) -> bool:
        """Divide gradient statistics by the loss scale the step's backward used; False (and
        observe the next step instead) when the scaler skipped the step for inf/NaN gradients
        while the loss itself was finite."""
        scale = self._scale or 1.0
        loss = snap.values.get(("extra", "loss"))
        finite_loss = loss is None or bool(math.isfinite(float(loss.reshape(-1)[0])))
        if (float(self.scaler.get_scale()) < scale and finite_loss
                and (self._skips_in_row < MAX_SCALER_SKIPS or scale > 1.0)):
            self.scaler_skips += 1
            self._skips_in_row += 1
            self._retry = True
            return False
        self._skips_in_row = 0
        for tag, value in snap.values.items():
            if tag[0] == "grad":
                rows = value.astype("float64", copy=True)
                rows[..., G["sumsq"]] /= scale * scale
                snap.values[tag] = rows
        return True

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Root forward hook: note autocast's dtype and a loss the model computed itself."""
        if not self.probe.observing or not training_forward() or self.probe.skipping:
            return
        self._autocast = autocast_dtype(_model_device(self.model).type) or self._autocast
        loss = output_loss(output)
        if loss is not None:
            if self._loss_graph is None and loss.grad_fn is not None:  # (the probe records
                self._loss_graph = read_loss_graph(  # the outputs after this hook runs)
                    loss, self._own_parameters(), [output_nodes(tensors_in(output))])
            self._model_loss = self._per_item(loss)

    def _per_item(self, loss: torch.Tensor) -> torch.Tensor:
        """The model's loss as recorded: for a sum divided by a count of items (transformers'
        num_items_in_batch, which under gradient accumulation counts the whole step's), its
        per-item mean; decided on the device while the divisor's check is pending."""
        graph = self._loss_graph
        mean = None
        if graph is not None and graph.sum_over and (graph.counted or graph.count_check
                                                     is not None):
            mean = item_mean(loss)
        if mean is None:
            return loss.detach()
        if graph.count_check is not None:
            with torch._C.DisableTorchFunction():
                return torch.where(graph.count_check, mean, loss.detach())
        return mean

    def _amp_dtype(self) -> Optional[str]:
        found = self._autocast or self.probe.autocast
        if found is not None:
            return found
        for p in self.model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                return str(p.dtype).replace("torch.", "")
        return None

    def _accumulate(self, loss: Any) -> Optional[torch.Tensor]:
        """This step's loss as a 0-d device tensor, a copy taken now (the mean of a per-sample
        loss vector; the modulus of a complex one), added to the running window: one op a
        step, the folding into the sum and max comes later."""
        if isinstance(loss, torch.Tensor) and loss.numel() > 0:
            value = loss.detach()
            if value.is_complex():
                value = value.abs()
            value = value.clone() if value.dim() == 0 else value.to(_wide(value)).mean()
        elif _number(loss):
            value = torch.full((), float(loss), device=_model_device(self.model))  # no copy
        elif loss is None or isinstance(loss, torch.Tensor):
            return None
        else:
            raise ConfigError(f"step(loss): the loss must be a tensor or a number, got "
                              f"{type(loss).__name__} {loss!r:.40}")
        self._pending_losses.append(value)
        self._loss_count += 1
        if len(self._pending_losses) >= LOSS_FOLD:
            self._fold_losses()
        return value

    def _fold_losses(self) -> None:
        """Fold the waiting losses into the window's sum, max and min (a few ops), in float64 (a
        float64 model's loss of 1e40 is finite), float32 where the device has no float64."""
        pending, self._pending_losses = self._pending_losses, []
        if not pending:
            return
        first = pending[0]
        wide = _wide(first)
        if not all(v.dtype == first.dtype and v.device == first.device for v in pending):
            pending = [v.to(device=first.device, dtype=wide) for v in pending]
        values = torch.stack(pending).to(wide)
        total, top, bottom = (values.sum().reshape(1), values.max().reshape(1),
                              values.min().reshape(1))
        if self._loss_sum is None:
            self._loss_sum, self._loss_max, self._loss_min = total, top, bottom
        else:  # (a model moved to another device since the window began: its device holds it)
            self._loss_sum += total.to(self._loss_sum.device)
            torch.maximum(self._loss_max, top.to(self._loss_max.device), out=self._loss_max)
            torch.minimum(self._loss_min, bottom.to(self._loss_min.device), out=self._loss_min)

    def _unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def report(self) -> Report:
        """Findings over the observed steps so far (the same on every rank)."""
        return self._report()

    def _report(self, interim: bool = False) -> Report:
        """The report; ``interim`` when judged mid-run to stop it (``fail_on``)."""
        # A forward that a KeyboardInterrupt ended (no forward hook ran) left the probe's mode
        # pushed: no forward runs now, so it goes (a notebook user inspects the report next).
        self.probe._exit_mode()
        notes = []
        if self.compiled:
            notes.append("the model is torch.compile'd: observed steps ran eagerly "
                         "(torch.compiler.set_stance('force_eager')), the others compiled")
        notes += wrapper_notes(self.optimizer)
        if self.probe.wrapped_stepped and not self.probe.own_step_seen:
            inner = ", ".join(sorted(self.probe.wrapped_stepped))
            outer = ", ".join(type(o).__name__ for o in self.optimizers)
            notes.append(f"the optimizer given ({outer}) never ran its own step() in an observed "
                         f"step, while the one it wraps ({inner}) did (a SAM's second_step()): "
                         "each observation ended there, but the update ratio (TL503) is "
                         f"measured on the optimizer given; pass the {inner} to the Monitor to "
                         "measure it")
        for step, before, now in self._replaced:
            notes.append(f"at step {step} the training loop stepped the model's parameters with "
                         f"an optimizer the Monitor was not given ({now}), and no longer with "
                         f"the one it was given ({before}): a new optimizer built mid-run; the "
                         "Monitor watches the new one from there on")
        if self.scaler_skips:
            notes.append(f"the GradScaler skipped {self.scaler_skips} observed step(s) "
                         "(inf/NaN gradients at its loss scale); the next step was observed "
                         "instead")
        trace = self.builder.build(steps=self.steps_seen, batch_size=self.batch_size,
                                   device=str(_model_device(self.model)),
                                   world_size=self.world_size,
                                   global_batch_size=self.global_batch_size,
                                   amp_dtype=self._amp_dtype(),
                                   resumed=self._resumed, loss_tail=self._loss_tail(),
                                   loss_hint=self.loss_hint,
                                   closure_optimizer=next((type(o).__name__ for o in
                                                           self.optimizers if needs_closure(o)),
                                                          None),
                                   **self._loss_facts())
        trace.adversarial, trace.foreign_params = self._competition()
        graph = self._loss_graph
        trace.foreign_copy = graph is not None and bool(graph.foreign_shapes) and list(
            graph.foreign_shapes) == sorted(tuple(p.shape) for p in self.model.parameters()
                                            if p.requires_grad)
        trace.alternating = self.alternating or self.probe.competing
        trace.replaced_optimizers = list(self._replaced)
        trace.grads_carried = self._carry.carried()
        if len(self.optimizers) > 1:
            labels = [self._optimizer_label(o) for o in self.optimizers]
            # Two alike (two Adams over no common module): their place in the list given.
            labels = [f"{label} (optimizer {i} of those given)" if labels.count(label) > 1
                      else label for i, label in enumerate(labels)]
            by_id = {id(o): label for o, label in zip(self.optimizers, labels)}
            trace.carried_by = [by_id.get(id(o), self._optimizer_label(o))
                                for o in self._carry.carried_by]
        trace.optimizer_stepped = self.probe.own_step_seen
        if graph is not None:
            trace.unregistered = unregistered_holders(self.model, graph.foreign_ids)
        trace.interim = interim
        return build_report(trace, self.selection, notes=notes)

    def _optimizer_label(self, optimizer: Any) -> str:
        """``optimizer`` as the report names it among several: its class and the innermost
        module holding every parameter it steps ("Adam over 'head'")."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        held = [names[id(p)].split(".")[:-1] for p in optimizer_params([optimizer])
                if id(p) in names]
        common = os.path.commonprefix(held) if held else []  # (element-wise, on lists too)
        where = f" over {'.'.join(common)!r}" if common else ""
        return f"{type(optimizer).__name__}{where}"

    def _loss_tail(self) -> Optional[dict]:
        """The mean, max and min of the losses after the last observed step (read at the report,
        one copy; left in the window for the next observed step), so the report's loss
        curve reaches the last step: a loss that became NaN since is not missed. On one
        process only (each rank has its own losses; the report is the same on all)."""
        self._fold_losses()
        if not self._loss_count or self._loss_sum is None or self.world_size > 1:
            return None
        device = self._loss_sum.device
        mean, top, bottom = torch.cat([self._loss_sum / self._loss_count,
                                       self._loss_max.to(device),
                                       self._loss_min.to(device)]).tolist()
        return {"step": self.steps_seen - 1, "loss_mean": mean, "loss_max": top,
                "loss_min": bottom}

    def read_loss(self, loss: Any) -> None:
        """Read what an observed step's loss computes off its autograd graph (once; before
        or after its backward): the loss's kind for TL601/TL302, and the model output it
        reads, which the rules then take for the model's output (as ``check`` does).
        ``step`` does this with the loss it gets; an adapter whose framework hands ``step``
        a detached loss calls it with the loss before the backward. A loss without a graph
        is ignored."""
        if self._loss_graph is None and isinstance(loss, torch.Tensor) and \
                loss.grad_fn is not None:
            self._loss_graph = read_loss_graph(loss, self._own_parameters(),
                                               self.probe.output_nodes)
            self._note_adversaries(self._loss_graph.foreign_ids)
        self._loss_output_first()

    def _note_adversaries(self, foreign: frozenset) -> None:
        """Pair this Monitor with every live one whose model its loss runs through (a GAN
        generator's through its discriminator; a backbone's through the head that another
        Monitor watches); :meth:`_competition` tells the two apart at the report."""
        if not foreign:
            return
        for other in list(_LIVE):
            if other is not self and any(id(p) in foreign for p in other.model.parameters()):
                self._partners.add(other)
                other._partners.add(self)

    def _competition(self) -> tuple:
        """``(adversarial, foreign)``: whether the loss competes with a paired Monitor's (one
        loss runs through the other's model and not the other way: a GAN, whose levels show
        how the two compete, not whether each learns), and how many trainable tensors
        outside the model and its optimizer it depends on, less a cooperating partner's (two
        Monitors on the two halves of one model, the same loss running through both)."""
        graph = self._loss_graph
        foreign = set(graph.foreign_ids) if graph is not None else set()
        mine = {id(p) for p in self.model.parameters()}
        adversarial = False
        for other in list(self._partners):
            theirs = {id(p) for p in other.model.parameters()}
            they_use = (other._loss_graph is not None
                        and bool(other._loss_graph.foreign_ids & mine))
            i_use = bool(foreign & theirs)
            if i_use and they_use:
                foreign -= theirs
            elif i_use or they_use:
                adversarial = True
        return adversarial, len(foreign)

    def _loss_output_first(self) -> None:
        """Put the output the loss reads first among the last forward's outputs (once each:
        the last of an observed step's forwards is the one the trace keeps)."""
        graph = self._loss_graph
        if graph is not None:
            self.probe.loss_output_first(graph.output_index, graph.output_count)

    def _loss_facts(self) -> dict:
        """The RunTrace fields on the loss, from its graph."""
        graph = self._loss_graph or LossGraph()
        return {"loss_kind": graph.kind,
                "loss_reduction": graph.reduction if graph.kind else None,
                "loss_terms": graph.terms if graph.kind else None,
                "loss_reads_output": graph.reads_output, "loss_squash": graph.squash,
                "loss_weighted": graph.weighted,
                "loss_transforms_output": graph.transforms_output, "loss_items": graph.items,
                "loss_soft_targets": graph.soft_targets,
                "loss_summed": graph.summed if self._loss_graph is not None else None,
                "num_classes": graph.num_classes, "loss_ops": graph.ops}

    def _own_parameters(self) -> list:
        own = list(self.model.parameters())
        own += optimizer_params(self.optimizers)
        return own

    @property
    def is_main(self) -> bool:
        """Whether this process reports: rank 0, or the only process."""
        return self.rank == 0

    def close(self) -> None:
        """Detach every hook (idempotent)."""
        _LIVE.discard(self)
        self._release()  # (once: a second call, or the Monitor's collection, does nothing)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(probe: Probe, hooks: list, eager: EagerHold, carry: GradCarry) -> None:
    """What :meth:`Monitor.close` undoes, for a Monitor collected without it."""
    eager.release()
    carry.disarm()
    for handle in hooks:
        handle.remove()
    hooks.clear()
    probe.detach()


def _batch_size(snap: ProbeSnapshot) -> Optional[int]:
    """This process's batch size: dim 0 of the training forward's first input (as ``trainlint
    check`` reads it; a BatchNorm over flattened tokens sees N*L rows), else what the first
    normalization layer or input saw."""
    if snap.batch_size is not None:
        return snap.batch_size
    for call in snap.norm_calls:
        if call.shape:
            return int(call.shape[0])
    for tag in snap.values:
        if tag[0] == "input" and tag[3]:
            return int(tag[3][0])
    return None


def _check_optimizer(optimizer: Any) -> None:
    """A ConfigError unless ``optimizer`` is None, a torch optimizer (what the probe hooks) or
    a non-empty list or tuple of them (optimizers that each step part of the model)."""
    items = optimizers_of(optimizer)
    if optimizer is None or (items and all(_is_optimizer(o) for o in items)):
        return
    parameters = inspect.isgenerator(optimizer) or any(isinstance(o, torch.Tensor) for o in items)
    hint = ": pass the optimizer, not the parameters" if parameters else ""
    bad = next((o for o in items if not _is_optimizer(o)), optimizer)
    raise ConfigError(f"optimizer must be a torch.optim.Optimizer or a list of them, got "
                      f"{type(bad).__name__}{hint}")


def _is_optimizer(obj: Any) -> bool:
    return hasattr(obj, "param_groups") and hasattr(obj, "register_step_pre_hook")


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype losses on ``t``'s device are summed in: float64, or float32 on MPS."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def _number(loss: Any) -> bool:
    """Whether ``loss`` is one real number: a Python or numpy scalar, or a numpy array of one
    value (``np.float32(x)``, ``np.array(x)``); not a bool."""
    if isinstance(loss, (bool, np.bool_)):
        return False
    if isinstance(loss, np.ndarray):
        return loss.size == 1 and loss.dtype.kind in "fiu"
    return isinstance(loss, numbers.Real)


def _has_stepped(optimizer: Any) -> bool:
    """Whether ``optimizer`` holds the state of steps already taken: a step count above 0, or
    any state where it keeps no count (SGD's momentum buffers). Adagrad fills its state, at a
    count of 0, when it is built."""
    for state in getattr(optimizer, "state", {}).values():
        if not state:
            continue
        count = state.get("step") if isinstance(state, dict) else None
        if count is None or float(count) > 0:
            return True
    return False


def _described(optimizer: Any) -> str:
    """``Adam (lr 1e-07)``: an optimizer's class and its first group's learning rate."""
    groups = getattr(optimizer, "param_groups", None) or [{}]
    lr = groups[0].get("lr")
    return type(optimizer).__name__ + ("" if lr is None else f" (lr {float(lr):g})")
