"""One batch holding an outlier sample (1e30 in standardized features): the gradient
explodes that step and the weights go NaN the next; TL502, TL503 and TL504 name the batch,
not the learning rate."""

from __future__ import annotations

import torch
from trainlint.rules.gradients import OUTLIER_BATCH

import trainlint
from tests.conftest import monitored_step, small_mlp


def _run(outlier: float) -> tuple[dict, list]:
    """An MLP at SGD 0.05 for 40 steps, every step observed; sample 3 of step 25's batch is
    set to ``outlier``. Returns the findings by code and the batches fed."""
    model, opt = small_mlp()
    fed = []
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(40):
            x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
            if step == 25:
                x[3] = outlier
            fed.append(x)
            monitored_step(model, opt, monitor, x, y)
        report = monitor.report()
    assert [s["batch_range"]["input0"] for s in report.trace.per_step] == [
        (x.min().item(), x.max().item()) for x in fed]
    return {f.code: f for f in report.findings}, fed


def test_a_batch_with_an_outlier_sample_is_named_for_the_gradient_it_made() -> None:
    found, fed = _run(1e30)
    usual = sorted(x.abs().max().item() for i, x in enumerate(fed) if i != 25)
    assert 1e30 >= OUTLIER_BATCH * usual[len(usual) // 2]
    assert found["TL502"].evidence["step"] == 25
    assert found["TL502"].evidence["outlier_batch"] == "input0"
    assert "that step's batch holds values up to 1e+30 in 'input0'" in found["TL502"].message
    assert found["TL502"].fix.startswith("find and drop the bad sample of step 25")
    assert "the data's: the batch of step 25" in found["TL503"].message
    assert "overflowed after the batch of step 25" in found["TL504"].fix


def test_a_large_but_usual_sample_is_no_outlier() -> None:
    """Values 20x the usual size: the gradient grows, but no batch is blamed."""
    found, _ = _run(60.0)
    assert all("outlier_batch" not in f.evidence for f in found.values())
