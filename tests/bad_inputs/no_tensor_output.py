"""The forward returns a dict of Python floats, no tensor."""

import torch.nn as nn
from _helpers import small_batch


class Scorer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return {"score": self.linear(x).detach().mean().item()}


def build_model():
    return Scorer()


def get_batch():
    return small_batch()
