"""Raises while being imported: a helper of the user's fails at module level."""

import torch.nn as nn


def load_settings():
    return {"width": 8}["depth"]


SETTINGS = load_settings()
model = nn.Linear(8, 4)
