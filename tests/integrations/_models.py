"""Small models with a seeded fault, shared by the integration tests."""

from __future__ import annotations

import torch
import torch.nn as nn

WIDTH = 32
DEAD_BIAS = -10.0


def dead_relu_net(inputs: int = 8, classes: int = 4) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear whose second ReLU ("3") is dead: the Linear feeding it
    has bias -10, far below anything its inputs reach, so every unit outputs 0."""
    net = nn.Sequential(nn.Linear(inputs, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                        nn.Linear(WIDTH, classes))
    nn.init.kaiming_normal_(net[0].weight, nonlinearity="relu")
    nn.init.zeros_(net[0].bias)
    nn.init.normal_(net[2].weight, std=0.01)
    with torch.no_grad():
        net[2].bias.fill_(DEAD_BIAS)
    return net
