"""The model is wrapped by torch.compile (the original module is probed eagerly)."""

import torch
from _helpers import small_batch, small_model


def build_model():
    return torch.compile(small_model())


def get_batch():
    return small_batch()
