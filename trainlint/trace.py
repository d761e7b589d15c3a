"""The plain-data trace that rules read: numbers and module facts, never tensors or modules."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# Activation families the probe distinguishes (what "kind" a LayerTrace has).
RELU_FAMILY = "relu"
# Losses whose value for an uninformed classifier is known (ln(C), or ln(2) per output) and
# whose per-sample gradient is bounded (``RunTrace.loss_kind``).
CLASSIFICATION_LOSSES = ("cross_entropy", "nll", "bce_with_logits")
SATURATING_FAMILY = ("tanh", "sigmoid")
# An LSTM forget gate below this keeps less than 5% of the cell state a step: the probe counts
# units whose estimated forget gate stays below it (``RunTrace.forget_gates``).
FORGET_GATE_CLOSED = 0.05


@dataclass(frozen=True)
class Location:
    """Where in the user's source a module was built."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class ActivationStats:
    """Statistics of one observed output, merged over every call and observed step.

    ``mean``/``std``/``zero_fraction``/``saturated_fraction`` are over the finite
    elements (NaN/Inf are counted in ``nonfinite`` and skipped). ``sampled`` is
    True when the moments were estimated on a subset of the elements.
    """

    count: int
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    nonfinite: int = 0
    saturated_fraction: Optional[float] = None
    rms: float = 0.0
    sampled: bool = False
    # Between-sample RMS: sqrt of half the mean squared difference of paired samples at the
    # same position (None with batches of one). What of the output depends on the input.
    signal: Optional[float] = None


@dataclass
class LayerTrace:
    """One observation point: a leaf module's output, or a functional activation in a module.

    ``module`` is the qualified name from ``named_modules()``; ``op`` is ``"output"`` for a
    leaf module's output and the function name (``"relu"``, ``"tanh"`` ...) for a functional
    activation called inside ``module``'s forward.
    """

    module: str
    type: str
    op: str
    depth: int
    kind: Optional[str] = None
    activation: Optional[ActivationStats] = None
    unit_ever_active: Optional[np.ndarray] = None
    # How many of the point's last observed records ``unit_ever_active`` covers (0: not said).
    unit_records: int = 0
    # The same over the point's recent records (``assemble.RECENT_VALUES`` values per unit),
    # when those are fewer than ``unit_records``; else None and 0.
    unit_recent_active: Optional[np.ndarray] = None
    unit_recent_records: int = 0
    unit_dim: Optional[int] = None
    grad_norm: Optional[float] = None
    grad_rms: Optional[float] = None
    grad_nonfinite: int = 0
    backward_order: Optional[int] = None
    location: Optional[Location] = None
    shape: tuple = ()
    # This point's node in RunTrace.edges: ("point", module, op, units).
    node: tuple = ()
    # The torch.nn class the module is or derives from (``type`` when it derives from none):
    # what the rules recognise, so that a subclass of nn.BatchNorm2d is a BatchNorm2d.
    base: str = ""

    def __post_init__(self) -> None:
        self.base = self.base or self.type

    @property
    def label(self) -> str:
        """Display name: the module, plus the function when it is a functional activation."""
        if self.op == "output":
            return self.module or "(model)"
        return f"{self.module or '(model)'}:{self.op}"

    @property
    def dead_fraction(self) -> Optional[float]:
        if self.unit_ever_active is None or self.unit_ever_active.size == 0:
            return None
        return float(1.0 - self.unit_ever_active.mean())

    @property
    def dead_units(self) -> list[int]:
        if self.unit_ever_active is None:
            return []
        return [int(i) for i in np.flatnonzero(~self.unit_ever_active)]


@dataclass
class ModuleFacts:
    """What the rules need to know about one module, independent of any step."""

    name: str
    type: str
    training: bool
    is_leaf: bool
    location: Optional[Location] = None
    # Constructor-level facts (e.g. num_features, in_channels, bias, affine); plain values only.
    # ``overrides_train``: the module's class defines its own ``train()`` (e.g. to keep norms
    # frozen); ``attends``: its own forward called F.scaled_dot_product_attention (observed);
    # ``inner_ops``: a user's leaf module without weights made its output from its first input
    # by these plain ops (observed; absent where it did not, or its calls differed);
    # ``weight_of``: the name its weight goes by when it is another module's (tied weights).
    attrs: dict = field(default_factory=dict)
    # Shapes of the inputs seen by a normalization layer: values per channel per call.
    values_per_channel: list = field(default_factory=list)
    batch_sizes: list = field(default_factory=list)
    # A normalization layer's smallest training batch at each observed step that ran it, as
    # runs of [batch, steps] in order (how often a batch that small came, and in a row).
    batch_runs: list = field(default_factory=list)
    input_shapes: list = field(default_factory=list)
    # The torch.nn class the module is or derives from (``type`` when it derives from none).
    base: str = ""
    # The installed package whose class the module is (``"transformers"``, ``"torch"``); ""
    # for the user's own classes.
    library: str = ""

    def __post_init__(self) -> None:
        self.base = self.base or self.type


@dataclass
class ParamTrace:
    """One parameter: its size, its gradient, and the update the optimizer made."""

    name: str
    module: str
    shape: tuple
    requires_grad: bool
    in_optimizer: Optional[bool]
    norm: float
    std: float
    grad_norm: Optional[float]
    update_norm: Optional[float] = None
    nonfinite: int = 0
    grad_nonfinite: int = 0
    # ||update|| / ||weight before the update|| of every observed optimizer step, in order
    # (steps where the weight was exactly 0 before the update are left out).
    update_ratios: list = field(default_factory=list)
    # ||weight|| before, and ||update|| of, every observed optimizer step that updated it.
    norms_before: list = field(default_factory=list)
    update_norms: list = field(default_factory=list)
    # Observed steps at which the parameter had a gradient (``.grad`` not None).
    grad_steps: int = 0
    # The index of the optimizer's param group that holds it, and that group's learning rate
    # at the last observed step (None when not in the optimizer, or not a plain number).
    group: Optional[int] = None
    lr: Optional[float] = None
    # The highest learning rate its group had at an observed step (None: never a number).
    peak_lr: Optional[float] = None
    # The group's ``initial_lr``, which an LR scheduler sets when it is built (None: none).
    initial_lr: Optional[float] = None
    dtype: Optional[str] = None  # "float32", "bfloat16"...
    # The class name of the optimizer that holds it ("Adagrad"; None: none).
    optimizer: Optional[str] = None
    # ``norm`` at the first observed step (the norms of one tensor read the same elements at
    # every step, so an unchanged parameter reads the same value).
    first_norm: Optional[float] = None
    # Observed steps at which it was in no optimizer (checked), and at which its values
    # changed outside the forward all the same (the user's code updates it: a moving-average
    # target network).
    outside_checks: int = 0
    moved_outside: int = 0

    @property
    def update_ratio(self) -> Optional[float]:
        if self.update_norm is None or self.norm == 0:
            return None
        return self.update_norm / self.norm


@dataclass
class InputTrace:
    """Per-channel statistics of one floating-point model input (channel = dim 1 of images,
    the last dim of tabular/sequence inputs)."""

    name: str
    shape: tuple
    dtype: str
    channel_dim: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    # The moments of the last observed step's batch, and that step (a Monitor run's data can
    # change mid-run: a normalization switched off at some epoch).
    last_mean: Optional[np.ndarray] = None
    last_std: Optional[np.ndarray] = None
    last_step: Optional[int] = None
    # How many values per channel the range (min, max) spans: in a Monitor run, those of
    # every observed batch read (successive batches of the data); else one batch's.
    range_values: Optional[np.ndarray] = None


@dataclass
class TargetTrace:
    """The range of the target a check's comparing loss (MSE, L1, BCE...) set a model output
    against, as the loss got it (over the observed steps): its extremes and the shares of its
    values below 0, above 1 and below -1 (what a sigmoid, tanh or ReLU output can reach), and
    that output's origin ``(node, via)``."""

    name: str
    shape: tuple
    min: float
    max: float
    below_zero: float
    above_one: float
    below_minus_one: float
    origin: Optional[tuple] = None


# Op names in ``Edge.via`` whose output has its input's shape and dim order (element-wise
# arithmetic, clamps, casts, dropout): a tensor that went through only these keeps its
# producer's channel layout, and a model output made by them has its source's shape.
ELEMENTWISE_OPS = frozenset({
    "add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_",
    "__isub__", "mul", "__mul__", "__rmul__", "mul_", "__imul__", "addcmul", "addcmul_",
    "div", "__truediv__", "__rtruediv__", "div_", "__itruediv__", "neg", "__neg__", "pow",
    "__pow__", "abs", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "tanh", "sigmoid",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "to", "type", "dropout",
    "where",
})


# Plain ops that sum two tensors: where two paths of the forward flow into one, a residual.
SUM_OPS = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})
# Ops that join tensors side by side (a feature column beside embeddings): each operand's
# values reach the result as they are.
CONCAT_OPS = frozenset({"cat", "concat", "concatenate", "hstack", "vstack", "dstack",
                        "column_stack", "row_stack", "stack"})
# Ops that make NaN/Inf out of finite values (log of 0 or less, 0/0, overflowing exp...).
RISKY_OPS = frozenset({
    "log", "log2", "log10", "log1p", "log_", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "div", "div_",
    "true_divide", "__truediv__", "__rtruediv__", "__itruediv__", "reciprocal", "reciprocal_",
    "pow", "pow_", "__pow__", "__rpow__", "exp", "exp_", "exp2", "expm1", "acos", "asin",
    "atanh", "acosh", "tan", "lgamma", "digamma", "erfinv", "xlogy", "fmod", "remainder",
})
# Ops that can fill a tensor with a value given as a Python number (``masked_fill(mask,
# float("-inf"))``, ``torch.full(shape, -inf)``, ``x[mask] = -inf``): with ±inf the probe notes
# them in ``RunTrace.module_ops`` as ``"masked_fill(-inf)"``.
FILL_OPS = frozenset({"masked_fill", "masked_fill_", "fill", "fill_", "full", "full_like",
                      "new_full", "where", "__setitem__", "index_fill", "index_fill_"})


def inf_fill(op: str) -> bool:
    """Whether ``op``, a ``RunTrace.module_ops`` entry, is a fill with ±inf."""
    return op.endswith("inf)")


# Ops that move a tensor's dims around (a channel dim goes where they send it).
REORDERING_OPS = frozenset({"permute", "transpose", "transpose_", "movedim", "moveaxis",
                            "swapaxes", "swapdims", "mT", "T"})
# Activations whose backward only scales the gradient by their local slope: the probe does not
# read the gradient at their output (the layers around them carry the gradient profile; reading
# every gradient twice cost an MLP ~3% of its step), except where it is the model's output.
GRADIENT_FREE_KINDS = frozenset({"relu", "gelu", "tanh", "sigmoid"})
# Ops that pass a tensor on with its values as they are (in another shape or order): the
# gradient reaching the result has the same norm as the one reaching the tensor.
NORM_KEEPING_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                              "contiguous", "view_as", "reshape_as", "t", "clone"}) | REORDERING_OPS


@dataclass
class Edge:
    """Data flowed from one observation point to a consumer, through ``via`` plain ops."""

    src: tuple
    dst: tuple
    via: tuple = ()


class _Indexed(Mapping):
    """A mapping over the keys of ``index`` (key -> position in the columns behind it)."""

    __slots__ = ("_index",)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class StepLayers(_Indexed):
    """One observed step's per-layer values (``RunTrace.per_step[i]["layers"]``), kept as
    columns: ``index`` maps each point key to its position (one dict shared by the steps that
    observed the same points) and ``columns`` each field to ``(float64 values, mask of the
    positions that have it, or None when all do)``. An entry reads like a dict of the fields
    the layer has at that step (a dict per layer per step took several times the memory)."""

    __slots__ = ("_columns",)

    def __init__(self, index: dict, columns: dict) -> None:
        self._index = index
        self._columns = columns

    def __getitem__(self, key: tuple) -> LayerValues:
        return LayerValues(self._columns, self._index[key])

    def get(self, key: tuple, default: object = None) -> object:
        at = self._index.get(key)
        return default if at is None else LayerValues(self._columns, at)

    def fields(self, keys: list, names: tuple) -> Optional[dict]:
        """:func:`layer_columns` of this step: one fancy index per field."""
        at = [self._index.get(key) for key in keys]
        if None in at:
            return None
        out = {}
        for name in names:
            found = self._columns.get(name)
            if found is None:
                out[name] = [None] * len(at)
                continue
            values = found[0][at].tolist()
            if found[1] is not None:
                values = [v if ok else None for v, ok in zip(values, found[1][at].tolist())]
            out[name] = values
        return out


class LayerValues(Mapping):
    """One layer's values at one step: a read-only view of position ``at`` of the columns."""

    __slots__ = ("_columns", "_at")

    def __init__(self, columns: dict, at: int) -> None:
        self._columns = columns
        self._at = at

    def __getitem__(self, name: str) -> float:
        values, mask = self._columns[name]
        if mask is not None and not mask[self._at]:
            raise KeyError(name)
        return values.item(self._at)

    def get(self, name: str, default: object = None) -> object:
        found = self._columns.get(name)
        if found is None or (found[1] is not None and not found[1][self._at]):
            return default
        return found[0].item(self._at)

    def __contains__(self, name: object) -> bool:
        found = self._columns.get(name)
        return found is not None and (found[1] is None or bool(found[1][self._at]))

    def __iter__(self) -> Iterator:
        return (name for name in self._columns if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def layer_columns(layers: Mapping, keys: list, names: tuple) -> Optional[dict]:
    """``{name: [value or None per key]}``: fields ``names`` of layers ``keys`` at one step
    (``per_step[i]["layers"]``: a :class:`StepLayers`, read by columns, or a plain dict of
    dicts); None when one of the keys was not observed then."""
    if isinstance(layers, StepLayers):
        return layers.fields(keys, names)
    entries = [layers.get(key) for key in keys]
    if any(entry is None for entry in entries):
        return None
    return {name: [entry.get(name) for entry in entries] for name in names}


class StepValues(_Indexed):
    """One observed step's float per name (``RunTrace.per_step[i]["param_grad_norms"]``): an
    ``index`` of the names (shared from step to step while they stay the same) and a float64
    array."""

    __slots__ = ("_values",)

    def __init__(self, index: dict, values: np.ndarray) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, name: str) -> float:
        return self._values.item(self._index[name])

    def get(self, name: str, default: object = None) -> object:
        at = self._index.get(name)
        return default if at is None else self._values.item(at)

    def items(self) -> list:  # type: ignore[override]  # (one pass: the index is in order)
        return list(zip(self._index, self._values.tolist()))


@dataclass
class RunTrace:
    """Everything observed in a run: what the rules receive."""

    layers: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)
    params: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    # TargetTrace of the target a check's comparing loss set an output against (a Monitor sees
    # none).
    targets: list = field(default_factory=list)
    # nn.LSTM name -> (share of units whose forget gate is closed, mean forget bias, mean
    # spread of the forget pre-activation) at the first observed step that ran it (gates.py).
    forget_gates: dict = field(default_factory=dict)
    edges: list = field(default_factory=list)
    # ``(source node, via up to and including a RISKY_OPS op)`` -> the module whose forward
    # ran that op (a wrapper's own ``torch.log`` before its child): where NaN/Inf it made began;
    # None where two modules ran the same ops on the same source.
    op_sites: dict = field(default_factory=dict)
    # Module -> the ops that can make NaN/Inf (``RISKY_OPS``) that its own forward ran on any
    # tensor, the graph's or not (``log(-log(u))`` of noise made there), and its fills with
    # ±inf (``"masked_fill(-inf)"``), sorted.
    module_ops: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    steps: int = 0
    observed_steps: int = 0
    batch_size: Optional[int] = None
    device: str = "cpu"
    mode: str = "check"
    world_size: int = 1
    global_batch_size: Optional[int] = None
    model_type: str = ""
    output_ops: tuple = ()
    loss_kind: Optional[str] = None
    # "mean", "sum" or "none" when the loss's torch call was seen (None: not seen).
    loss_reduction: Optional[str] = None
    # The loss adds up its items' terms over the batch with no average (reduction="sum"
    # losses and full .sum()s only); None: not known.
    loss_summed: Optional[bool] = None
    # See LossGraph.ops: the ops that can make NaN/Inf the loss function ran on the outputs.
    loss_ops: tuple = ()
    # How many terms the loss adds: torch losses (an auxiliary head adds one) and other terms
    # computed from the model's outputs (a distillation KL).
    loss_terms: Optional[int] = None
    # Whether the torch loss reads one of the model's outputs as it is (through reshapes and
    # casts only), not something computed from it, such as torch.log(probs); None: not known.
    loss_reads_output: Optional[bool] = None
    # "softmax"/"sigmoid" when the loss function applies it to a model output before a torch
    # loss that applies its own (see ``LossGraph.squash``).
    loss_squash: Optional[str] = None
    # The classification loss weighs its terms (BCE's pos_weight/weight; see
    # ``LossGraph.weighted``): its level at init is not ln(2).
    loss_weighted: bool = False
    # The classification loss reads values computed from a model output by the loss function
    # (see ``LossGraph.transforms_output``): its level at init is that function's.
    loss_transforms_output: bool = False
    # The cross-entropy was read from a sum of constants times a log_softmax (see
    # ``LossGraph.soft_targets``): its first value is not judged against ln(C).
    loss_soft_targets: bool = False
    # How many items (samples times positions) the first classification loss averaged.
    loss_items: Optional[int] = None
    # Parameters outside the model and its optimizer that the Monitor's loss depends on (a
    # GAN generator's loss runs through the discriminator).
    foreign_params: int = 0
    # Those tensors have the shapes of the model's trainable parameters, one for one: a copy
    # of the model (``copy.deepcopy`` after the optimizer was built) trained in its place.
    foreign_copy: bool = False
    # Plain list/tuple/dict attributes of the model (dotted names) holding layers or
    # Parameters the loss depends on that the model does not register: {name: count}.
    unregistered: dict = field(default_factory=dict)
    # A check's loss ran through Parameters outside the model at its first step and through
    # others of the same shapes at its second, none of the first's: layers the forward (or the
    # loss) builds anew at every step, which never train. Their shapes.
    remade_params: tuple = ()
    # A Monitor's optimizer ran its own step() at an observed step.
    optimizer_stepped: bool = False
    # This loss runs through another live Monitor's model, or that one's through this model,
    # one way only (a GAN's generator and discriminator; both ways is one model in two
    # halves): its loss level shows how the two compete.
    adversarial: bool = False
    # In an observed step two optimizers stepped with a backward between them, each on its
    # own loss, and one backward ran through modules the other optimizer steps (a GAN's
    # discriminator and generator in one model, an actor and a critic).
    alternating: bool = False
    # A Monitor's losses since its last observed step, when report() came before the next:
    # ``{"step": the last step, "loss_mean": ..., "loss_max": ...}`` (None: none).
    loss_tail: Optional[dict] = None
    # The Monitor was created once training had begun (its optimizer already held state, as
    # after a resume from a checkpoint): its first observed step is not the run's first.
    resumed: bool = False
    # The class of an optimizer whose step runs its closure several times (LBFGS: a
    # line-searched solve per step, with no learning rate in the usual sense), if any.
    closure_optimizer: Optional[str] = None
    # Where the optimizer was built, when a check got a factory from the user's file
    # (``build_optimizer``): the learning rate's findings point there.
    optimizer_location: Optional[Location] = None
    # An adapter's word on why a Monitor may see no loss and what to do (None: pass the loss
    # to monitor.step(loss)); the rules that need a loss say it when none was observed.
    loss_hint: Optional[str] = None
    # The model's own forward ran at no observed step (the training step called its
    # submodules directly): its output's link to the loss was not read.
    rootless: bool = False
    # ``(step, the optimizers watched before, those watched after)`` where a Monitor's loop
    # began stepping the model with optimizers it was not given (built mid-run), as text.
    replaced_optimizers: list = field(default_factory=list)
    # Observed steps whose gradients were still held, never reset, when their optimizer
    # stepped next: optimizer.zero_grad() is not called between steps (TL502).
    grads_carried: list = field(default_factory=list)
    # Where a Monitor watches several optimizers: those whose gradients were carried, as
    # "Adam over 'head'" (their class and the module holding their parameters).
    carried_by: list = field(default_factory=list)
    # Judged mid-run, to stop it (a Monitor's ``fail_on``), not at the run's report: a rule
    # about the whole run (TL603) waits for more of it.
    interim: bool = False
    num_classes: Optional[int] = None
    errors: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    train_flags: list = field(default_factory=list)
    # A check's model as it was given, before the check put it in train mode
    # (:func:`trainlint.probe.training_flags`, and ``classes``: the names of its class and
    # its bases); None for a Monitor run.
    given_flags: Optional[dict] = None
    amp_dtype: Optional[str] = None
    per_step: list = field(default_factory=list)
    # Modules whose outputs were observed with autograd off inside the training forward
    # (torch.no_grad() in a forward, a reentrant checkpoint's forward).
    gradless: list = field(default_factory=list)

    def layer_by_key(self) -> dict:
        return {(lt.module, lt.op): lt for lt in self.layers}

    def at_start(self, step: dict) -> bool:
        """Whether this observed step began at training step 0 of a run not resumed: before
        any update (an observation that ran on over a gradient accumulation's micro-batches,
        all at the initial weights, began there and ended at the one that stepped)."""
        return step.get("started", step["step"]) == 0 and not self.resumed

    def ordered_layers(self) -> list:
        """Observation points in forward execution order."""
        return sorted(self.layers, key=lambda lt: lt.depth)
