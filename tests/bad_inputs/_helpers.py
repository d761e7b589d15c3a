"""Shared by the bad-input model files: a small valid model and batch."""

import torch
import torch.nn as nn


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def small_batch(batch_size: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 8, generator=g), torch.randint(0, 4, (batch_size,), generator=g)
