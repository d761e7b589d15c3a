"""A DataLoader's last, incomplete batch of each epoch (drop_last=False) is one BatchNorm step
in many, not a batch too small to normalize (TL401 in a Monitor run); a batch that stays small
is."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import trainlint
from trainlint.engine import RULES, load_rules

load_rules()


def _bn_batches(small_from: int, epochs: int = 4) -> tuple[list, list]:
    """A BN CNN on 16 x 64 + 6 images per epoch at batch 64, observed at every step; from step
    ``small_from`` on, batches of 4. Returns (the batch size BatchNorm saw at each step, the
    TL401 findings' (module, small steps))."""
    torch.manual_seed(0)
    x = torch.randn(16 * 64 + 6, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    seen: list = []
    own = model[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=False)
    step = 0
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(epochs):
            for xb, yb in loader:
                if step >= small_from:
                    xb, yb = xb[:4], yb[:4]
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                monitor.step(loss)
                step += 1
        report = monitor.report()
    own.remove()
    return seen, [(f.module, f.evidence["small_steps"]) for f in report.findings
                  if f.code == "TL401"]


def test_the_last_incomplete_batch_of_each_epoch_is_no_finding() -> None:
    """One step in 17 (under SMALL_SHARE of them) at a batch of 6."""
    seen, found = _bn_batches(small_from=10**9)
    assert seen.count(6) == 4 and seen.count(64) == 64
    assert found == []


def test_a_batch_that_stays_small_is_reported() -> None:
    seen, found = _bn_batches(small_from=58)
    small = sum(batch < RULES["TL401"].defaults["min_batch"] for batch in seen)
    assert small == 3 + 10  # three epochs' last batches, then steps 58-67
    assert found == [("1", small)]
