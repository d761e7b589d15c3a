"""A language model whose head shares the token embedding's weight (tied), the embedding at
PyTorch's N(0, 1) default: the first loss is far above ln(V). The trace names the shared
weight, TL302's fix points at it, and the direct computation agrees: the embedding at
std 0.02 brings the first loss to ln(V)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint

VOCAB, DIM = 200, 64


class TiedLm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.body = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.LayerNorm(DIM))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.tok(ids))).flatten(0, 1)


def _batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (16, 12), generator=g)
    return ids, ids.roll(-1, dims=1).flatten()


def test_a_tied_heads_fix_names_the_shared_weight() -> None:
    torch.manual_seed(0)
    model = TiedLm()
    ids, targets = _batch()
    small = copy.deepcopy(model)
    with torch.no_grad():
        nn.init.normal_(small.tok.weight, std=0.02)
        assert abs(F.cross_entropy(small(ids), targets).item() - math.log(VOCAB)) < 0.1
    report = trainlint.check(model, (ids, targets), steps=2)
    assert report.trace.modules["head"].attrs["weight_of"] == "tok.weight"
    assert "weight_of" not in report.trace.modules["tok"].attrs
    [found] = [f for f in report.findings if f.code == "TL302"]
    assert found.module == "head"
    assert "'head' shares its weight with 'tok.weight'" in found.fix
