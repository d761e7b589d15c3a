"""``TrainlintCallback`` for transformers: ``trainlint.Monitor`` inside ``Trainer.train``.

    from trainlint.integrations.transformers import TrainlintCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TrainlintCallback(every=100)])
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..engine import Selection
from ..monitor import Monitor, RunFailed
from ..report import Report


class TrainlintCallback(TrainerCallback):
    """Observe every ``every``-th optimizer step; report at the end of training.

    The loss is the model's own ``.loss`` (what ``Trainer`` trains on by default; a sum over
    ``num_items_in_batch`` is recorded as the batch's per-item mean). ``Trainer`` shows
    callbacks no loss it computes itself (``label_smoothing_factor``, ``compute_loss_func``,
    an overridden ``compute_loss``): the loss rules then say so and are skipped. With
    ``log_to`` (a ``SummaryWriter``, a callable ``(scalars, step)``...) per-layer scalars are
    written after each observed step (rank 0 only). With ``fail_on`` (``"error"``,
    ``"warning"`` or ``"info"``) training stops with ``trainlint.monitor.RunFailed`` at the
    first observed step whose findings reach it. The last report is ``self.report``.
    """

    def __init__(self, every: int = 100, fail_on: Optional[str] = None, *,
                 log_to: Any = None, selection: Optional[Selection] = None,
                 verbose: bool = True) -> None:
        self.every = every
        self.fail_on = fail_on
        self.log_to = log_to
        self.selection = selection
        self.verbose = verbose
        self.monitor: Optional[Monitor] = None
        self.report: Optional[Report] = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self.close()  # a train() that raised left its monitor (Trainer has no exception event)
        # accelerate wraps the optimizer (and holds the GradScaler); hook the real one.
        inner = getattr(optimizer, "optimizer", optimizer)
        self.monitor = Monitor(model, inner, every=self.every, selection=self.selection,
                               log_to=self.log_to, scaler=getattr(optimizer, "scaler", None),
                               fail_on=self.fail_on)
        self.monitor.loss_hint = _loss_hint(args)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.start_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState,
                          control: TrainerControl, **kwargs: Any) -> None:
        # Before Trainer zeroes the gradients: the step's gradients are still there.
        if self.monitor is None:
            return
        try:
            self.monitor.step()
        except RunFailed as failed:
            self.report = failed.report
            self.close()
            raise

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        self.report = self.monitor.report()
        main = self.monitor.is_main
        self.close()
        if self.verbose and main:
            print(self.report)

    def close(self) -> None:
        """Take the hooks off the model (idempotent). ``Trainer`` tells callbacks nothing when
        ``train()`` raises: call this in a ``finally`` around it to leave the model clean at
        once (the next ``train()`` with this callback does it too)."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def _loss_hint(args: TrainingArguments) -> str:
    """What the report says when the model returned no ``.loss`` on the observed steps."""
    smoothing = getattr(args, "label_smoothing_factor", 0) or 0
    by = (f"Trainer computes the loss itself (label_smoothing_factor={smoothing:g}) and"
          if smoothing else "Trainer computes the loss outside the model (compute_loss_func "
          "or an overridden compute_loss) and")
    return (f"the model returned no .loss: {by} shows callbacks no loss; to have the loss "
            "watched, let the model compute it (labels in the batch, no label_smoothing_factor "
            "or compute_loss_func), or train in a loop of your own with "
            "trainlint.Monitor and monitor.step(loss)")
