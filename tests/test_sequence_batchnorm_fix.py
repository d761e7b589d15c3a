"""TL402's fix names the LayerNorm that runs where the BatchNorm1d sat: over the features of
a ``(N, T, H)`` input taken as a sequence layer made it (BatchNorm1d(T) normalized each
position), over the channels of a ``(N, C, L)`` one that was transposed for it."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

import trainlint

STEPS, HIDDEN, VOCAB = 12, 32, 50


class PerPosition(nn.Module):
    """BatchNorm1d(T) on a batch-first GRU's (N, T, H) output, as it comes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.rnn = nn.GRU(HIDDEN, HIDDEN, batch_first=True)
        self.bn = nn.BatchNorm1d(STEPS)
        self.out = nn.Linear(HIDDEN, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(ids))
        return self.out(self.bn(h)[:, -1])


class Transposed(PerPosition):
    """BatchNorm1d(H) on the GRU's output transposed to (N, H, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(ids))
        return self.out(self.bn(h.transpose(1, 2)).transpose(1, 2)[:, -1])


def _fix(model: nn.Module) -> tuple[str, int]:
    torch.manual_seed(0)
    batch = (torch.randint(0, VOCAB, (16, STEPS)), torch.randint(0, 3, (16,)))
    [found] = [f for f in trainlint.check(model, batch).findings if f.code == "TL402"]
    return found.fix, int(re.search(r"nn\.LayerNorm\((\d+)\)", found.fix).group(1))


def test_the_layernorm_of_a_positions_first_input_takes_its_features() -> None:
    torch.manual_seed(0)
    model = PerPosition()
    fix, size = _fix(model)
    assert size == HIDDEN and "positions by features" in fix
    model.bn = nn.LayerNorm(size)  # the fix, applied, runs on the same input
    assert model(torch.randint(0, VOCAB, (4, STEPS))).shape == (4, 3)


def test_the_layernorm_of_a_transposed_input_takes_its_channels() -> None:
    torch.manual_seed(0)
    fix, size = _fix(Transposed())
    assert size == HIDDEN and "(N, L, 32) tokens" in fix
