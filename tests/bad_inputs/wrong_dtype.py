"""get_batch() returns integer inputs for a Linear model."""

import torch
from _helpers import small_model


def build_model():
    return small_model()


def get_batch():
    return torch.randint(0, 5, (8, 8)), torch.randint(0, 4, (8,))
