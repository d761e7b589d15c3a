"""The forget gates of an ``nn.LSTM``, estimated from its weights and its input: fused inside
the module, they are never observed as outputs. A unit whose forget gate sits below
``CLOSED`` even two spreads above its mean wipes its cell state every time step."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from .trace import FORGET_GATE_CLOSED as CLOSED

# How far above its mean a unit's pre-activation is taken (spreads): at two, 98% of a normal
# pre-activation lies below.
SPREADS = 2.0
_LOGIT_CLOSED = math.log(CLOSED / (1 - CLOSED))


def lstm_input(module: nn.Module, args: tuple) -> Optional[torch.Tensor]:
    """The input tensor of an ``nn.LSTM`` call (a PackedSequence's data), else None."""
    if not isinstance(module, nn.LSTM) or not args:
        return None
    x = args[0]
    if isinstance(x, PackedSequence):
        x = x.data
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    return x


def input_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean square, per-feature mean)`` of an LSTM input (features last), on its device."""
    flat = x.detach().float().reshape(-1, x.shape[-1])
    return flat.pow(2).mean(), flat.mean(0)


def closed_forget_gates(module: nn.LSTM, moments: tuple) -> Optional[torch.Tensor]:
    """``[share of units closed, mean forget bias, mean spread]`` over every layer and
    direction of ``module`` (a device vector), or None without biases. Layer 0 sees the
    observed input (its mean square and feature means); deeper layers take the layer below's
    hidden state, as every layer's recurrent input, at a mean square of 1 (``|h| < 1``: an
    upper bound, so a spread is never underestimated)."""
    if not module.bias:
        return None
    hidden = module.hidden_size
    x_ms, x_mean = moments
    closed, biases, spreads = [], [], []
    with torch.no_grad():
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
                name = f"_l{layer}{suffix}"
                rows = slice(hidden, 2 * hidden)  # the gates' order: input, forget, cell, output
                w_ih = getattr(module, "weight_ih" + name)[rows].float()
                w_hh = getattr(module, "weight_hh" + name)[rows].float()
                bias = (getattr(module, "bias_ih" + name)[rows]
                        + getattr(module, "bias_hh" + name)[rows]).float()
                if layer == 0:
                    mean = bias + w_ih @ x_mean.to(w_ih.device)
                    input_ms = x_ms.to(w_ih.device)
                else:
                    mean, input_ms = bias, torch.ones((), device=w_ih.device)
                spread = (w_ih.pow(2).sum(1) * input_ms + w_hh.pow(2).sum(1)).sqrt()
                closed.append((mean + SPREADS * spread < _LOGIT_CLOSED).float())
                biases.append(bias)
                spreads.append(spread)
    return torch.stack([torch.cat(closed).mean(), torch.cat(biases).mean(),
                        torch.cat(spreads).mean()])

