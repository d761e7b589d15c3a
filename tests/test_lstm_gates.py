"""An nn.LSTM's forget gates are fused inside it: trainlint estimates them from its weights and
its input. The estimate is checked against the gates computed directly, time step by time step,
from the same weights, inputs and hidden states; a forget bias of -5 (the cell wiped at every
step: a first-token memory task stays at ln 4, where a bias of 1 reaches 0.007, measured) is
TL102, the default init is not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint
from trainlint import gates
from trainlint.engine import RULES
from trainlint.trace import RunTrace

H = 32


def _lstm(closed_units: int) -> nn.LSTM:
    torch.manual_seed(0)
    rnn = nn.LSTM(16, H, batch_first=True)
    with torch.no_grad():
        rnn.bias_ih_l0[H:H + closed_units] = -5.0
        rnn.bias_hh_l0[H:H + closed_units] = 0.0
    return rnn


def _true_closed_share(rnn: nn.LSTM, x: torch.Tensor) -> float:
    """The share of units whose forget gate is below ``gates.CLOSED`` at 98% or more of the
    (sample, time) positions, from the gates computed step by step."""
    with torch.no_grad():
        out, _ = rnn(x)
        h_prev = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        rows = slice(H, 2 * H)
        pre = (x @ rnn.weight_ih_l0[rows].T + rnn.bias_ih_l0[rows]
               + h_prev @ rnn.weight_hh_l0[rows].T + rnn.bias_hh_l0[rows])
        below = (torch.sigmoid(pre) < gates.CLOSED).float().reshape(-1, H).mean(0)
    return (below >= 0.98).float().mean().item()


@pytest.mark.parametrize("closed_units", [0, H // 2, H])
def test_the_estimate_agrees_with_the_gates_computed_directly(closed_units: int) -> None:
    rnn = _lstm(closed_units)
    x = torch.randn(32, 8, 16, generator=torch.Generator().manual_seed(1))
    share = gates.closed_forget_gates(rnn, gates.input_moments(x))[0].item()
    assert share == pytest.approx(closed_units / H)
    assert _true_closed_share(rnn, x) == pytest.approx(share)


class Memory(nn.Module):
    def __init__(self, forget_bias: float | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 16)
        self.rnn = nn.LSTM(16, H, batch_first=True)
        self.head = nn.Linear(H, 4)
        if forget_bias is not None:
            with torch.no_grad():
                self.rnn.bias_ih_l0[H:2 * H] = forget_bias
                self.rnn.bias_hh_l0[H:2 * H] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(self.emb(x))
        return self.head(h[-1])


@pytest.mark.parametrize("forget_bias, fires", [(-5.0, True), (None, False), (1.0, False)])
def test_closed_forget_gates_are_tl102_in_a_check(forget_bias: float | None,
                                                  fires: bool) -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (32,), generator=g)
    x = torch.randint(4, 10, (32, 8), generator=g)
    x[:, 0] = y  # the label is the first token
    report = trainlint.check(Memory(forget_bias), (x, y))
    found = [f for f in report.findings if f.code == "TL102"]
    assert bool(found) is fires
    if fires:
        assert found[0].module == "rnn" and found[0].evidence["closed_fraction"] == 1.0
        assert "bias_ih[H:2H] = 1" in found[0].fix


@pytest.mark.parametrize("share, fires", [(0.99, False), (1.01, True)])
def test_tl102_closed_forget_gates_at_the_threshold(share: float, fires: bool) -> None:
    limit = RULES["TL102"].defaults["saturated_fraction"]
    trace = RunTrace(forget_gates={"rnn": (limit * share, -5.0, 0.6)})
    selection = trainlint.engine.Selection(select={"TL102"})
    findings, _ = trainlint.engine.run_rules(trace, selection)
    assert bool(findings) is fires
