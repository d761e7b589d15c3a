"""build_model() returns the layers as a list, not an nn.Module."""

import torch.nn as nn
from _helpers import small_batch


def build_model():
    return [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)]


def get_batch():
    return small_batch()
