"""TL101 where no layer feeds the dead units. A ReLU applied to the batch itself (meant to
clip negatives) on features that are all negative: every unit dead from the start; the units
are the input's, so the fix is the data, not an init of a layer that does not exist (measured:
LeakyReLU, the old fix, left the loss at 1.54 against 0.03 with standardized inputs). And a
module's own bias Parameter that keeps its functional ReLU's input below 0."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class ClipsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.relu(x))


def test_dead_units_of_a_relu_on_the_input_point_at_the_input() -> None:
    torch.manual_seed(0)
    x = -5 + 0.7 * torch.randn(64, 40)  # log-power features: all negative
    report = trainlint.check(ClipsInput(), (x.clamp(max=-1), torch.randint(0, 5, (64,))))
    [found] = [f for f in report.findings if f.code == "TL101"]
    assert found.module == "" and found.evidence["input"] == "input0"
    assert "standardize the inputs" in found.fix and "kaiming" not in found.fix


class GraphConv(nn.Module):
    """Message passing with its own bias Parameter added before a functional ReLU (the
    Linears have none), the bias started at -4."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 64, bias=False)
        self.self_lin = nn.Linear(16, 64, bias=False)
        self.bias = nn.Parameter(torch.full((64,), start))

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        src, dst = edges
        agg = torch.zeros(len(x), 64).index_add_(0, dst, self.lin(x)[src])
        return F.relu(agg / 4 + self.self_lin(x) + self.bias)


class Gnn(nn.Module):
    def __init__(self, start: float) -> None:
        super().__init__()
        self.conv = GraphConv(start)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x, edges))


def test_dead_units_behind_a_modules_own_bias_name_that_bias() -> None:
    """Measured on such a GNN: Kaiming on the Linears (the old fix) left accuracy at 0.27;
    the bias at 0 reached 1.0."""
    torch.manual_seed(0)
    x, edges = torch.randn(100, 16), torch.randint(0, 100, (2, 400))
    batch = ((x, edges), torch.randint(0, 4, (100,)))
    [found] = [f for f in trainlint.check(Gnn(-4.0), batch).findings if f.code == "TL101"]
    assert found.module == "conv" and found.evidence["own_bias"] == "conv.bias"
    assert "'conv.bias', a bias that 'conv' holds itself" in found.fix
    assert "initialize it at 0" in found.fix
    assert not [f for f in trainlint.check(Gnn(0.0), batch).findings if f.code == "TL101"]
