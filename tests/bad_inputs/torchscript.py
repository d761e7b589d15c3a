"""The model is a TorchScript module."""

import torch
from _helpers import small_batch, small_model


def build_model():
    return torch.jit.script(small_model())


def get_batch():
    return small_batch()
