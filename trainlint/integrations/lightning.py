"""``TrainlintCallback`` for Lightning: ``trainlint.Monitor`` inside ``Trainer.fit``.

    from trainlint.integrations.lightning import TrainlintCallback
    trainer = lightning.Trainer(callbacks=[TrainlintCallback(every=100, fail_on="error")])
"""

from __future__ import annotations

from typing import Any, Optional

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer

import torch
import torch.nn as nn

from ..engine import Selection
from ..errors import ConfigError
from ..monitor import Monitor, RunFailed
from ..report import Report


class TrainlintCallback(Callback):
    """Observe every ``every``-th optimizer step; report at the end of ``fit``.

    Without gradient accumulation an optimizer step is a training batch. With
    ``accumulate_grad_batches`` an observed step covers the batches of its accumulation window,
    up to the one whose optimizer step ends it (the gradients read are the accumulated ones).

    Per-layer summary scalars go to the trainer's loggers after each observed step (rank 0
    only). With ``fail_on`` (``"error"``, ``"warning"`` or ``"info"``) the run stops with
    ``trainlint.monitor.RunFailed`` at the first observed step whose findings reach it.
    ``module`` names the submodule of the LightningModule to observe (default: the
    LightningModule itself, whose ``forward`` must then be what ``training_step`` calls for
    functional activations and data flow to be seen). The last report is ``self.report``.
    """

    def __init__(self, every: int = 100, fail_on: Optional[str] = None, *,
                 module: Optional[str] = None, selection: Optional[Selection] = None,
                 log: bool = True, verbose: bool = True) -> None:
        super().__init__()
        self.every = every
        self.fail_on = fail_on
        self.module = module
        self.selection = selection
        self.log = log
        self.verbose = verbose
        self.monitor: Optional[Monitor] = None
        self.report: Optional[Report] = None
        self._backwards = 0  # the backward passes of the current batch

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model: nn.Module = pl_module
        if self.module:
            try:
                model = pl_module.get_submodule(self.module)
            except AttributeError as err:
                names = [n for n, _ in pl_module.named_children()]
                raise ConfigError(f"TrainlintCallback(module={self.module!r}): the "
                                  f"LightningModule has no such submodule ({err}); its "
                                  f"children: {names}") from None
        optimizer = _optimizers_of(model, trainer.optimizers)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.monitor = Monitor(model, optimizer, every=self.every, selection=self.selection,
                               log_to=trainer.loggers if self.log else None, scaler=scaler,
                               fail_on=self.fail_on)
        self.monitor.loss_hint = ("training_step returned no loss: return it (or "
                                  "{'loss': loss}) to have it watched")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._backwards = 0
        if self.monitor is not None:
            # Logged at the optimizer step the run's own metrics of this batch use (batches
            # and steps differ under gradient accumulation).
            self.monitor.log_step = trainer.global_step
            # Opens an observation when due: the step count moves at a window's end only, so
            # that is at a window's first batch.
            self.monitor.start_step()

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule,
                           loss: Any) -> None:
        # The loss with its autograd graph (on_train_batch_end gets a detached copy): what
        # it computes (TL601, TL302) is read off the graph.
        self._backwards += 1
        if self.monitor is not None and self.monitor.observing:
            self.monitor.read_loss(loss)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.monitor is not None:
            if (self._backwards > 1 and len(trainer.optimizers) > 1
                    and not pl_module.automatic_optimization):
                # Manual optimization with a backward per optimizer (a GAN's discriminator,
                # then its generator): the loss returned is one of losses that compete.
                self.monitor.alternating = True
            loss = _as_computed(trainer, pl_module,
                                outputs.get("loss") if isinstance(outputs, dict) else outputs)
            if _steps_optimizer(trainer, pl_module, batch_idx):
                self.monitor.step(loss)
            else:  # a batch inside an accumulation window: its loss counts, the step goes on
                self.monitor._accumulate(loss)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is None:
            return
        self.report = self.monitor.report()
        self._close()
        if self.verbose and trainer.is_global_zero:
            print(self.report)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, RunFailed):
            self.report = exception.report
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def _as_computed(trainer: Trainer, pl_module: LightningModule, loss: Any) -> Any:
    """The loss ``training_step`` returned: under automatic optimization with gradient
    accumulation Lightning hands back its value divided by ``accumulate_grad_batches`` (the
    part of the accumulated gradient), which would read as a first loss N times too small."""
    n = getattr(trainer, "accumulate_grad_batches", 1)
    if isinstance(loss, torch.Tensor) and n > 1 and pl_module.automatic_optimization:
        return loss * n
    return loss


def _steps_optimizer(trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> bool:
    """Whether the optimizer steps at the end of this batch: always under manual optimization,
    else at the end of each window of ``accumulate_grad_batches`` batches and at an epoch's
    last batch (as Lightning decides it, at the batch's start or after)."""
    n = getattr(trainer, "accumulate_grad_batches", 1)
    if n <= 1 or not pl_module.automatic_optimization:
        return True
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    if callable(should_accumulate):
        return not should_accumulate()
    return (batch_idx + 1) % n == 0 or batch_idx + 1 >= trainer.num_training_batches


def _optimizers_of(model: nn.Module, optimizers: list) -> Any:
    """What the Monitor hooks: the trainer's one optimizer; of several (a GAN's, SparseAdam +
    Adam), those that step only ``model``'s parameters (a GAN's discriminator optimizer is not
    the watched generator's: its parameters stay outside, as the generator's loss needs)."""
    if len(optimizers) <= 1:
        return optimizers[0] if optimizers else None
    mine = {id(p) for p in model.parameters()}
    steps_mine = [o for o in optimizers
                  if all(id(p) in mine for group in o.param_groups for p in group["params"])]
    return steps_mine or None
