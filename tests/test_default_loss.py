"""The loss ``trainlint check`` picks when model.py gives none (SPEC: cross-entropy for
integer targets and (N, C) outputs): over log-probabilities it is NLLLoss, so that the check
does not report its own choice as a double softmax (TL601)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class LogProbs(nn.Module):
    """pytorch/examples' MNIST net ends in log_softmax and trains with F.nll_loss."""

    def __init__(self, per_position: bool) -> None:
        super().__init__()
        self.per_position = per_position
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.log_softmax(self.net(x), dim=-1)
        return out.transpose(1, 2) if self.per_position else out


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> trainlint.Report:
    torch.manual_seed(0)
    return trainlint.check(model, (x, y), steps=3)


@pytest.mark.parametrize("per_position", [False, True])
def test_log_probabilities_get_nll_by_default(per_position: bool) -> None:
    """Measured: NLLLoss and cross-entropy on the log-probabilities train the same (loss
    2.34 -> 0.014); with cross-entropy picked, the check said TL601 error and exited 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 7, 16, generator=g) if per_position else torch.randn(32, 16, generator=g)
    y = torch.randint(0, 5, (32, 7) if per_position else (32,), generator=g)
    report = _check(LogProbs(per_position), x, y)
    assert "TL601" not in [f.code for f in report.findings]
    assert any(n.startswith("default loss: negative log-likelihood") for n in report.notes)
    assert report.trace.loss_kind == "nll"


def test_softmax_and_logits_keep_cross_entropy() -> None:
    """Probabilities into the default cross-entropy stay TL601's (SPEC's default loss)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 5, (32,), generator=g)
    logits = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    report = _check(logits, x, y)
    assert "default loss: cross-entropy" in report.notes
    assert "TL601" not in [f.code for f in report.findings]
    report = _check(nn.Sequential(logits, nn.Softmax(dim=1)), x, y)
    assert "TL601" in [f.code for f in report.findings]
