"""What a loss is and what it depends on, read from its autograd graph after the backward.

The graph's nodes outlive the backward (only their saved tensors are freed), so a Monitor can
read them from the loss it is handed after ``loss.backward()``:

* the trainable tensors outside the model and its optimizer that the loss reaches (a GAN
  generator's loss runs through the discriminator: it measures how two networks compete, not
  whether the monitored one learns);
* the torch loss it computes (``F.cross_entropy`` leaves an ``NllLossBackward0`` over a
  ``LogSoftmaxBackward0`` of its input), its reduction, how many torch losses it adds, and
  which of the model's outputs it read: the facts ``check`` reads while the loss runs
  (:mod:`trainlint.losswatch`), for the rules on the loss (TL302, TL601).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

# Enough for the graph of a large model's step; a bigger graph is read this far.
MAX_NODES = 200_000

# Backward nodes of torch losses (names without their version digit), by loss family.
LOSS_NODES = {
    "NllLossBackward": "nll",
    "NllLoss2DBackward": "nll",
    "BinaryCrossEntropyWithLogitsBackward": "bce_with_logits",
    "MseLossBackward": "mse",
}
# The ``reduction`` a loss node saves, as its name.
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
# Nodes that only reshape, reorder, slice or cast their input on the way to the loss.
SHAPE_NODES = frozenset({
    "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "PermuteBackward",
    "TransposeBackward", "SqueezeBackward", "UnsqueezeBackward", "ExpandBackward",
    "CloneBackward", "SliceBackward", "SelectBackward", "ToCopyBackward", "AsStridedBackward",
})
_VERSION = re.compile(r"\d+$")


@dataclass(frozen=True)
class LossGraph:
    """What :func:`read_loss_graph` found. ``kind`` is None when no torch loss is in the graph
    or the model's outputs are not known; ``output_index`` is the position among the model's
    outputs of the one the loss read (None: not found)."""

    foreign: int = 0
    kind: Optional[str] = None
    reduction: Optional[str] = None
    terms: int = 0
    num_classes: Optional[int] = None
    output_index: Optional[int] = None

    @property
    def reads_output(self) -> Optional[bool]:
        """Whether the loss reads a model output as it is (None: no torch loss seen)."""
        return None if self.kind is None else self.output_index is not None


def node_name(node: Any) -> str:
    """A backward node's name without its version digit (``NllLossBackward0`` -> ...Backward)."""
    return _VERSION.sub("", node.name())


def _first_input(node: Any) -> Any:
    """The node that made ``node``'s first input (None for a leaf or a constant)."""
    inputs = node.next_functions
    return inputs[0][0] if inputs else None


def _below_shape_ops(node: Any, stops: dict) -> tuple:
    """``(node, shaped)``: the first node at or below ``node`` (through first inputs) that is
    a model output's (in ``stops``) or not a shape-only op, and whether a shape op was passed
    on the way (a model's output may itself come from a view: a 3-D Linear's)."""
    shaped = False
    while node is not None and id(node) not in stops and node_name(node) in SHAPE_NODES:
        node, shaped = _first_input(node), True
    return node, shaped


def read_loss_graph(loss: torch.Tensor, known: Iterable[torch.Tensor],
                    outputs: Optional[list] = None) -> LossGraph:
    """Read ``loss``'s autograd graph: the leaf tensors that require grad other than ``known``,
    and the torch losses in it, the first reached from the loss (operands in order) giving the
    kind. ``outputs``: ``(grad_fn, shape)`` of each of the model's outputs of the step (in
    order; None for one without a graph), which tell an ``nll_loss`` of the model's own
    log-probabilities from a ``cross_entropy`` that applied log_softmax itself."""
    root = loss.grad_fn
    if root is None:
        return LossGraph()
    ours = {id(p) for p in known}
    seen, todo, foreign, losses = {root}, deque([root]), set(), []
    while todo and len(seen) < MAX_NODES:
        node = todo.popleft()
        variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf's gradient
        if isinstance(variable, torch.Tensor) and id(variable) not in ours:
            foreign.add(id(variable))
        if node_name(node) in LOSS_NODES:
            losses.append(node)
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                todo.append(child)
    if not losses or not any(grad_fn is not None for grad_fn, _ in outputs or ()):
        return LossGraph(foreign=len(foreign), terms=len(losses))
    return _describe(losses[0], len(losses), outputs, len(foreign))


def _describe(node: Any, terms: int, outputs: list, foreign: int) -> LossGraph:
    """The facts of the loss node ``node`` (one of ``terms``) given the model's outputs."""
    index_of = {id(grad_fn): i for i, (grad_fn, _) in enumerate(outputs) if grad_fn is not None}
    kind = LOSS_NODES[node_name(node)]
    reduction = REDUCTIONS.get(getattr(node, "_saved_reduction", None))
    read, shaped = _below_shape_ops(_first_input(node), index_of)
    classes = None
    if kind == "nll" and read is not None and id(read) not in index_of and \
            node_name(read) == "LogSoftmaxBackward":
        # The loss applied log_softmax itself (cross_entropy); its input is one of the
        # model's outputs when it reads the output as it is.
        kind = "cross_entropy"
        inner, reshaped = _below_shape_ops(_first_input(read), index_of)
        shaped = shaped or reshaped
        dim = getattr(read, "_saved_dim", None)
        if inner is not None and id(inner) in index_of and not shaped and isinstance(dim, int):
            shape = outputs[index_of[id(inner)]][1]
            classes = shape[dim] if -len(shape) <= dim < len(shape) and len(shape) >= 2 else None
        read = inner
    elif kind == "nll" and read is not None and id(read) in index_of and not shaped:
        shape = outputs[index_of[id(read)]][1]
        classes = shape[1] if len(shape) >= 2 else None
    index = index_of.get(id(read)) if read is not None else None
    return LossGraph(foreign=foreign, kind=kind, reduction=reduction, terms=terms,
                     num_classes=classes, output_index=index)


def foreign_parameters(loss: torch.Tensor, known: Iterable[torch.Tensor]) -> int:
    """How many leaf tensors that require grad the loss depends on, other than ``known``."""
    return read_loss_graph(loss, known).foreign
