"""What a loss is and what it depends on, read from its autograd graph.

The graph's nodes outlive the backward (only their saved tensors are freed), so a Monitor can
read them from the loss it is handed after ``loss.backward()``:

* the Parameters outside the model and its optimizer that the loss reaches (a GAN
  generator's loss runs through the discriminator: it measures how two networks compete, not
  whether the monitored one learns);
* the torch loss it computes (``F.cross_entropy`` leaves an ``NllLossBackward0`` over a
  ``LogSoftmaxBackward0`` of its input), its reduction, the number of classes it reads, how
  many terms the loss adds (torch losses, and other terms computed from the model's outputs,
  such as a distillation KL), and which of the model's outputs it reads: the facts ``check``
  also reads while the loss runs (:mod:`trainlint.losswatch`), for TL302 and TL601.

A sum over items divided by their count is a mean (transformers' models compute
``cross_entropy(reduction="sum") / num_items_in_batch`` under ``Trainer``): telling a count
from another divisor (a temperature) takes the saved values, which the backward frees, so it
is seen only in a loss read before its backward.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from .losswatch import loss_items
from .trace import CLASSIFICATION_LOSSES

# Enough for the graph of a large model's step; a bigger graph is read this far.
MAX_NODES = 200_000
# Training forwards of one step whose outputs are kept (SAM and R-Drop run two).
MAX_FORWARDS = 8

# Backward nodes of torch losses (names without their version digit), by loss family.
LOSS_NODES = {
    "NllLossBackward": "nll",
    "NllLoss2DBackward": "nll",
    "BinaryCrossEntropyWithLogitsBackward": "bce_with_logits",
    "MseLossBackward": "mse",
}
# The ``reduction`` a loss node saves, as its name.
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
# Nodes that only reshape, reorder or slice their input.
SHAPE_NODES = frozenset({
    "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "PermuteBackward",
    "TransposeBackward", "SqueezeBackward", "UnsqueezeBackward", "ExpandBackward",
    "SliceBackward", "SelectBackward", "AsStridedBackward",
    # Rows picked by an index or a mask (``out[train_idx]``, ``out[mask]``): a node
    # classifier's or a token classifier's loss on the labelled rows only.
    "IndexBackward", "IndexSelectBackward",
})
# Nodes that keep what the values are (probabilities stay probabilities): casts, clamps.
KEEP_NODES = frozenset({"ToCopyBackward", "CloneBackward", "ClampBackward", "ClampMinBackward",
                        "ClampMaxBackward"})
# Nodes that combine the loss's terms: sums, differences, weights, averages.
COMBINING_NODES = frozenset({"AddBackward", "SubBackward", "MulBackward", "DivBackward",
                             "NegBackward", "MeanBackward", "SumBackward"})
# Nodes between a loss of reduction "none" and its average that keep it a per-sample mean
# (a constant factor: MulBackward1/DivBackward1 take a Python number).
_SCALED = frozenset({"MulBackward1", "DivBackward1"})
# The combining nodes that add terms up or scale one (no average, no division): what a
# summed loss combines its sums with.
_SUMMING = COMBINING_NODES - {"DivBackward", "MeanBackward", "SumBackward"}
_VERSION = re.compile(r"\d+$")


@dataclass(frozen=True)
class LossGraph:
    """What :func:`read_loss_graph` found. ``kind`` is None when no torch loss is in the graph
    or the model's outputs are not known; ``output_index`` is the position of the output the
    loss read among its forward's ``output_count`` outputs (None: not found)."""

    # The ids of the Parameters the loss depends on beyond the ones given
    # (another network: a GAN generator's loss runs through its discriminator).
    foreign_ids: frozenset = frozenset()
    # Their shapes, sorted (a copy of the model has the model's).
    foreign_shapes: tuple = ()
    kind: Optional[str] = None
    reduction: Optional[str] = None
    terms: int = 0
    num_classes: Optional[int] = None
    output_index: Optional[int] = None
    output_count: int = 0
    # The loss itself is a torch loss's sum divided by something (its first loss's sum: a
    # count of its items when the reduction reads "mean", see ``counted``).
    sum_over: bool = False
    # The loss adds up its items' terms over the batch, with no average (see
    # :func:`summed_over_items`).
    summed: bool = False
    # Whether the divisor of the first loss's sum is a count of its items, when that needs
    # values held in tensors (a 0-d bool tensor on their device; reading it would sync): the
    # reduction stays as if it were not until :meth:`resolve` is handed its host value.
    count_check: Optional[torch.Tensor] = None
    # "softmax"/"sigmoid" when the loss function applies it to a model output before a torch
    # loss that applies its own (cross_entropy(out.softmax(-1), y)): TL601's bug, made in the
    # loss function rather than in the model.
    squash: Optional[str] = None
    # The classifier's loss weighs its terms by more than a mean does (BCE's pos_weight or
    # weight): an uninformed classifier's loss is then not ln(2).
    weighted: bool = False
    # The classifier's loss reads values the loss function computed from a model output (not
    # the output as it is): ArcFace's s * cos(theta + m) of an embedding the model outputs.
    transforms_output: bool = False
    # How many items (samples times positions) the classifier's loss averages (None: unknown).
    items: Optional[int] = None
    # The cross-entropy was read from a sum of constants times a log_softmax: probability
    # targets (mixup, soft labels), or a policy gradient's one-hot weights times its returns;
    # the graph does not tell which, so its level is not judged against ln(C).
    soft_targets: bool = False
    # The ops that can make NaN/Inf (``RISKY_OPS`` names: "exp", "log") that the loss function
    # ran between the model's outputs and the loss, sorted (``RunTrace.loss_ops``).
    ops: tuple = ()

    @property
    def reads_output(self) -> Optional[bool]:
        """Whether the loss reads a model output as it is (None: no torch loss seen)."""
        return None if self.kind is None else self.output_index is not None

    @property
    def counted(self) -> bool:
        """Whether the loss itself is a torch loss's sum divided by a count of at least as many
        items: :func:`item_mean` gives its per-item mean (a count over a whole accumulated
        batch makes its value a fraction of it)."""
        return self.sum_over and self.reduction == "mean"

    @property
    def foreign(self) -> int:
        """How many trainable tensors beyond the parameters given the loss depends on."""
        return len(self.foreign_ids)

    def resolve(self, is_count: bool) -> LossGraph:
        """This graph once the pending ``count_check`` reads ``is_count`` on the host."""
        if self.count_check is None:
            return self
        return replace(self, count_check=None,
                       reduction="mean" if is_count else self.reduction)


def output_nodes(outputs: list) -> list:
    """``(grad_fn, shape)`` of each of a forward's output tensors: what
    :func:`read_loss_graph` matches the loss's graph against."""
    with torch._C.DisableTorchFunction():  # inside the probe's mode: no dispatch of our own
        return [(t.grad_fn, tuple(t.shape)) for t in outputs]


def node_name(node: Any) -> str:
    """A backward node's name without its version digit (``NllLossBackward0`` -> ...Backward)."""
    return _VERSION.sub("", node.name())


def _first_input(node: Any) -> Any:
    """The node that made ``node``'s first input (None for a leaf or a constant)."""
    inputs = node.next_functions
    return inputs[0][0] if inputs else None


def _input_shape(node: Any) -> Optional[tuple]:
    """The shape of ``node``'s first input in the forward, from the metadata of the node that
    made it (None where this torch does not say)."""
    if not node.next_functions or node.next_functions[0][0] is None:
        return None
    child, index = node.next_functions[0]
    try:
        return tuple(child._input_metadata[index].shape)
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None


def _passes_values(node: Any) -> bool:
    """Whether ``node`` only reshapes or casts or clamps what it is given."""
    name = node_name(node)
    return name in SHAPE_NODES or name in KEEP_NODES


# Squashing nodes and the losses that squash what they read themselves: softmax into
# cross_entropy or into nll_loss (which wants log-probabilities), sigmoid into BCE with logits.
SQUASHED_BY = {"SoftmaxBackward": ("cross_entropy", "nll"),
               "SigmoidBackward": ("bce_with_logits",)}


def _through(node: Any, stops: Optional[dict] = None, path: Optional[set] = None) -> Any:
    """The first node at or below ``node`` (through first inputs) that is a model output's
    (in ``stops``: a model's output may itself come from a view, a 3-D Linear's) or neither a
    shape op nor a cast or clamp. The nodes passed go into ``path``."""
    while node is not None and id(node) not in (stops or ()) and _passes_values(node):
        if path is not None:
            path.add(node)
        node = _first_input(node)
    return node


def made_by(t: torch.Tensor) -> Optional[str]:
    """The name of the autograd node that made ``t``'s values, through reshapes, casts and
    clamps (``"LogSoftmaxBackward"`` for a model ending in log_softmax); None for a leaf."""
    node = _through(t.grad_fn)
    return None if node is None else node_name(node)


def _walk(roots: list, parent: Optional[dict] = None,
          stops: Iterable[int] = ()) -> Iterator[Any]:
    """The autograd nodes reachable from ``roots``, breadth first, at most ``MAX_NODES``, not
    through nor at those whose ids are in ``stops``; ``parent``, where given, gets each node's
    first parent."""
    seen, todo = set(roots), deque(roots)
    while todo and len(seen) < MAX_NODES:
        node = todo.popleft()
        if id(node) in stops:
            continue
        yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                if parent is not None:
                    parent[child] = node
                todo.append(child)


def _outside_parameter(node: Any, ours: set) -> Optional[torch.nn.Parameter]:
    """The Parameter, not one of ``ours`` (ids), whose gradient ``node`` accumulates, else None.
    Another network's weights are Parameters; a leaf the forward makes each step
    (transformers' MRA: ``zeros_like(q).requires_grad_()``) is no network."""
    variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf's gradient
    if isinstance(variable, torch.nn.Parameter) and id(variable) not in ours:
        return variable
    return None


def foreign_parameters(tensors: Iterable, known: Iterable) -> list:
    """The Parameters other than ``known`` whose gradient the autograd graphs of ``tensors``
    reach."""
    roots = [t.grad_fn for t in tensors if getattr(t, "grad_fn", None) is not None]
    ours = {id(p) for p in known}
    return [p for p in (_outside_parameter(node, ours) for node in _walk(roots))
            if p is not None]


def read_loss_graph(loss: torch.Tensor, known: Iterable[torch.Tensor],
                    forwards: Optional[list] = None) -> LossGraph:
    """Read ``loss``'s autograd graph: the leaf tensors that require grad other than
    ``known``, and the torch losses in it (the kind is the first classifier's reached from
    the loss, operands in order, else the first loss's). ``forwards``: per training forward of
    the step, ``(grad_fn, shape)`` of each of the model's outputs (grad_fn None for one
    without a graph); they tell an ``nll_loss`` of the model's own log-probabilities from a
    ``cross_entropy`` that applied log_softmax itself, and which output the loss read."""
    root = loss.grad_fn
    if root is None:
        return LossGraph()
    summed = summed_over_items(root)
    ours = {id(p) for p in known}
    foreign, losses = set(), []
    shapes: dict = {}
    parent: dict = {}
    for node in _walk([root], parent):
        variable = _outside_parameter(node, ours)
        if variable is not None:
            foreign.add(id(variable))
            shapes[id(variable)] = tuple(variable.shape)
        if node_name(node) in LOSS_NODES or _soft_cross_entropy(node, parent) is not None:
            losses.append(node)
    where = {id(grad_fn): (i, j, shape) for i, outputs in enumerate(forwards or ())
             for j, (grad_fn, shape) in enumerate(outputs) if grad_fn is not None}
    foreign_shapes = tuple(sorted(shapes.values()))
    ops = _loss_ops(root, where)
    if not losses or not where:
        return LossGraph(foreign_ids=frozenset(foreign), foreign_shapes=foreign_shapes,
                         terms=len(losses), summed=summed, ops=ops)
    described = [_describe(node, where, parent) for node in losses]
    # Of several torch losses, a classifier's gives the kind (TL601 and TL302 judge it).
    first = next((d for d in described if d["kind"] in CLASSIFICATION_LOSSES), described[0])
    claimed = set().union(*(d["path"] for d in described))
    terms = len(losses) + _other_terms(root, set(losses), claimed, where)
    count = len(forwards[first["forward"]]) if first["forward"] is not None else 0
    top = _sum_divided(root)
    sum_over = top is not None and top[1] is first["node"]
    return LossGraph(foreign_ids=frozenset(foreign), foreign_shapes=foreign_shapes,
                     kind=first["kind"],
                     reduction=first["reduction"],
                     terms=terms, num_classes=first["classes"], output_index=first["index"],
                     output_count=count, sum_over=sum_over, summed=summed,
                     count_check=first["count_check"], squash=first["squash"],
                     weighted=first["weighted"], transforms_output=first["transforms"],
                     items=first["items"], soft_targets=first.get("soft", False), ops=ops)


# Backward nodes of ops that can make NaN/Inf, as the op's name (DivBackward0: by a tensor).
RISKY_NODES = {"ExpBackward0": "exp", "Exp2Backward0": "exp2", "Expm1Backward0": "expm1",
               "LogBackward0": "log", "Log2Backward0": "log2", "Log10Backward0": "log10",
               "Log1PBackward0": "log1p", "SqrtBackward0": "sqrt", "RsqrtBackward0": "rsqrt",
               "PowBackward0": "pow", "PowBackward1": "pow", "ReciprocalBackward0": "reciprocal",
               "DivBackward0": "div", "AcosBackward0": "acos", "AsinBackward0": "asin",
               "XlogyBackward0": "xlogy"}


def _loss_ops(root: Any, outputs: dict) -> tuple:
    """The ops that can make NaN/Inf on the way from the model's outputs (the ids of their
    grad_fns in ``outputs``) to the loss: the nodes from ``root`` down to them (none where
    the outputs are not known: the walk would go through the model)."""
    if not outputs:
        return ()
    found = {RISKY_NODES.get(node.name()) for node in _walk([root], stops=outputs)}
    return tuple(sorted(found - {None}))


def summed_over_items(root: Any) -> bool:
    """Whether the loss adds up its items' terms with no average: every term reached from the
    root through sums, differences, negations and constant factors is a torch loss of
    reduction "sum" or a full ``.sum()`` (the pytorch/examples VAE:
    ``binary_cross_entropy(..., reduction="sum") - 0.5 * torch.sum(...)``). A division (by a
    count, perhaps), a mean or a product of two terms anywhere makes it False."""
    todo, seen, found = [root], {root}, False
    while todo:
        node = todo.pop()
        name = node_name(node)
        if name in _SUMMING:
            terms = [child for child, _ in node.next_functions if child is not None]
            if name == "MulBackward" and len(terms) != 1:
                return False  # a product of two terms, not a term times a constant
            todo.extend(term for term in terms if term not in seen)
            seen.update(terms)
        elif REDUCTIONS.get(getattr(node, "_saved_reduction", None)) == "sum" or \
                node.name() == "SumBackward0":  # SumBackward1 sums over some dims only
            found = True
        else:
            return False
    return found


def _soft_cross_entropy(node: Any, parent: dict) -> Any:
    """The ``LogSoftmaxBackward`` node of a cross-entropy with probability targets, where
    ``node`` is its product with them, else None: ``F.cross_entropy(logits, probs)`` (mixup,
    cutmix, label-smoothed soft targets) and ``-(probs * log_softmax(logits)).sum(-1)`` leave
    no loss node, but a sum of a constant times a log_softmax."""
    if node_name(node) != "MulBackward" or node.name() != "MulBackward0":
        return None
    made = [child for child, _ in node.next_functions if child is not None]
    above = parent.get(node)
    if len(made) != 1 or node_name(made[0]) != "LogSoftmaxBackward" or above is None or \
            node_name(above) != "SumBackward":
        return None
    return made[0]


def _describe(node: Any, where: dict, parent: dict) -> dict:
    """The facts of the loss node ``node`` given the model's outputs (``where``)."""
    soft = _soft_cross_entropy(node, parent)
    if soft is not None:
        return _describe_soft(node, soft, where, parent)
    kind = LOSS_NODES[node_name(node)]
    path: set = {node}
    read = _through(_first_input(node), where, path)
    if kind == "nll" and read is not None and id(read) not in where and \
            node_name(read) == "LogSoftmaxBackward":
        # The loss applied log_softmax itself (cross_entropy) to what it read.
        kind = "cross_entropy"
        path.add(read)
        read = _through(_first_input(read), where, path)
    squash = _squashed(read, kind, where)
    shape = _input_shape(node)  # what the loss itself read: (N, C, ...) for nll
    classes = None
    if kind in ("nll", "cross_entropy") and shape:
        classes = shape[1] if len(shape) >= 2 else shape[0]
    found = where.get(id(read)) if read is not None else None
    reduction, count_check = _reduction(node, parent)
    transforms = found is None and read is not None and _reaches(read, where)
    # BCE keeps pos_weight/weight out of its mean (cross-entropy's weighted mean does not).
    weighted = kind == "bce_with_logits" and any(
        _saved_tensor(node, name) for name in ("_saved_pos_weight", "_saved_weight"))
    return {"kind": kind, "reduction": reduction, "count_check": count_check, "squash": squash,
            "weighted": weighted, "transforms": transforms, "items": loss_items(kind, shape),
            "classes": classes, "index": found[1] if found else None,
            "forward": found[0] if found else None, "path": path, "node": node}


def _squashed(read: Any, kind: str, where: dict) -> Optional[str]:
    """The squash ("softmax", "sigmoid") where what a loss of ``kind`` read is the loss
    function's own squashing of a model output (in ``where``) that the loss applies again,
    else None."""
    if read is None or id(read) in where or kind not in SQUASHED_BY.get(node_name(read), ()):
        return None
    inner = _through(_first_input(read), where)
    if inner is None or id(inner) not in where:
        return None
    return node_name(read)[:-len("Backward")].lower()


def _describe_soft(node: Any, log_softmax: Any, where: dict, parent: dict) -> dict:
    """:func:`_describe`'s facts of a cross-entropy with probability targets: ``node`` the
    product of the targets and ``log_softmax``'s output (the classes along the log_softmax's
    dim: an LM's ``(N, T, V)`` logits over V); "mean" where a mean or a division follows the
    sum of the terms, else "sum"."""
    path: set = {node, log_softmax}
    read = _through(_first_input(log_softmax), where, path)
    squash = _squashed(read, "cross_entropy", where)
    shape = _input_shape(log_softmax)
    dim = getattr(log_softmax, "_saved_dim", None)
    if isinstance(dim, int) and dim >= 2 ** 63:  # (kept as an unsigned 64-bit number)
        dim -= 2 ** 64
    classes = items = None
    if shape and isinstance(dim, int) and -len(shape) <= dim < len(shape):
        classes = shape[dim]
        items = math.prod(shape) // max(classes, 1)
    reduction, above = "sum", parent.get(parent.get(node))
    for _ in range(4):  # (the negation and a scale may come between)
        if above is None:
            break
        if node_name(above) in ("MeanBackward", "DivBackward"):
            reduction = "mean"
            break
        above = parent.get(above)
    found = where.get(id(read)) if read is not None else None
    return {"kind": "cross_entropy", "reduction": reduction, "count_check": None,
            "squash": squash, "weighted": False,
            "transforms": found is None and read is not None and _reaches(read, where),
            "items": items, "classes": classes, "soft": True,
            "index": found[1] if found else None, "forward": found[0] if found else None,
            "path": path, "node": node}


def _reaches(node: Any, where: dict, budget: int = 2000) -> bool:
    """Whether a model output's node (in ``where``) lies upstream of ``node``: what the loss
    read was computed from a model output (within ``budget`` nodes)."""
    seen, todo = {node}, deque([node])
    while todo and len(seen) < budget:
        current = todo.popleft()
        if id(current) in where:
            return True
        for child, _ in current.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                todo.append(child)
    return False


def _saved_tensor(node: Any, name: str) -> bool:
    """Whether the autograd node saved a tensor as ``name`` (None when the call got none); one
    that the backward already freed counts too: reading it raises."""
    try:
        return getattr(node, name, None) is not None
    except RuntimeError:
        return True


def _reduction(node: Any, parent: dict) -> tuple:
    """``(reduction, pending count check)`` of the loss node: its reduction; "mean" for a
    reduction="none" loss that is then averaged (times a constant: ``loss.mean() /
    accumulation``), and for a sum over items divided by a count of them (see
    :func:`_divided_by_count`; when that takes values held in tensors, the reduction is left
    as it is and the check is returned, to be read with the step's one copy)."""
    reduction = REDUCTIONS.get(getattr(node, "_saved_reduction", None))
    if reduction == "sum":
        return _if_counted(reduction, _divided_by_count(node, parent, lambda: _items(node)))
    if reduction != "none":
        return reduction, None
    above = parent.get(node)
    while above is not None:
        name = node_name(above)
        if name == "MeanBackward":
            return "mean", None
        if above.name() == "SumBackward0":  # every per-item loss added up
            return _if_counted(reduction,
                               _divided_by_count(above, parent, lambda: _rows(node)))
        if not _passes_values(above) and above.name() not in _SCALED:
            break
        above = parent.get(above)
    return reduction, None


def _if_counted(reduction: Optional[str], counted: Any) -> tuple:
    """``("mean", None)`` for a sum whose divisor is a count, ``(reduction, None)`` for one
    whose divisor is not, ``(reduction, check)`` when that is a device tensor not read yet."""
    if isinstance(counted, torch.Tensor):
        return reduction, counted
    return ("mean" if counted else reduction), None


def _divided_by_count(node: Any, parent: dict, items_of: Callable[[], Any]) -> Any:
    """Whether the sum of ``items_of()`` per-item losses that ``node`` returns is then divided
    (through reshapes and casts) by a whole number at least ``items``: a count of them (its
    value is their mean) or of a batch that holds them (gradient accumulation's count: its
    value is at most their mean). A divisor that is no count (a temperature), or one that
    cannot be read (a loss read after its backward: the saved values are freed), is not.
    Where a value is a tensor the answer is a 0-d bool tensor on its device: reading it now
    would sync with the device (the caller reads it with the step's one copy)."""
    below, above = node, parent.get(node)
    while above is not None and _passes_values(above):
        below, above = above, parent.get(above)
    if above is None or node_name(above) != "DivBackward" or _first_input(above) is not below:
        return False
    try:
        divisor, items = _value(above._saved_other), items_of()
    except (AttributeError, RuntimeError):  # freed by the backward
        return False
    if divisor is None or items is None:
        return False
    if isinstance(divisor, float) and isinstance(items, float):
        if items <= 0:
            return False
        if math.isclose(divisor, items, rel_tol=1e-6):
            return True
        return divisor > items and divisor == round(divisor)
    device = _device(above) or next(v.device for v in (divisor, items)
                                    if isinstance(v, torch.Tensor))
    with torch._C.DisableTorchFunction():
        # On the loss's device: a 0-d tensor in host memory (a divisor given as a number)
        # goes into the op as a value, where a copy of it to the device would sync.
        zero = torch.zeros((), dtype=torch.float64, device=device)
        d, n = zero + divisor, zero + items
        close = (d - n).abs() <= 1e-6 * torch.maximum(d.abs(), n.abs())
        return (n > 0) & (close | ((d > n) & (d == d.round())))


def _device(node: Any) -> Optional[torch.device]:
    """The device of the tensor ``node``'s forward made (None where this torch does not
    say)."""
    try:
        return node._input_metadata[0].device
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None


def _value(value: Any) -> Any:
    """A saved value as a float (a Python number) or a 0-d float64 tensor on its device (a
    tensor: read later, with the step's one copy); None when it is not one number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        with torch._C.DisableTorchFunction():  # inside the probe's mode: no dispatch of our own
            return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _items(node: Any) -> Any:
    """How many items a reduction="sum" loss node added: an NLL loss's saved total weight
    (its targets that were not ignored, weighted), else every element it read; None when
    the total weight was freed (read after the backward)."""
    if LOSS_NODES[node_name(node)] == "nll":
        return _value(node._saved_total_weight)
    shape = _input_shape(node)
    return float(math.prod(shape)) if shape else None


def _rows(node: Any) -> Optional[float]:
    """How many per-item losses a reduction="none" loss node returns: the elements it read,
    less the class dimension of an NLL loss's (N, C, ...) input."""
    shape = _input_shape(node)
    if not shape:
        return None
    if LOSS_NODES[node_name(node)] == "nll" and len(shape) >= 2:
        shape = shape[:1] + shape[2:]
    return float(math.prod(shape))


def _sum_divided(root: Any) -> Optional[tuple]:
    """``(division, loss node)`` when the loss at ``root`` is, through reshapes and casts, a
    reduction="sum" NLL loss divided by something; else None."""
    division = _through(root)
    if division is None or node_name(division) != "DivBackward":
        return None
    node = _through(_first_input(division))
    if node is None or LOSS_NODES.get(node_name(node)) != "nll" or \
            REDUCTIONS.get(getattr(node, "_saved_reduction", None)) != "sum":
        return None
    return division, node


def item_mean(loss: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-item mean of a loss that divides an NLL loss's sum by a count of items
    (``LossGraph.counted``), read before its backward: ``loss * count / total weight``, on
    the loss's device (no host sync). Under ``Trainer``'s gradient accumulation the count
    covers every micro-batch of the step, so the loss itself is a fraction of this mean.
    None for another loss, or one whose saved values are gone."""
    top = _sum_divided(loss.grad_fn) if loss.grad_fn is not None else None
    if top is None:
        return None
    division, node = top
    try:
        divisor, total = division._saved_other, node._saved_total_weight
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(total, torch.Tensor) or total.numel() != 1:
        return None
    with torch._C.DisableTorchFunction():  # inside the probe's mode: no dispatch of our own
        value = loss.detach()
        if isinstance(divisor, torch.Tensor):
            if divisor.numel() != 1:
                return None
            # A 0-d tensor in host memory (a number) goes into the ops below as a value; a
            # copy of it to the loss's device would sync.
            divisor = divisor.detach().reshape(())
        total = total.detach().reshape(())
        scaled = (value.float() * divisor / total.clamp_min(1e-12)).to(value.dtype)
        return torch.where(total > 0, scaled, value)


def _other_terms(root: Any, losses: set, claimed: set, where: dict) -> int:
    """Terms the loss adds besides its torch losses that are computed from the model's
    outputs (a distillation KL, a soft-target cross-entropy): the parts below the combining
    nodes at the top of the graph that reach an output other than through the torch losses'
    own reads (label smoothing's term reads the same log_softmax as its nll)."""
    starts, todo, seen = [], [root], {root}
    while todo:
        node = todo.pop()
        if node in losses:
            continue
        if node_name(node) not in COMBINING_NODES:
            starts.append(node)
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                todo.append(child)
    return sum(_reaches_output(start, losses | claimed, where) for start in starts)


def _reaches_output(start: Any, blocked: set, where: dict) -> bool:
    """Whether a model output is reachable from ``start`` other than through ``blocked``."""
    if start in blocked:
        return False
    seen, todo = {start}, [start]
    while todo and len(seen) < MAX_NODES:
        node = todo.pop()
        if id(node) in where:
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen and child not in blocked:
                seen.add(child)
                todo.append(child)
    return False

