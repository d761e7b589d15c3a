"""get_batch() returns what a DataLoader yields for (x, y) samples: a list [x, y]."""

import torch
from _helpers import small_model
from torch.utils.data import DataLoader, TensorDataset


def build_model():
    return small_model()


def get_batch():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    return next(iter(DataLoader(data, batch_size=32)))
