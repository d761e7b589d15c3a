"""``trainlint.Monitor``: the probe inside a live training loop, observing every N-th step."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .assemble import TraceBuilder
from .engine import Selection
from .errors import ConfigError
from .probe import Probe, _model_device
from .report import Report, build_report


class Monitor:
    """Observe every ``every``-th training step of ``model``; ``report()`` lints what was seen.

    Call ``step(loss)`` once per training step, after ``optimizer.step()``. Between
    observations the hooks return at once; an observed step costs one host sync.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 every: int = 100, *, selection: Optional[Selection] = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a whole number >= 1, got {every!r}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Monitor needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.selection = selection or Selection()
        self.steps_seen = 0
        self.batch_size: Optional[int] = None
        self.probe = Probe(model, optimizer).attach()
        self.builder = TraceBuilder(model, mode="monitor")
        self.probe.begin_step()

    @property
    def observing(self) -> bool:
        """Whether the current training step is being observed."""
        return self.probe.observing

    def step(self, loss: Any = None) -> None:
        """Mark the end of one training step (after ``optimizer.step()``)."""
        if not self.probe.attached:
            raise ConfigError("this Monitor is closed")
        if self.probe.observing:
            extra = {}
            if isinstance(loss, torch.Tensor):
                extra["loss"] = loss.detach().float().reshape(-1)[:1]
            elif isinstance(loss, (int, float)):
                extra["loss"] = torch.tensor([float(loss)], device=_model_device(self.model))
            self._note_batch()
            self.builder.add(self.probe.collect(extra=extra), self.steps_seen)
            self.probe.end_step()
        self.steps_seen += 1
        if self.steps_seen % self.every == 0:
            self.probe.begin_step()

    def _note_batch(self) -> None:
        for call in self.probe.norm_calls:
            if call.shape:
                self.batch_size = call.shape[0]
                return
        for _name, shape, *_ in self.probe.input_rows:
            if shape:
                self.batch_size = shape[0]
                return

    def report(self) -> Report:
        """Findings over the observed steps so far."""
        trace = self.builder.build(steps=self.steps_seen, batch_size=self.batch_size,
                                   device=str(_model_device(self.model)))
        return build_report(trace, self.selection)

    def close(self) -> None:
        """Detach every hook (idempotent)."""
        self.probe.detach()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
