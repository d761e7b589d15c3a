"""A long Monitor run keeps every observed step's losses, but the per-layer values and
per-parameter series of a bounded number of observed steps (memory stays bounded)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint import assemble
from trainlint.assemble import kept_positions
from trainlint.reports import FORMATS, renderer


def test_thinning_keeps_the_first_the_latest_and_every_other_between() -> None:
    history, first = assemble.HISTORY, assemble.KEEP_FIRST
    assert kept_positions(history) == list(range(history))
    n = history + 1
    kept = kept_positions(n)
    recent = n - history // 2
    assert kept[:first] == list(range(first))
    assert kept[-(history // 2):] == list(range(recent, n))
    assert kept[first:-(history // 2)] == list(range(first, recent, 2))
    assert len(kept) < history and kept == sorted(set(kept))


def test_a_long_monitor_run_keeps_its_losses_and_a_bounded_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    history, first = 40, 8
    monkeypatch.setattr(assemble, "HISTORY", history)
    monkeypatch.setattr(assemble, "KEEP_FIRST", first)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    losses = []
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(130):
            if step == 100:  # knock the hidden units out late in the run
                with torch.no_grad():
                    model[0].bias.fill_(-100.0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
            losses.append(loss.item())
        report = monitor.report()
    trace = report.trace
    assert [s["loss"] for s in trace.per_step] == pytest.approx(losses)
    detailed = [s["step"] for s in trace.per_step if "layers" in s]
    assert len(detailed) <= history
    assert detailed[:first] == list(range(first))
    assert detailed[-(history // 2):] == list(range(130 - history // 2, 130))
    for key in ("param_grad_norms", "input_scale", "batch_range"):  # kept with "layers" only
        assert [s["step"] for s in trace.per_step if key in s] == detailed
    assert all(len(p.norms_before) <= history and len(p.update_ratios) <= history
               for p in trace.params)
    assert all(s["grad_norm"] is not None for s in trace.per_step)
    assert "TL101" in {f.code for f in report.findings}  # the late knock-out is still seen
    for name in FORMATS:  # steps without per-layer values render (the html loss/std panels)
        assert renderer(name)(report)
