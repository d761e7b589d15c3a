"""What a loss depends on, read from its autograd graph: trainable tensors outside the model.

A GAN generator's loss runs through the discriminator, whose parameters are neither the
generator's nor in its optimizer: that loss measures how two networks compete, not whether
the monitored one learns. The graph's nodes outlive the backward (only their saved tensors are
freed), so it can be read after ``loss.backward()``.
"""

from __future__ import annotations

from typing import Iterable

import torch

# Enough for the graph of a large model's step; a bigger graph is read this far.
MAX_NODES = 200_000


def foreign_parameters(loss: torch.Tensor, known: Iterable[torch.Tensor]) -> int:
    """How many leaf tensors that require grad the loss depends on, other than ``known``."""
    root = loss.grad_fn
    if root is None:
        return 0
    ours = {id(p) for p in known}
    seen, todo, foreign = {root}, [root], set()
    while todo and len(seen) < MAX_NODES:
        node = todo.pop()
        variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf's gradient
        if isinstance(variable, torch.Tensor) and id(variable) not in ours:
            foreign.add(id(variable))
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                todo.append(child)
    return len(foreign)
