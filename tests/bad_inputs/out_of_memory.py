"""The forward runs out of memory (simulated: raises torch.OutOfMemoryError)."""

import torch
import torch.nn as nn
from _helpers import small_batch


class Hungry(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def build_model():
    return nn.Sequential(nn.Linear(8, 8), Hungry())


def get_batch():
    return small_batch()
