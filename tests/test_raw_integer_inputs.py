"""Integer inputs that are measurements (uint8 pixel bytes cast with ``.float()`` in forward)
are judged by TL201/TL202 like float ones; token ids into an embedding are not."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint


class BytesNet(nn.Module):
    def __init__(self, scaled: bool) -> None:
        super().__init__()
        self.scaled = scaled
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if self.scaled else x.float()
        h = torch.relu(self.conv(x))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("scaled, fires", [(False, True), (True, False)])
def test_uint8_pixels_cast_in_forward_are_judged(scaled: bool, fires: bool) -> None:
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    report = trainlint.check(BytesNet(scaled), (pixels, torch.randint(0, 4, (16,))), steps=1)
    found = [f for f in report.findings if f.code == "TL201"]
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["max_abs_mean"] == pytest.approx(
            pixels.double().mean((0, 2, 3)).abs().max().item())


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids.long()).mean(1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.uint8])
def test_token_ids_into_an_embedding_are_not_input_features(dtype: torch.dtype) -> None:
    """Every sequence starts with the same [CLS] id: position 0 is constant, as it should be."""
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (16, 12))
    ids[:, 0] = 2
    report = trainlint.check(Tokens(), (ids.to(dtype), torch.randint(0, 4, (16,))), steps=1)
    assert not {"TL201", "TL202"} & {f.code for f in report.findings}
