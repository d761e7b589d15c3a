"""Hooks on the user's model that accumulate statistics on the device.

The probe attaches forward hooks (leaf-module outputs, BatchNorm input shapes, the module
stack), tensor hooks on observed outputs (gradients), a ``TorchFunctionMode`` during the
root forward (functional activations and data flow between observation points) and
optimizer step hooks (update sizes). Nothing in a hook syncs with the host: every
statistic is a device tensor until :meth:`Probe.collect` copies them all at once.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from . import gates, stats
from .batch import leading_size, tensors_in
from .errors import ConfigError
from .hooks import OwnedHook
from .lossgraph import MAX_FORWARDS, output_nodes
from .optimizers import (
    optimizer_groups,
    optimizer_params,
    optimizers_of,
    unhookable,
    wrapped_optimizers,
)
from .trace import (
    CONCAT_OPS,
    ELEMENTWISE_OPS,
    FILL_OPS,
    GRADIENT_FREE_KINDS,
    NORM_KEEPING_OPS,
    REORDERING_OPS,
    RISKY_OPS,
    SUM_OPS,
)
from .updates import S, UpdateSampler

ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu",
    nn.Tanh: "tanh", nn.Hardtanh: "tanh",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "sigmoid",
    nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax",
    nn.GELU: "gelu", nn.SiLU: "gelu", nn.Mish: "gelu",
}

# Activation classes from other libraries, recognised by name (transformers' GELUActivation...).
GELU_NAMES = ("GELU", "SiLU", "Swish", "Mish")

FUNCTIONAL_ACTIVATIONS: dict[Callable, str] = {
    F.gelu: "gelu", F.silu: "gelu", F.mish: "gelu",
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu",
    F.hardtanh: "tanh", F.hardtanh_: "tanh", F.hardsigmoid: "sigmoid",
    torch.Tensor.relu: "relu", torch.Tensor.relu_: "relu",
    torch.tanh: "tanh", torch.tanh_: "tanh", F.tanh: "tanh",
    torch.Tensor.tanh: "tanh", torch.Tensor.tanh_: "tanh",
    torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid", torch.Tensor.sigmoid_: "sigmoid",
    torch.special.expit: "sigmoid",
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    torch.Tensor.log_softmax: "log_softmax",
}

CHANNEL_FIRST_TYPES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# torch.nn leaves (these exact types) whose forward is one functional op on float tensors plus
# checks of the input's shape: the leaf hook tags their output itself, so the probe's mode need
# not follow the ops inside them (Identity and Flatten, which pass any tensor on, are not here).
OPAQUE_LEAVES = frozenset({
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.Embedding, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
}) | frozenset(ACTIVATION_MODULES)
UNIT_KINDS = ("relu", "gelu")
# Recurrent layers: their arguments after the first are the state (``hx``), not data.
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
# Integer inputs recorded like float ones: raw pixel bytes and PCM samples (token ids, int64,
# are not measurements).
RAW_INTS = (torch.uint8, torch.int8, torch.int16)
# After the first observed batch (read whole), a Monitor reads about this many samples, spread
# over the batch, of each later one (~0.2 ms for 8 x 1024 features, ~20 ms for all 256): enough
# to see inputs whose scale changed mid-run (TL201), far beyond its thresholds.
LATER_INPUT_ROWS = 8
MAX_VIA = 4
# What a leaf module's inner ops read when its output did not come from its first input by
# ops the mode followed, or when its calls differed.
MIXED = ("?",)


def note_site(store: dict, key: tuple, module: Optional[str]) -> None:
    """Record ``module`` as where the ops of ``key`` ran (``RunTrace.op_sites``); None once
    two modules did."""
    if store.setdefault(key, module) != module:
        store[key] = None


def _inf_fill(op: str, args: tuple, kwargs: dict) -> Optional[str]:
    """``"masked_fill(-inf)"`` for a fill op (``FILL_OPS``) given ±inf as a Python number, else
    None (a value held in a tensor is not read: that would sync)."""
    if op not in FILL_OPS:
        return None
    for value in (*args[1:], *kwargs.values()):
        if isinstance(value, float) and math.isinf(value):
            return f"{op}({'-' if value < 0 else ''}inf)"
    return None


# Divisions whose divisor is their second argument.
_DIVIDES = frozenset({"div", "div_", "true_divide", "__truediv__", "__itruediv__"})


def _module_op(op: str, args: tuple, kwargs: dict) -> Optional[str]:
    """What a module's forward ran that can make NaN/Inf, for TL504's fix: a risky op, less a
    division by a Python number other than 0 (``/ math.sqrt(d)`` in attention), or a fill
    with ±inf (:func:`_inf_fill`); else None."""
    if op in RISKY_OPS:
        divisor = args[1] if len(args) > 1 else kwargs.get("other")
        if op in _DIVIDES and isinstance(divisor, (int, float)) and divisor != 0:
            return None
        return op
    return _inf_fill(op, args, kwargs)


def keep_inner_ops(store: dict, name: str, ops: tuple) -> None:
    """Record ``ops`` for ``name`` in ``store``; ``MIXED`` once two calls differ."""
    if store.setdefault(name, ops) != ops:
        store[name] = MIXED
# Model inputs followed into one tensor beside its producer (``Probe.joined``).
MAX_JOINED = 8
# Float tensors of a module's output read for NaN beside the one observed.
MAX_OTHER_OUTPUTS = 4
# Element-wise products: a tensor flowing into one of these is used as a gate.
GATE_OPS = frozenset({"mul", "__mul__", "__rmul__", "mul_", "__imul__", "addcmul", "addcmul_"})
# ``step_grads`` value of a parameter whose gradient the optimizer hooks' sampler took.
_SAMPLED = ("sampled",)


def activation_kind(module: nn.Module) -> Optional[str]:
    """The activation family of a module, or None when it is not an activation."""
    kind = next((ACTIVATION_MODULES[c] for c in type(module).__mro__ if c in ACTIVATION_MODULES),
                None)  # a subclass of nn.ReLU is a ReLU
    if kind is None and not any(True for _ in module.parameters(recurse=False)):
        name = type(module).__name__
        if any(g in name for g in GELU_NAMES):
            kind = "gelu"
    if kind == "tanh" and isinstance(module, nn.Hardtanh) and not _unit_bounds(
            module.min_val, module.max_val):
        return None  # its saturation is at its own bounds, not at +-1 as a tanh's
    return kind


def _unit_bounds(low: Any, high: Any) -> bool:
    """Whether a hardtanh clips at -1 and 1 (what the tanh family's saturation measures)."""
    return low == -1.0 and high == 1.0


# Clamps, a ReLU when written ``x.clamp(min=0)``, ``torch.clamp(x, 0, 6)`` (see _clamp_kind).
CLAMPS = frozenset(getattr(owner, name) for owner in (torch, torch.Tensor)
                   for name in ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_")
                   if hasattr(owner, name))
THRESHOLDS = frozenset({F.threshold, F.threshold_})
# A leaf module whose own forward calls one of these is that norm layer, whatever its class is
# named (nanoGPT-style wrappers of F.layer_norm with an optional bias).
FUNCTIONAL_NORMS = {F.layer_norm: "LayerNorm"}
if hasattr(F, "rms_norm"):
    FUNCTIONAL_NORMS[F.rms_norm] = "RMSNorm"


def functional_kind(func: Callable, args: tuple, kwargs: dict) -> Optional[str]:
    """The activation family of a torch function call (None: not an activation); a hardtanh
    with bounds other than +-1 is not judged as a tanh; a clamp or threshold at 0 is a
    hand-written ReLU."""
    if func in CLAMPS:
        return _clamp_kind(args[1] if len(args) > 1 else kwargs.get("min"),
                           args[2] if len(args) > 2 else kwargs.get("max"))
    if func in THRESHOLDS:
        cut = args[1] if len(args) > 1 else kwargs.get("threshold")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        return "relu" if _number(cut) and _number(value) and cut == 0 == value else None
    kind = FUNCTIONAL_ACTIVATIONS.get(func)
    if kind == "tanh" and func in (F.hardtanh, F.hardtanh_):
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        return kind if _unit_bounds(low, high) else None
    return kind


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clamp_kind(low: Any, high: Any) -> Optional[str]:
    """"relu" for a clamp whose lower bound is the number 0 and whose upper bound is none or 6
    (ReLU, ReLU6); None for any other clamp (``clamp(0, width - 1)`` keeps coordinates in an
    image; a bound given as a tensor is not read: that would wait for the device)."""
    if not _number(low) or low != 0:
        return None
    return "relu" if high is None or (_number(high) and high == 6) else None


_peek_transform = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
# The autograd node running now: not None while a backward runs (a checkpoint's recompute).
_current_node = getattr(torch._C, "_current_autograd_node", lambda: None)


def ordinary_autograd() -> bool:
    """Whether the code running now is an ordinary forward/backward that the probe reads: not
    under inference mode (no training there, and its tensors cannot be written into the
    probe's buffers) nor inside a ``torch.func`` transform (vmap/grad/jvp wrap the tensors,
    and the probe's in-place ops on them are refused), nor a forward that a backward runs (the
    recompute of ``torch.utils.checkpoint``: the step's forward was read already)."""
    return (not torch.is_inference_mode_enabled() and _peek_transform() is None
            and _current_node() is None)


def autocast_dtype(device_type: str) -> Optional[str]:
    """The dtype autocast runs ``device_type`` ops in now ("bfloat16"); None when it is off."""
    if not hasattr(torch, "get_autocast_dtype") or not torch.is_autocast_enabled(device_type):
        return None
    return str(torch.get_autocast_dtype(device_type)).replace("torch.", "")


def training_forward() -> bool:
    """Whether a forward running now can be the training step's: autograd on, ordinarily."""
    return torch.is_grad_enabled() and ordinary_autograd()


def compiled_inside(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule is a ``torch.compile`` wrapper (its compiled code runs
    no hook: observed steps must run it eagerly)."""
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module) for m in model.modules())


def strided(t: torch.Tensor) -> bool:
    """A dense tensor the statistics can read (not sparse, not nested, not on the meta
    device)."""
    return t.layout == torch.strided and not t.is_nested and t.device.type != "meta"


def is_leaf_module(module: nn.Module) -> bool:
    """Whether ``module`` is a layer of its own: no children, or only the ``parametrizations``
    of a parametrized module (``weight_norm``, ``spectral_norm``: a ``ParametrizedConv2d``
    is a convolution whose weight is computed when its forward reads it)."""
    return all(name == "parametrizations" and parametrize.is_parametrized(module)
               for name, _ in module.named_children())


def parametrization_modules(model: nn.Module) -> set:
    """The modules that compute parametrized tensors (their outputs are weights, not
    activations: they run inside the forward of the layer that reads the weight)."""
    return {m for module in model.modules() if parametrize.is_parametrized(module)
            for m in module.parametrizations.modules()}


def first_float_tensor(obj: Any, depth: int = 0) -> Optional[torch.Tensor]:
    """The first dense floating-point tensor in a (nested, at most 4 deep: an output can
    refer to itself) module output, or None."""
    if isinstance(obj, torch.Tensor):
        return obj if (obj.is_floating_point() or obj.is_complex()) and strided(obj) else None
    if depth >= 4:
        return None
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dataclass_fields__"):
        items = (getattr(obj, f) for f in obj.__dataclass_fields__)
    else:
        return None
    for item in items:
        found = first_float_tensor(item, depth + 1)
        if found is not None:
            return found
    return None


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """The values a tensor stores, as a strided tensor: itself, or for a sparse tensor (a sparse
    embedding's gradient) its values, duplicates of a COO index summed first, so that their norm
    and NaN/Inf are the tensor's (``coalesce`` syncs with the host on CUDA: sparse only)."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()


@dataclass(frozen=True)
class ModuleInfo:
    """What the hooks need to know of a module, worked out once per module."""

    name: str
    type: str
    kind: Optional[str]
    has_params: bool
    channel_first: bool
    opaque: bool


@dataclass
class Point:
    """One observation point and its device accumulators for the current step."""

    key: tuple
    module: str
    type: str
    op: str
    kind: Optional[str]
    depth: int
    unit_dim: Optional[int] = None
    shape: tuple = ()
    act_rows: list = field(default_factory=list)
    # The probe's call count at each of this step's calls (one per act_rows entry).
    call_counts: list = field(default_factory=list)
    grad_rows: list = field(default_factory=list)
    # Per-unit max (and min, GELU family) over every observed call: the "ever active" record.
    unit_hi: Optional[torch.Tensor] = None
    unit_lo: Optional[torch.Tensor] = None
    backward_order: Optional[int] = None
    # Whether the tensor at this point has its channels in dim 1 (None: not known).
    channel_first: Optional[bool] = None


@dataclass(frozen=True)
class NormCall:
    module: str
    shape: tuple
    training: bool


# What the probes of one thread share: whether a probe's own code runs (its ops are none of
# the model's, for any probe's data-flow mode), and the probe of a trainlint.check in
# progress (another probe on the model, a Monitor's, leaves the check's steps alone).
_SHARED = threading.local()


@contextlib.contextmanager
def exclusive(probe: Probe) -> Any:
    """Within it, only ``probe`` observes: other probes skip the forwards and optimizer steps
    that run (a ``trainlint.check`` called inside a monitored training loop)."""
    before = getattr(_SHARED, "exclusive", None)
    _SHARED.exclusive = probe
    try:
        yield
    finally:
        _SHARED.exclusive = before


class _ProbeMode(TorchFunctionMode):
    """Sees every torch function during the root forward (but inside the ``torch.nn`` leaves
    whose outputs the leaf hooks read): functional activations and flow."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe: Optional[Probe] = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        probe = self.probe
        if probe is None or probe.busy or (probe.stack and probe.info(probe.stack[-1]).opaque):
            return out
        probe.busy = True
        try:
            if func is F.scaled_dot_product_attention:
                probe.attention_calls.add(probe.current_module_name())
            elif func in FUNCTIONAL_NORMS:
                probe.norm_functions[probe.current_module_name()] = FUNCTIONAL_NORMS[func]
            op = functional_kind(func, args, kwargs)
            if op is not None and not probe.inside_activation_module():
                probe.on_functional(op, args, out)
            else:
                probe.propagate(getattr(func, "__name__", "op"), args, kwargs, out)
        finally:
            probe.busy = False
        return out


class Probe:
    """Attach to a model; observe the steps you ask for; hand back device statistics.

    Usage: ``attach()``, then for each observed step ``begin_step()`` ... training step ...
    ``collect()`` (the one host sync), and ``detach()`` at the end (idempotent).
    """

    def __init__(self, model: nn.Module, optimizer: Any = None) -> None:
        self.model = model
        # The optimizers whose steps are read: one, or several that each step part of the
        # model's parameters (SparseAdam + Adam, Muon + AdamW).
        self.optimizers: list = optimizers_of(optimizer)
        unhooked = next((o for o in self.optimizers if unhookable(o)), None)
        if unhooked is not None:
            raise ConfigError(f"the optimizer {type(unhooked).__name__} skips "
                              "Optimizer.__init__, so torch runs no hooks on its step(), and it "
                              "keeps no optimizer that trainlint could watch instead: pass the "
                              "optimizers it steps (a list where there are several)")
        self.names = {m: n for n, m in model.named_modules()}
        self.infos: dict[nn.Module, ModuleInfo] = {}
        self.param_names = {p: n for n, p in model.named_parameters()}
        self.handles: list[RemovableHandle] = []
        self.tensor_handles: list[RemovableHandle] = []
        self.points: dict[tuple, Point] = {}
        self.observing = False
        # The dtype autocast ran the observed layers in ("bfloat16", "float16"; None: none
        # seen), read inside the forward: a wrapper around ``model.forward`` (accelerate,
        # transformers' Trainer) enters autocast after the root's hooks and leaves it before.
        self.autocast: Optional[str] = None
        self.stack: list[nn.Module] = []
        # ``(module, mode, depth)``: the mode taken off the torch-function stack while
        # ``module`` runs, and the stack's depth without it.
        self.suspended: list[tuple] = []
        self.call_counts: dict[tuple, int] = {}
        # (module, op) -> {(producer node, via, units): label}: the point of an activation's
        # call that an earlier call fed by the same producer made (see _observe).
        self.fed_by: dict[tuple, dict] = {}
        self.counter = 0
        self.bw_counter = 0
        # The backward passes of an observed step, split by the optimizer steps between them:
        # the current segment, whether an optimizer stepped since a gradient hook fired, each
        # segment's modules whose output gradient a hook saw, each optimizer's segment.
        self.segment = 0
        self.stepped_since_backward = False
        self.segment_modules: dict[int, set] = {}
        self.opt_segment: dict[int, int] = {}
        # Whether, at an observed step, an optimizer stepped on one backward and another
        # backward ran through the modules it steps (a GAN: see _note_competing).
        self.competing = False
        self.last_layout_channel_first = False
        self.producers: dict[int, tuple] = {}
        # id(tensor) -> (weakref, [(("input", name), via), ...]): the model inputs joined into a
        # tensor by a concatenation beside the operand its producer entry follows (a tabular
        # model's numeric columns after its embeddings).
        self.joined: dict[int, tuple] = {}
        # id(tensor) -> (weakref, its channel dim): tensors whose dims a permute/transpose of a
        # point's output reordered (the channels are then neither dim 1 nor the last by rule).
        self.channel_at: dict[int, tuple] = {}
        self.edges: set[tuple] = set()
        # See RunTrace.op_sites.
        self.op_sites: dict[tuple, str] = {}
        # See RunTrace.module_ops (sets here).
        self.module_ops: dict[str, set] = {}
        self.output_origins: list[tuple] = []
        # Whether the last forward's output origins were put in the loss's order.
        self.origins_ordered = False
        # Per training forward of the step (the last MAX_FORWARDS), ``(grad_fn, shape)`` of
        # each output: where a loss's autograd graph meets the model (read after the
        # backward; dropped at the step's end).
        self.output_nodes: list[list] = []
        self.input_rows: list[tuple] = []
        # (name, shape, device vector of stats.target_range, the output's origin) of the
        # target a comparing loss set a model output against.
        self.target_rows: list[tuple] = []
        # nn.LSTM -> the moments of its first input in the step (gates.py).
        self.lstm_inputs: dict = {}
        # Full reads for the exact NaN/Inf presence where no point looks: each float input of
        # a training forward ``(name, probe)``, and each output of a module with children
        # that its own code made ``(name, key of the last point observed before it, probe)``.
        self.input_probes: list[tuple] = []
        self.container_probes: list[tuple] = []
        self.last_key: Optional[tuple] = None
        # The model's integer and bool inputs (token ids, padding masks), by name.
        self.masks: set = set()
        # The run's inputs are described by the first observed batch (the trace keeps that one);
        # with ``inputs_every_step`` (a check's few steps, where reading them costs nothing that
        # matters) every observed batch is read, and the trace widens their range.
        self.inputs_seen = False
        self.inputs_every_step = False  # (else later batches: their first LATER_INPUT_ROWS)
        self.norm_calls: list[NormCall] = []
        # The modules whose own forward called F.scaled_dot_product_attention, and those that
        # called a functional norm (name -> the norm's torch.nn class name).
        self.attention_calls: set = set()
        self.norm_functions: dict = {}
        # The user's leaf modules without weights whose output was made from their first input
        # by plain ops the mode followed (a causal conv's Chomp1d: x[:, :, :-n].contiguous()):
        # name -> those ops; ``MIXED`` where calls differed.
        self.inner_ops: dict = {}
        self.failed_module: Optional[str] = None
        # What that module was fed: per positional argument, (dtype, shape) of a tensor, else
        # its type's name.
        self.failed_args: list = []
        # ``(train/eval flags, batch size)`` of this step's first forward with autograd on, of
        # the last such forward, and of the first forward whose output a backward reached (the
        # training forward, not a validation run before it without no_grad).
        self.first_forward: Optional[tuple] = None
        self.last_forward: Optional[tuple] = None
        self.trained_forward: Optional[tuple] = None
        # Per optimizer (by id), its parameters sampled around its step; per group of them, the
        # sums of squares of the weight before the step and of the update.
        self.samplers: dict[int, UpdateSampler] = {}
        self.update_sums: list[tuple] = []
        # id(parameter) -> (device, row) of its gradient, read before the optimizer's step.
        self.step_grads: dict[int, tuple] = {}
        # Whether an optimizer's step began since ``begin_step`` (a micro-batch of gradient
        # accumulation has none).
        self.optimizer_stepped = False
        # Whether a watched optimizer's own step ran in an observed step, and the classes of
        # the optimizers they wrap whose steps ran (a SAM whose second_step() steps its base
        # optimizer, a wrapper whose step() torch never hooked).
        self.own_step_seen = False
        self.wrapped_stepped: set = set()
        # The param groups' learning rates as the observed step's first optimizer step began
        # (a scheduler stepped after it changes them before the collect).
        self.step_lrs: Optional[dict] = None
        # The optimizers that stepped with no gradient on any of their parameters.
        self.gradless_step: list = []
        # Optimizers not given to the probe that stepped the model's parameters in the observed
        # step (a Monitor's loop that built a new one), seen where ``watch_others`` is set.
        self.watch_others = False
        self.unwatched: list = []
        # Weak references to every such optimizer seen so far.
        self.others: list = []
        # A Monitor's watch on gradients carried from one optimizer step to the next (armed
        # after each observed step's update; None in a check, whose loop zeroes them).
        self.carry: Any = None
        # A Monitor's watch on gradients cleared between an observed step's backward and its
        # optimizer's step (None in a check, whose loop steps them in order).
        self.cleared: Any = None
        # The parameters no optimizer holds, their norms as the observed step began, and as
        # its (training) forward began and ended: what the forward changes (an embedding's
        # max_norm) is the model's doing, what changes outside it the loop's (an EMA).
        self.outside: Optional[tuple] = None
        self.outside_forward: list = [None, None]
        self.mode: Optional[_ProbeMode] = None
        # The probe's modes whose forward ended without its hooks: popped once innermost.
        self.stale_modes: list[_ProbeMode] = []
        # This root forward is not read (autograd off, inference mode, a torch.func transform).
        self.skipping = False
        # Per device: the statistics batches of the observed step (their buffers are reused).
        self.batches: dict[torch.device, tuple] = {}
        # The points observed with autograd off inside the step's training forward (no gradient
        # hook can go on their outputs), and the modules whose forward ran again inside a
        # backward (torch.utils.checkpoint's recompute): reentrant checkpointing, for both.
        self.gradless: set = set()
        self.recomputed: set = set()
        self.attached = False
        # The modules the hooks went on, in order (a change re-hooks them all).
        self.hooked: list[nn.Module] = []

    @property
    def busy(self) -> bool:
        """Whether a probe's own code runs in this thread (shared: another probe's data-flow
        mode must not read its ops as the model's either)."""
        return getattr(_SHARED, "busy", False)

    @busy.setter
    def busy(self, value: bool) -> None:
        _SHARED.busy = value

    def _foreign(self) -> bool:
        """Whether another probe observes alone now (:func:`exclusive`)."""
        holder = getattr(_SHARED, "exclusive", None)
        return holder is not None and holder is not self

    # ---------------------------------------------------------------- lifecycle
    def attach(self) -> Probe:
        """Arm the probe on the model. Its hooks sit on the model only while a step is observed
        (``begin_step`` to ``end_step``), so training between observations runs untouched."""
        self.attached = True
        if self.observing:
            self._install()
        return self

    def _install(self) -> None:
        modules = list(self.model.modules())
        changed = bool(self.hooked) and (len(modules) != len(self.hooked) or any(
            a is not b for a, b in zip(modules, self.hooked)))
        if self.handles and not changed:
            return
        if changed:  # modules were added, removed or replaced since: name and hook all anew
            self._uninstall()
            self.names = {m: n for n, m in self.model.named_modules()}
            self.param_names = {p: n for n, p in self.model.named_parameters()}
            self.infos.clear()
        self.hooked = modules
        root = self.model
        add = self.handles.append
        add(root.register_forward_pre_hook(OwnedHook(self._root_pre), with_kwargs=True))
        enter, leave, leave_leaf = (OwnedHook(self._enter), OwnedHook(self._leave_container),
                                    OwnedHook(self._leave_leaf))
        norm_input = OwnedHook(self._norm_input)
        computing_weights = parametrization_modules(root)
        for module in root.modules():
            if module in computing_weights:
                continue
            add(module.register_forward_pre_hook(enter))
            leaf = is_leaf_module(module)
            add(module.register_forward_hook(leave_leaf if leaf else leave, always_call=True))
            if isinstance(module, NORM_TYPES):
                add(module.register_forward_pre_hook(norm_input))
        # After the root's own leave hook, which reads its output while the mode still runs.
        add(root.register_forward_hook(OwnedHook(self._root_post), always_call=True))
        if self.watch_others:  # any optimizer's step, to see one the probe was not given
            add(register_optimizer_step_post_hook(OwnedHook(self._any_opt_step)))
        for optimizer in self.optimizers:
            add(optimizer.register_step_pre_hook(OwnedHook(self._before_opt_step)))
            add(optimizer.register_step_post_hook(OwnedHook(self._after_opt_step)))
            for inner in wrapped_optimizers(optimizer, self.optimizers):
                add(inner.register_step_pre_hook(OwnedHook(self._wrapped_step)))

    def _uninstall(self) -> None:
        self._drop_step_hooks()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _drop_step_hooks(self) -> None:
        """Leave the mode and remove the tensor hooks of the step; module hooks stay."""
        self._exit_mode()
        for handle in self.tensor_handles:
            handle.remove()
        self.tensor_handles.clear()
        self.stack.clear()

    def detach(self) -> None:
        """Remove every hook this probe attached and leave no mode on the stack."""
        self._uninstall()
        if self.cleared is not None:
            self.cleared.disarm()
            self.cleared.take()
        self.observing = False
        self.attached = False

    def begin_step(self) -> None:
        """Observe the next forward/backward/optimizer step (hooks go on the model now)."""
        self.observing = True
        self.optimizer_stepped = False
        self.step_lrs = None
        self.gradless_step = []
        self.unwatched = []
        self.failed_module = None
        self.failed_args = []
        self.first_forward = self.trained_forward = None
        self.stack.clear()  # left over by a forward a KeyboardInterrupt ended
        self.gradless.clear()  # left over by a step that ended without its collect
        # Each step counts its calls anew (else a loop that calls the model's children and
        # never the model itself, whose forward clears them, labels each step's calls #1, #2...).
        self.call_counts.clear()
        self.recomputed.clear()
        self._clear_segments()
        self.outside = self._outside_fingerprints()
        self.outside_forward = [None, None]
        if self.attached:
            self._install()
            if self.cleared is not None:
                self.cleared.arm(self.optimizers)

    def _outside_fingerprints(self) -> Optional[tuple]:
        """The trainable parameters no optimizer holds, with the float64 norm of each as the
        step starts (a full read of each, done for these alone: usually there are none), so
        the step's collect tells whether the user's code changed them (a moving-average
        target updated after ``optimizer.step()``); None without an optimizer."""
        if not self.optimizers:
            return None
        held = optimizer_groups(self.optimizers)
        named = [(n, p) for n, p in self.model.named_parameters()
                 if p.requires_grad and id(p) not in held and strided(p)]
        if not named:
            return None
        return named, self._fingerprints_of(named)

    def _outside_now(self) -> Optional[torch.Tensor]:
        """The fingerprints of the parameters no optimizer holds, now (None: none)."""
        return None if self.outside is None else self._fingerprints_of(self.outside[0])

    def _fingerprints_of(self, named: list) -> torch.Tensor:
        return _fingerprints([p for _, p in named], _model_device(self.model))

    def end_step(self, keep_hooks: bool = False) -> None:
        """Stop observing: take the hooks off (``keep_hooks``: leave the module and optimizer
        hooks on, idle, for a next step that is observed too); drop per-step bookkeeping that
        references tensors."""
        self.observing = False
        if keep_hooks:
            self._drop_step_hooks()
        else:
            self._uninstall()
        if self.cleared is not None:
            self.cleared.disarm()
        self.producers.clear()
        self.joined.clear()
        self.channel_at.clear()
        self.output_nodes = []
        self.step_grads.clear()
        self._clear_samples()
        self.update_sums.clear()
        self.input_probes.clear()
        self.container_probes.clear()

    def take_off(self) -> None:
        """Remove the hooks that :meth:`end_step` left on (no-op while observing)."""
        if not self.observing:
            self._uninstall()

    # ---------------------------------------------------------------- module stack
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.suspended:  # the last forward was interrupted inside a torch.nn leaf
            self._exit_mode()  # (drops the stale modes too)
        else:
            self._drop_stale_modes()
        # A forward of the model with autograd off (an evaluation between the observed step's
        # start and monitor.step()) is not the training step's: it is not read.
        self.skipping = not training_forward() or self._foreign()
        if not self.observing or self.skipping:
            return
        self._install()  # a module replaced since begin_step (the same step) gets its hooks
        if self.outside is not None and self.outside_forward[0] is None:
            self.outside_forward[0] = self._outside_now()
        inputs = _named_inputs(args, kwargs)
        self.last_forward = (training_flags(self.model), leading_size([t for _, t in inputs]))
        if self.first_forward is None:
            self.first_forward = self.last_forward
        self.call_counts.clear()
        self.producers.clear()
        self.joined.clear()
        self.channel_at.clear()
        self.last_key = None
        self.busy = True
        try:
            for name, t in inputs:
                self.producers[id(t)] = (weakref.ref(t), ("input", name), ())
                if not (t.is_floating_point() or t.is_complex()):
                    self.masks.add(name)
                self._probe_batch(name, t)
                if ((t.is_floating_point() or t.dtype in RAW_INTS)
                        and strided(t) and t.dim() >= 1 and t.numel() > 0):
                    full = not self.inputs_seen or self.inputs_every_step
                    self._record_input(name, t, None if full else LATER_INPUT_ROWS)
        finally:
            self.busy = False
        if self.mode is None:
            self.mode = _ProbeMode(self)
            self.mode.__enter__()

    def record_targets(self, targets: Any) -> None:
        """Probe each floating-point target tensor the loss is given (a check's batch) for NaN,
        as the model's inputs are: a NaN target makes a NaN loss that is the data's fault."""
        if not self.observing:
            return
        tensors = tensors_in(targets)
        for i, t in enumerate(tensors):
            self._probe_batch("targets" if len(tensors) == 1 else f"targets[{i}]", t)

    def record_compared(self, index: int, target: torch.Tensor, count: int) -> None:
        """The target a comparing loss (MSE, L1, BCE...) set output ``index`` (of ``count``)
        against: its range, with the output's origin (before the loss's output moves first)."""
        origins = self.output_origins
        if not self.observing or len(origins) != count or origins[index] is None:
            return
        self.target_rows.append(("the loss's targets", tuple(target.shape),
                                 stats.target_range(target), origins[index]))

    def _probe_batch(self, name: str, t: torch.Tensor) -> None:
        """One device reduction that reads NaN when a floating-point batch tensor (a model
        input, a check's target) holds any, +inf when it holds ±Inf (TL504 blames the data
        then, for an Inf where a layer takes the tensor as it is: not a mask's -inf)."""
        if (t.is_floating_point() or t.is_complex()) and strided(t) and t.numel():
            with torch._C.DisableTorchFunction():
                self.input_probes.append((name, stats.batch_probe(t)))

    def _root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.mode is not None and output is not None and self.observing:
            outputs = tensors_in(output)
            self.output_origins = [self._origin_of(t) for t in outputs]
            self._hook_output_activations(outputs)
            self.origins_ordered = False
            self.output_nodes.append(output_nodes(outputs))
            del self.output_nodes[:-MAX_FORWARDS]
            self._on_backward(output, self.last_forward)
            if self.outside is not None and not self.skipping:
                self.outside_forward[1] = self._outside_now()
        self._exit_mode()
        self.skipping = False

    def _hook_output_activations(self, outputs: list) -> None:
        """Read the gradient at the model's outputs made by an activation whose output gradient
        the probe does not read elsewhere (``GRADIENT_FREE_KINDS``): the loss's gradient
        there is what the gradient profile compares the network's with."""
        hooked: set = set()
        with torch._C.DisableTorchFunction():
            for t, origin in zip(outputs, self.output_origins):
                if origin is None or origin[0][0] != "point" or not t.requires_grad:
                    continue
                point = self.points.get(origin[0][1:])
                if (point is not None and point.kind in GRADIENT_FREE_KINDS
                        and NORM_KEEPING_OPS.issuperset(origin[1]) and id(t) not in hooked):
                    hooked.add(id(t))
                    self.tensor_handles.append(t.register_hook(self._grad_hook(point)))

    def loss_output_first(self, index: Optional[int], count: int) -> bool:
        """Put output ``index`` (of ``count``), the one the loss read, first among the step's
        output origins (the rules read the model's output there: a dict's 'logits' after its
        'features', or after the 'loss' the model computed itself), once per forward;
        whether it moved."""
        origins = self.output_origins
        if (self.origins_ordered or index is None or not 0 < index < len(origins)
                or len(origins) != count):
            return False
        origins.insert(0, origins.pop(index))
        self.origins_ordered = True
        return True

    def _on_backward(self, output: Any, facts: Optional[tuple]) -> None:
        """Keep ``facts`` as the training forward's once a backward reaches ``output``."""
        if facts is None:
            return

        def reached(grad: Optional[torch.Tensor]) -> None:
            if self.trained_forward is None:
                self.trained_forward = facts

        for t in tensors_in(output):
            if t.requires_grad:
                self.tensor_handles.append(t.register_hook(reached))

    def _exit_mode(self) -> None:
        """Leave the probe's mode, if it is the innermost one; else (a forward interrupted by
        a KeyboardInterrupt, which skips the forward hooks, and a mode the user entered since)
        leave it to :meth:`_drop_stale_modes`, never popping the user's mode instead."""
        if self.mode is not None:
            mode, self.mode = self.mode, None
            mode.probe = None  # inert from now on
            if not any(off is mode for _, off, _ in self.suspended):  # else off the stack
                self.stale_modes.append(mode)
        self.suspended.clear()
        self._drop_stale_modes()

    def _drop_stale_modes(self) -> None:
        """Pop the probe's left-over modes that are innermost now."""
        while self.stale_modes:
            depth = torch._C._len_torch_function_stack()
            if not depth or torch._C._get_function_stack_at(depth - 1) is not self.stale_modes[-1]:
                return
            self.stale_modes.pop().__exit__(None, None, None)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if self.observing:
            self.stack.append(module)
            if self.mode is not None:
                self._link_inputs(args, ("module", self.names.get(module, "")),
                                  state_from=1 if isinstance(module, RECURRENT) else None)
                if self.info(module).opaque:
                    self._suspend_mode(module)

    def _suspend_mode(self, module: nn.Module) -> None:
        """Take the probe's mode off the torch-function stack while a ``torch.nn`` leaf whose
        output the leaf hook reads runs: the mode has nothing to follow inside it, and each op
        it sees costs a Python call (264 a step on ResNet-50). Only when it is innermost."""
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is self.mode:
            self.suspended.append((module, torch._C._pop_torch_function_stack(), depth - 1))

    def _resume_mode(self, module: nn.Module) -> None:
        """Put the mode back when ``module``'s forward is over, where it was: not above a mode
        that a hook entered meanwhile and will leave later (that mode's exit pops the top of
        the stack; the probe's mode then stays off for the rest of this forward)."""
        if self.suspended and self.suspended[-1][0] is module:
            if torch._C._len_torch_function_stack() == self.suspended[-1][2]:
                torch._C._push_on_torch_function_stack(self.suspended.pop()[1])

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._resume_mode(module)
        if not self.observing:
            return
        if output is None and sys.exc_info()[0] is not None and self.failed_module is None:
            self.failed_module = self.names.get(module, "")
            with torch._C.DisableTorchFunction():
                self.failed_args = [(str(a.dtype).replace("torch.", ""), tuple(a.shape))
                                    if isinstance(a, torch.Tensor) else type(a).__name__
                                    for a in args]
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def _leave_container(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A module with children is done: leave it, and read its output in full for NaN/Inf
        when its own code made it (not a point's output passed on as it is)."""
        self._leave(module, args, output)
        if output is None or self.mode is None or not self._reading():
            self._note_recompute(module)
            return
        with torch._C.DisableTorchFunction():
            tensor = first_float_tensor(output)
            if tensor is None:
                return
            name = self.names.get(module, "")
            if tensor.numel() and not self._passed_on(tensor):
                self.container_probes.append((name, self.last_key,
                                              stats.extremes_probe(tensor)))
            self._probe_other_outputs(name, self.last_key, output, tensor, args)

    def _passed_on(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a point's output or a model input as it is (their reads cover
        it)."""
        origin = self._origin_of(t)
        return origin is not None and origin[0][0] in ("point", "input") and not origin[1]

    def _probe_other_outputs(self, name: str, key: Optional[tuple], output: Any,
                             first: torch.Tensor, args: tuple) -> None:
        """Read the float tensors of a module's output beside ``first`` (its observed one) in
        full for NaN (a -inf there is a mask's, as in a model input): up to
        ``MAX_OTHER_OUTPUTS`` of them, not the module's inputs nor a point's output passed on
        as they are."""
        if isinstance(output, torch.Tensor):
            return
        inputs = {id(t) for t in tensors_in(args)}
        others = [t for t in tensors_in(output) if t is not first and id(t) not in inputs
                  and (t.is_floating_point() or t.is_complex()) and strided(t) and t.numel()]
        for t in others[:MAX_OTHER_OUTPUTS]:
            if not self._passed_on(t):
                self.container_probes.append((name, key, stats.nan_probe(t)))

    def _note_recompute(self, module: nn.Module) -> None:
        """Keep ``module``'s name when its forward runs inside a backward (the recompute of
        torch.utils.checkpoint)."""
        if self.observing and _current_node() is not None:
            self.recomputed.add(self.names.get(module, ""))

    def _leave_leaf(self, module: nn.Module, args: tuple, output: Any) -> None:
        """A leaf module's forward is over: leave it, then observe its output (None when its
        forward raised)."""
        self._leave(module, args, output)
        if output is not None:
            self._leaf_output(module, args, output)

    def info(self, module: nn.Module) -> ModuleInfo:
        """The cached :class:`ModuleInfo` of ``module``."""
        found = self.infos.get(module)
        if found is None:
            found = self.infos[module] = ModuleInfo(
                name=self.names.get(module, ""), type=type(module).__name__,
                kind=activation_kind(module),
                has_params=(any(True for _ in module.parameters(recurse=False))
                            or parametrize.is_parametrized(module)),
                channel_first=isinstance(module, CHANNEL_FIRST_TYPES),
                opaque=type(module) in OPAQUE_LEAVES)
        return found

    def inside_activation_module(self) -> bool:
        return bool(self.stack) and self.info(self.stack[-1]).kind is not None

    def current_module_name(self) -> str:
        return self.names.get(self.stack[-1], "") if self.stack else ""

    # ---------------------------------------------------------------- observation
    def _reading(self) -> bool:
        """Whether the hooks read what runs now: an observed step, a forward not skipped at the
        root, and no inference mode or torch.func transform inside it."""
        return self.observing and not self.skipping and ordinary_autograd()

    def _leaf_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._reading():
            self._note_recompute(module)
            return
        # The probe's mode would see every tensor method called here (``dim()``, ``shape``).
        with torch._C.DisableTorchFunction():
            self._observe_output(module, args, output)
            x = gates.lstm_input(module, args)
            if x is not None and module not in self.lstm_inputs:
                self.lstm_inputs[module] = gates.input_moments(x)

    def _observe_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        tensor = first_float_tensor(output)
        if tensor is None:
            return
        if self.autocast is None:
            self.autocast = autocast_dtype(tensor.device.type)
        self.busy = True
        try:
            info = self.info(module)
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            own = True if info.channel_first else (False if info.has_params else None)
            if not info.has_params and info.kind is None and not info.opaque \
                    and source is not None:
                self._note_inner_ops(info.name, source, tensor)
            point = self._observe(info.name, info.type, "output", info.kind, tensor, source,
                                  own)
            self._set_producer(tensor, point.key)
            self._probe_other_outputs(info.name, point.key, output, tensor, args)
            if info.channel_first:
                self.last_layout_channel_first = True
            elif info.kind is None and info.has_params:
                self.last_layout_channel_first = False
        finally:
            self.busy = False

    def _note_inner_ops(self, name: str, source: torch.Tensor, out: torch.Tensor) -> None:
        """Keep the ops by which a leaf module's forward made ``out`` from ``source``, when
        the mode followed them there (before the output becomes the module's point)."""
        given, got = self._origin_of(source), self._origin_of(out)
        if given is None or got is None or got[0] != given[0] \
                or got[1][:len(given[1])] != given[1]:
            ops: tuple = MIXED
        else:
            ops = got[1][len(given[1]):]
        keep_inner_ops(self.inner_ops, name, ops)

    def on_functional(self, op: str, args: tuple, out: Any) -> None:
        tensor = out if isinstance(out, torch.Tensor) and out.is_floating_point() else None
        if tensor is None or not strided(tensor) or not self._reading():
            return
        info = self.info(self.stack[-1] if self.stack else self.model)
        origins = [o for o in (self._origin_of(t) for t in tensors_in(args)) if o is not None]
        point = self._observe(info.name, info.type, op, op, tensor,
                              next(iter(tensors_in(args)), None))
        for src, via in origins:
            self.edges.add((src, ("point",) + point.key, via))
        self._set_producer(tensor, point.key)

    def _observe(self, name: str, type_name: str, op: str, kind: Optional[str],
                 tensor: torch.Tensor, source: Optional[torch.Tensor] = None,
                 layout: Optional[bool] = None) -> Point:
        """Observe ``tensor``, made from ``source`` (the layout of its channels follows the
        point that made ``source``, else the last layer with parameters); ``layout``: the
        channel layout a module's own output has whatever its input (Conv: first; Linear:
        last)."""
        channel_first = self._layout_from(source)
        if channel_first is None:
            channel_first = self.last_layout_channel_first
        moved = self._channel_dim(source, tensor.dim())
        if moved is not None:  # reordered on the way here: the channels are where they went
            channel_first = tensor.dim() >= 3 and moved == 1
        unit_dim = None
        if kind in UNIT_KINDS and tensor.dim() >= 1:
            unit_dim = 1 if (tensor.dim() >= 3 and channel_first) else -1
            if tensor.dim() == 1:
                unit_dim = 0
            elif moved is not None:
                unit_dim = moved if moved < tensor.dim() - 1 else -1
        units = tensor.shape[unit_dim] if unit_dim is not None else None
        count_key = (name, op)
        index = self.call_counts.get(count_key, 0)
        self.call_counts[count_key] = index + 1
        # Each call of a functional activation, or of an activation module used twice (a ResNet
        # block's one nn.ReLU), is a point of its own: its units are other units. Other modules'
        # calls share their point.
        label = op if (index == 0 or (op == "output" and kind is None)) else f"{op}#{index}"
        if kind is not None and source is not None:
            # Unless a call takes what an earlier call took from the same producer (a shared
            # tower run once per input of a Siamese net): the same units, the same point.
            origin = self._origin_of(source)
            if origin is not None:
                label = self.fed_by.setdefault((name, op), {}).setdefault(
                    (origin[0], origin[1], units), label)
        key = (name, label, units)
        point = self.points.get(key)
        if point is None:
            point = Point(key=key, module=name, type=type_name, op=label, kind=kind,
                          depth=self.counter, unit_dim=unit_dim, shape=tuple(tensor.shape),
                          channel_first=layout if layout is not None else (
                              channel_first if tensor.dim() >= 3 else None))
            self.points[key] = point
        point.call_counts.append(self.counter)
        self.counter += 1
        self.last_key = key
        grad_enabled = torch.is_grad_enabled()
        # Our own ops bypass the probe's TorchFunctionMode (it only needs the user's ops) and
        # autograd (nothing to record: no detach op per read).
        with torch._C.DisableTorchFunction():
            torch._C._set_grad_enabled(False)
            try:
                self._read_output(point, tensor, unit_dim, kind)
            finally:
                torch._C._set_grad_enabled(grad_enabled)
            if tensor.requires_grad and grad_enabled:
                if kind not in GRADIENT_FREE_KINDS:  # (the model's output: _root_post)
                    self.tensor_handles.append(tensor.register_hook(self._grad_hook(point)))
            elif not grad_enabled:
                self.gradless.add(key)
        return point

    def _read_output(self, point: Point, tensor: torch.Tensor, unit_dim: Optional[int],
                     kind: Optional[str]) -> None:
        """``tensor``'s per-unit record (ReLU/GELU family) and its row."""
        known = None
        if unit_dim is not None and tensor.numel():  # an empty call is no evidence
            hi, lo = stats.unit_extremes(tensor, unit_dim, kind)
            point.unit_hi = hi if point.unit_hi is None else torch.maximum(point.unit_hi, hi)
            if lo is not None:
                point.unit_lo = (lo if point.unit_lo is None
                                 else torch.minimum(point.unit_lo, lo))
            if tensor.numel() > stats.SAMPLE_ABOVE:  # the record read it all: reuse that
                known = _known_extremes(tensor, hi, lo)
        acts = self._batches(tensor.device)[0]
        point.act_rows.append((tensor.device, acts.add(tensor, kind, known)))

    def _grad_hook(self, point: Point) -> Callable[[torch.Tensor], None]:
        def hook(grad: Optional[torch.Tensor]) -> None:
            if grad is None:  # the backward reached the node that made this output, not the
                return  # output itself (an unused chunk; cuDNN RNN's output beside its h_n)
            if point.backward_order is None:
                point.backward_order = self.bw_counter
            self.bw_counter += 1
            if self.stepped_since_backward:  # a backward after an optimizer step: another loss
                self.segment += 1
                self.stepped_since_backward = False
            self.segment_modules.setdefault(self.segment, set()).add(point.module)
            with torch._C.DisableTorchFunction():
                point.grad_rows.append((grad.device, self._batches(grad.device)[1].add(
                    grad, full_pass=True)))
        return hook

    def _batches(self, device: torch.device) -> tuple:
        """This step's statistics batches on ``device``: activations, and the moments of
        output gradients, parameters and their gradients."""
        pair = self.batches.get(device)
        if pair is None:
            pair = self.batches[device] = (stats.ActivationBatch(device),
                                           stats.MomentBatch(device))
        return pair

    def _record_input(self, name: str, t: torch.Tensor, rows: Optional[int] = None) -> None:
        """Per-channel mean, std, min and max of a model input over its finite elements, for
        the channel dim 1 (images, sequences of channels) and the last dim (features), of
        about ``rows`` samples spread evenly over the batch where given (a batch sorted within,
        by length or class, is not read by one end). Two float64 temporaries the size read,
        whatever its rank."""
        x = t.detach()
        if rows is not None and x.dim() >= 1 and x.shape[0] > rows:
            x = x[::-(-x.shape[0] // rows)]
        x = x.to(torch.float64, copy=True)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        work = torch.empty_like(x)
        dims = [1, x.dim() - 1] if x.dim() >= 3 else [x.dim() - 1]
        others = [[d for d in range(x.dim()) if d != dim] for dim in dims]
        big = torch.finfo(torch.float64).max  # what a channel with no finite value reports
        torch.nan_to_num(x, nan=big, posinf=big, neginf=big, out=work)
        lows = [work.amin(o) for o in others]
        torch.nan_to_num(x, nan=-big, posinf=-big, neginf=-big, out=work)
        highs = [work.amax(o) for o in others]
        torch.mul(x, 0, out=work).nan_to_num_(1.0)
        missing = [work.sum(o, keepdim=True) for o in others]
        z = x.nan_to_num_(0.0, 0.0, 0.0)
        for dim, o, lo, hi, gone in zip(dims, others, lows, highs, missing):
            n = (x.numel() // x.shape[dim] - gone).clamp(min=1)
            mean = z.sum(o, keepdim=True) / n
            squares = torch.sub(z, mean, out=work).square_().sum(o, keepdim=True)
            var = (squares - gone * mean * mean) / n
            value = torch.stack([mean.reshape(-1), var.clamp(min=0).sqrt().reshape(-1), lo, hi,
                                 n.reshape(-1).to(lo.dtype)])  # (the values read per channel)
            self.input_rows.append((name, tuple(t.shape), str(t.dtype).replace("torch.", ""),
                                    dim if t.dim() > 1 else 0, value))

    def _norm_input(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and self._reading():
            with torch._C.DisableTorchFunction():
                shape = tuple(args[0].shape)
            self.norm_calls.append(NormCall(self.names.get(module, ""), shape, module.training))

    # ---------------------------------------------------------------- data flow
    def _origin_of(self, t: torch.Tensor) -> Optional[tuple]:
        entry = self.producers.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    def _layout_from(self, source: Optional[torch.Tensor]) -> Optional[bool]:
        """The channel layout of ``source`` when it comes from an observed point through
        element-wise ops only (an SE gate's product keeps the conv's layout), else None."""
        origin = None if source is None else self._origin_of(source)
        if origin is None or origin[0][0] != "point" or not ELEMENTWISE_OPS.issuperset(origin[1]):
            return None
        point = self.points.get(origin[0][1:])
        return None if point is None else point.channel_first

    def _set_producer(self, t: torch.Tensor, key: tuple) -> None:
        if self.mode is not None:
            self.producers[id(t)] = (weakref.ref(t), ("point",) + key, ())

    def _link_inputs(self, args: Any, dst: tuple, state_from: Optional[int] = None) -> None:
        """Edges from the producers of the tensors in ``args`` to ``dst``; from argument
        ``state_from`` on (an RNN's ``hx``) a model input is a recurrent state carried over
        from the last batch (the word-language-model example's ``model(data, hidden)``), not
        data: no edge from it."""
        for i, arg in enumerate(args):
            for t in tensors_in(arg):
                origin = self._origin_of(t)
                if origin is None or (state_from is not None and i >= state_from
                                      and origin[0][0] == "input"):
                    continue
                self.edges.add((origin[0], dst, origin[1]))
                if self.joined:
                    for src, via in self._joined_of(t):
                        self.edges.add((src, dst, via))

    def _joined_of(self, t: torch.Tensor) -> list:
        """The model inputs joined into ``t`` beside its producer: ``[(src, via), ...]``."""
        entry = self.joined.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else []

    def _join(self, op: str, tensors: list, outs: list) -> None:
        """Keep, for the outputs of ``op``, the model inputs among its operands (and those
        joined into them) that its producer entry does not follow: a concatenation passes
        every operand on; any other op passes on what its first operand carries."""
        primary = self._origin_of(outs[0]) if outs else None
        found = []
        for t in (tensors if op in CONCAT_OPS else tensors[:1]):
            origin = self._origin_of(t)
            if op in CONCAT_OPS and origin is not None and origin[0][0] == "input":
                found.append((origin[0], origin[1] + (op,)))
            found += [(src, via + (op,)) for src, via in self._joined_of(t)]
        found = [(src, via) for src, via in found
                 if len(via) <= MAX_VIA and (primary is None or src != primary[0])]
        if found:
            for t in outs:
                self.joined[id(t)] = (weakref.ref(t), found[:MAX_JOINED])

    def propagate(self, op: str, args: tuple, kwargs: dict, out: Any) -> None:
        """Carry producer tags through plain ops (views, arithmetic) so edges span them."""
        if not self.observing:
            return
        noted = _module_op(op, args, kwargs)
        risky = noted is not None and op in RISKY_OPS
        if noted is not None:
            self.module_ops.setdefault(self.current_module_name(), set()).add(noted)
        tensors = tensors_in(args)
        origins = [(i, o) for i, o in enumerate(self._origin_of(t) for t in tensors)
                   if o is not None]
        if not origins:
            return
        outs = tensors_in(out)
        if outs and tensors and origins[0][0] == 0:
            self._carry_channel(op, args, kwargs, tensors[0], outs)
        if outs and tensors and outs[0] is tensors[0] and origins[0][0] == 0:
            # In place (x.sub_(m), out += identity): the tensor now holds the op's result.
            src, via = origins[0][1]
            if len(via) < MAX_VIA:
                self.producers[id(outs[0])] = (weakref.ref(outs[0]), src, via + (op,))
                if risky:
                    self._note_site((src, via + (op,)))
        for i, (src, via) in origins[:2]:
            if len(via) >= MAX_VIA:
                continue
            if risky:
                self._note_site((src, via + (op,)))
            for t in outs:
                if id(t) not in self.producers or self._origin_of(t) is None:
                    self.producers[id(t)] = (weakref.ref(t), src, via + (op,))
            if op in GATE_OPS and self._gates(tensors, i):
                self.edges.add((src, ("op", op), via))
        if op in SUM_OPS and len(origins) >= 2:
            # Two paths of the forward join (a residual x + f(x)): each reaches the sum, the
            # right-hand one too (the result carries only the left-hand one's origin).
            for _, (src, via) in origins:
                if src[0] == "point" and len(via) < MAX_VIA:
                    self.edges.add((src, ("sum", op), via + (op,)))
        if outs and (op in CONCAT_OPS or self.joined):
            self._join(op, tensors, outs)

    def _note_site(self, key: tuple) -> None:
        """Record the module whose forward runs the risky op ending ``key``'s ops; None once
        two modules ran the same ops on the same source (then neither can be named)."""
        note_site(self.op_sites, key, self.current_module_name())

    def _channel_dim(self, t: Optional[torch.Tensor], ndim: int) -> Optional[int]:
        """The channel dim of ``t`` (a tensor of ``ndim`` dims) when a permute/transpose moved
        it on the way from a point, else None."""
        found = None if t is None else self.channel_at.get(id(t))
        if found is None or found[0]() is not t or t.dim() != ndim:
            return None
        return found[1]

    def _point_channel(self, t: torch.Tensor) -> Optional[int]:
        """The channel dim of a point's output ``t`` (through element-wise ops), if known."""
        moved = self._channel_dim(t, t.dim())
        if moved is not None:
            return moved
        layout = self._layout_from(t)
        if layout is None or t.dim() < 2:
            return None
        return 1 if (layout and t.dim() >= 3) else t.dim() - 1

    def _carry_channel(self, op: str, args: tuple, kwargs: dict, src: torch.Tensor,
                       outs: list) -> None:
        """Follow the channel dim of ``src`` through an op that moves dims (to where it goes)
        and through element-wise ops (where it stays)."""
        if op in DIM_MOVING_OPS:
            channel = self._point_channel(src)
            found = None if channel is None else _reordered(op, args, kwargs, channel,
                                                            src.dim())
        elif op in ELEMENTWISE_OPS:
            moved = self._channel_dim(src, src.dim())
            found = None if moved is None else (moved, src.dim())
        else:
            return
        if found is not None:
            moved, dims = found
            for t in outs:
                if t.dim() == dims:
                    self.channel_at[id(t)] = (weakref.ref(t), moved)

    def _gates(self, tensors: list, i: int) -> bool:
        """Whether ``tensors[i]`` multiplies a tensor of data (an SE, GLU or LSTM gate): not
        only scalars (a scaled tanh, ``1.7159 * tanh(x)``) nor a mask made from an integer or
        bool input of the model (padding)."""
        for j, t in enumerate(tensors):
            if j == i or t.numel() <= 1:
                continue
            origin = self._origin_of(t)
            if origin is not None and origin[0][0] == "input" and origin[0][1] in self.masks:
                continue
            return True
        return False

    # ---------------------------------------------------------------- optimizer
    def _wrapped_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        """An optimizer that a watched one wraps steps: the step's update happens (the
        observation does not run on past it), whether or not the wrapper's own step() runs."""
        if self.observing and not self._foreign():
            self.optimizer_stepped = True
            self.wrapped_stepped.add(type(optimizer).__name__)
            self._judge_cleared(optimizer, args, kwargs)

    def _before_opt_step(self, optimizer: Any, args: tuple, kwargs: dict) -> Optional[tuple]:
        if not self.observing or self._foreign():
            return None
        self.optimizer_stepped = True
        self.own_step_seen = True
        self.opt_segment[id(optimizer)] = self.segment
        self.stepped_since_backward = True
        if self.step_lrs is None:
            self.step_lrs = optimizer_groups(self.optimizers)
        closure = _closure_of(args, kwargs)
        self._judge_cleared(optimizer, args, kwargs)
        if not callable(closure):
            self._take_step_grads(optimizer)
            return None
        # A closure computes the gradients inside step() (Lightning's training step, LBFGS):
        # they are read when it first returns, before the update; the gradients here are the
        # last step's.
        read: list = []

        def reading_closure(*a: Any, **k: Any) -> Any:
            out = closure(*a, **k)
            if not read:
                read.append(True)
                self._take_step_grads(optimizer)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": reading_closure}
        return (args[0], reading_closure, *args[2:]), kwargs

    def _judge_cleared(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        """Whether the gradients the step's backward made were cleared before this step
        (:mod:`trainlint.gradclear`); a closure's step computes its own: not judged."""
        if self.cleared is None or not self.cleared.added:
            return
        params = optimizer_params([optimizer])
        if callable(_closure_of(args, kwargs)):
            self.cleared.forget(params)
        else:
            self.cleared.judge(params)

    def _clear_segments(self) -> None:
        self.segment = 0
        self.stepped_since_backward = False
        self.segment_modules.clear()
        self.opt_segment.clear()

    def _note_competing(self) -> None:
        """Set ``competing`` when an optimizer stepped on one backward and a backward of
        another segment ran through a module whose parameters it steps: two losses pull at one
        network (a GAN's discriminator trained on its loss, the generator's loss through it).
        An online probe on detached features, trained after the model, runs through no
        module of the model's optimizer."""
        if self.competing or len(set(self.opt_segment.values())) < 2:
            return
        owners = {id(p): name.rpartition(".")[0] for name, p in self.model.named_parameters()}
        for optimizer in self.optimizers:
            segment = self.opt_segment.get(id(optimizer))
            if segment is None:
                continue
            mine = {owners[id(p)] for group in optimizer.param_groups for p in group["params"]
                    if id(p) in owners}
            if any(mine & modules for other, modules in self.segment_modules.items()
                   if other != segment):
                self.competing = True
                return

    def _take_step_grads(self, optimizer: Any) -> None:
        """Sample the optimizer's parameters and the gradients its step applies."""
        params = optimizer_params([optimizer])
        # The gradients the step applies, read now: a loop may zero them before
        # monitor.step() (``opt.step(); opt.zero_grad()``, as under gradient accumulation).
        # The sampler takes those laid out as their parameter, a row takes the others.
        taken = self._sampler(optimizer).before(params) if params else set()
        if params and all(p.grad is None for p in params):
            self.gradless_step.append(optimizer)
        for p in params:
            if p.grad is not None:
                self.step_grads[id(p)] = (_SAMPLED if id(p) in taken
                                          else self._add_grad(p.grad))

    def _any_opt_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        """Note an optimizer the probe was not given that stepped parameters of the model."""
        if not self.observing or self._foreign() or any(
                optimizer is o for o in self.optimizers + self.unwatched):
            return
        if any(optimizer is inner for o in self.optimizers
               for inner in wrapped_optimizers(o, self.optimizers)):
            return
        if any(p in self.param_names for p in optimizer_params([optimizer])):
            self.unwatched.append(optimizer)
            if all(ref() is not optimizer for ref in self.others):
                self.others.append(weakref.ref(optimizer))

    def watch(self, optimizers: list) -> None:
        """Watch ``optimizers`` instead of those given, between observed steps: their hooks go
        on with the next observed step's (the hooks on now come off)."""
        self.optimizers = list(optimizers)
        self.samplers.clear()
        self._uninstall()

    def _stepped_before_backward(self) -> bool:
        """Whether an optimizer stepped with no gradient on any of its parameters and they
        hold one now: the loop ran ``optimizer.step()`` before ``loss.backward()`` (after a
        ``zero_grad()``), so each step applies nothing."""
        return any(p.grad is not None for p in optimizer_params(self.gradless_step))

    def _add_grad(self, grad: torch.Tensor) -> tuple:
        """``(device, row)`` of a parameter's gradient in this step's moment rows."""
        return grad.device, self._batches(grad.device)[1].add(stored_values(grad))

    def _after_opt_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.observing and not self._foreign():
            self.update_sums += self._sampler(optimizer).after()
            if self.carry is not None:
                self.carry.arm(optimizer)

    def _sampler(self, optimizer: Any) -> UpdateSampler:
        found = self.samplers.get(id(optimizer))
        if found is None:
            found = self.samplers[id(optimizer)] = UpdateSampler()
        return found

    def _clear_samples(self) -> None:
        for sampler in self.samplers.values():
            sampler.clear()

    # ---------------------------------------------------------------- sync
    def collect(self, extra: Optional[dict] = None) -> ProbeSnapshot:
        """Copy every statistic of the observed step (and ``extra`` device scalars, such as the
        loss) to the host in one transfer."""
        with torch.no_grad():
            return self._collect(extra)

    def _collect(self, extra: Optional[dict]) -> ProbeSnapshot:
        parts: list[torch.Tensor] = []
        layout: list[tuple] = []
        device = _model_device(self.model)

        def add(tag: tuple, value: torch.Tensor) -> None:
            flat = value.reshape(-1)
            if flat.dtype != torch.float64 or flat.device != device:
                flat = flat.to(device=device, dtype=torch.float64)
            layout.append((tag, tuple(value.shape), flat.numel()))
            parts.append(flat)

        named = list(self.model.named_parameters())
        params = [p for _, p in named]
        # A parameter the optimizer stepped has the moments of its sample after the step with
        # its update sums (the same values as the statistics' sample); the others get a row.
        stepped = {id(p) for sampled, _, _ in self.update_sums for p in sampled}
        param_rows = []
        for _, p in named:
            row = None
            if id(p) not in stepped:
                row = (p.device, self._batches(p.device)[1].add(p))
            grad = self.step_grads.get(id(p))
            if grad is _SAMPLED and id(p) not in stepped:  # the optimizer's step did not end
                grad = None
            if grad is None and p.grad is not None:
                grad = self._add_grad(p.grad)
            param_rows.append((row, grad))
        self.step_grads.clear()
        for dev, (acts, moments) in self.batches.items():
            add(("acts", dev), acts.device_part())
            add(("moments", dev), moments.device_part())
        unit_groups = self._unit_groups()
        for i, (_, active) in enumerate(unit_groups):
            add(("units", i), active)
        for module, moments in self.lstm_inputs.items():
            closed = gates.closed_forget_gates(module, moments)
            if closed is not None:
                add(("gates", self.names.get(module, "")), closed)
        self.lstm_inputs.clear()
        for i, (name, shape, value, origin) in enumerate(self.target_rows):
            add(("target", i, name, shape, origin), value)
        self.target_rows.clear()
        for i, (name, shape, dtype, dim, value) in enumerate(self.input_rows):
            add(("input", i, name, shape, dtype, dim), value)
        if named:  # the exact presence of NaN/Inf in the weights: one full read each
            add(("param_probes",), _stack(stats.full_probes(params), device))
        for i, (_, _, sums) in enumerate(self.update_sums):
            add(("updates", i), sums)
        for tag, probes in (("input_probes", self.input_probes),
                            ("container_probes", self.container_probes)):
            if probes:
                add((tag,), _stack([entry[-1] for entry in probes], device))
        cleared = self.cleared.take() if self.cleared is not None else []
        if cleared:
            add(("grads_cleared",), torch.stack([v.to(device) for v in cleared]))
        if self.outside is not None:
            outside, start = self.outside
            now = self._outside_now()
            before, after = self.outside_forward
            # Changed outside the forward: before it (or with no forward seen, at all), or
            # after it.
            moved = (_changed(start, before) | _changed(after, now) if before is not None
                     and after is not None else _changed(start, now))
            add(("moved_outside", tuple(n for n, _ in outside)), moved)
            self.outside = None
            self.outside_forward = [None, None]
        for name, value in (extra or {}).items():
            if isinstance(value, torch.Tensor):
                add(("extra", name), value)
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        host = flat.cpu().numpy()  # the one host sync of the observed step
        trained = self.trained_forward or self.first_forward or (None, None)
        snapshot = ProbeSnapshot(points=dict(self.points), norm_calls=list(self.norm_calls),
                                 attention_calls=sorted(self.attention_calls),
                                 inner_ops=dict(self.inner_ops),
                                 norm_functions=dict(self.norm_functions),
                                 edges=set(self.edges), op_sites=dict(self.op_sites),
                                 module_ops={k: set(v) for k, v in self.module_ops.items()},
                                 output_origins=list(self.output_origins),
                                 failed_module=self.failed_module,
                                 backward_order={k: p.backward_order for k, p in self.points.items()
                                                 if p.backward_order is not None},
                                 train_flags=trained[0], batch_size=trained[1],
                                 checkpointed=sorted((k for k in self.gradless
                                                      if k[0] in self.recomputed), key=repr),
                                 gradless=sorted({k[0] for k in self.gradless}),
                                 stepped_before_backward=self._stepped_before_backward())
        self.first_forward = self.trained_forward = None
        offset = 0
        for tag, shape, numel in layout:
            snapshot.values[tag] = host[offset:offset + numel].reshape(shape)
            offset += numel
        for i, (points, _) in enumerate(unit_groups):
            active = snapshot.values.pop(("units", i))
            start = 0
            for point in points:
                size = point.unit_hi.numel()
                snapshot.values[("units", point.key)] = active[start:start + size]
                start += size
        rows = {}
        for dev, (acts, moments) in self.batches.items():
            act_rows, signal = acts.rows(snapshot.values.pop(("acts", dev)))
            table = moments.table(snapshot.values.pop(("moments", dev)))
            rows[dev] = (act_rows, stats.gradient_fields(table), signal,
                         np.column_stack(stats.parameter_moments(table)))
        for key, acts, grads, pairs in _point_rows(rows, self.points):
            if acts is not None:
                snapshot.values[("act", key)] = acts
                calls = self.points[key].call_counts
                if len(calls) > 1:
                    snapshot.call_shifts[key] = [c - calls[0] for c in calls]
            if grads is not None:
                snapshot.values[("grad", key)] = grads
            if pairs is not None and pairs[1] > 0:
                snapshot.values[("signal", key)] = pairs
        self._param_values(snapshot, named, rows, param_rows)
        for point in self.points.values():
            point.act_rows.clear()
            point.call_counts.clear()
            point.grad_rows.clear()
            point.backward_order = None
            point.unit_hi = point.unit_lo = None  # each step's record is its own
        self._where_nonfinite(snapshot)
        self.inputs_seen = self.inputs_seen or bool(self.input_rows)
        self.input_rows.clear()
        self.norm_calls.clear()
        self.attention_calls.clear()
        self.inner_ops.clear()
        self.norm_functions.clear()
        self._clear_samples()
        self.update_sums = []
        self.bw_counter = 0
        self._note_competing()
        self._clear_segments()
        return snapshot

    def _where_nonfinite(self, snapshot: ProbeSnapshot) -> None:
        """Which inputs held NaN/Inf, and which modules with children made it in their own
        code (in the order they finished, each with the key of the point observed last
        before it): ``snapshot.nonfinite_inputs`` and ``snapshot.nonfinite_modules``."""
        for tag, probes, out in (("input_probes", self.input_probes, snapshot.nonfinite_inputs),
                                 ("container_probes", self.container_probes,
                                  snapshot.nonfinite_modules)):
            if probes:
                values = snapshot.values.pop((tag,))
                if tag == "input_probes":  # [flag, min, max] per batch tensor
                    snapshot.batch_ranges.extend(
                        (entry[0], float(lo), float(hi))
                        for entry, (_, lo, hi) in zip(probes, values.reshape(-1, 3).tolist()))
                    values = values.reshape(-1, 3)[:, 0]
                bad = np.isnan(values) if tag == "input_probes" else ~np.isfinite(values)
                out.extend(entry[:-1] for entry, hit in zip(probes, bad) if hit)
                if tag == "input_probes":
                    snapshot.infinite_inputs.extend(
                        entry[0] for entry, v in zip(probes, values) if np.isinf(v))
            probes.clear()

    def _unit_groups(self) -> list:
        """``(points, active)`` per device and unit family: which units of each point's
        record were ever active, as one vector for the group (its points' units in order)."""
        groups: dict = {}
        for point in self.points.values():
            if point.unit_hi is not None:
                relu_like = point.kind == "relu" or point.unit_lo is None
                groups.setdefault((point.unit_hi.device, relu_like), []).append(point)
        out = []
        for (_, relu_like), points in groups.items():
            hi = torch.cat([p.unit_hi for p in points])
            lo = None if relu_like else torch.cat([p.unit_lo for p in points])
            out.append((points, stats.active_units(hi, lo, "relu" if relu_like else "gelu")))
        return out

    def _param_values(self, snapshot: ProbeSnapshot, named: list, rows: dict,
                      param_rows: list) -> None:
        """Per-parameter vectors ``[norm, std, (grad norm), (update norm, norm before)]`` and
        the exact NaN/Inf presence of every weight (its full read). The norm comes from the
        std row: exact up to ``SAMPLE_ABOVE`` elements, else the sample's sum of squares
        scaled to the whole (NaN when the sample holds NaN/Inf). Computed for all parameters
        at once; each vector is a view of one table."""
        if not named:
            return
        values = snapshot.values
        probes = values.pop(("param_probes",))
        index = {id(p): i for i, (_, p) in enumerate(named)}
        numels = np.asarray([p.numel() for _, p in named], dtype=np.float64)
        moments = np.full((len(named), 4), np.nan)  # std, sumsq, finite, m
        grads = np.full((len(named), len(stats.GRAD_FIELDS)), np.nan)
        updates = np.full((len(named), 2), np.nan)  # update norm, norm before
        updated = np.zeros(len(named), dtype=bool)
        for i, (params, sizes, _) in enumerate(self.update_sums):
            sums = values.pop(("updates", i))
            group_numels = np.asarray([p.numel() for p in params], dtype=np.float64)
            table = np.column_stack([group_numels, sizes, sums[S["finite"]], sums[S["mean"]],
                                     sums[S["m2"]], np.ones_like(sizes)])
            grad_finite = sums[S["grad_finite"]]
            scale = group_numels / np.maximum(sizes, 1)
            # Parameters the optimizer steps outside the model have no vector.
            mine = [j for j, p in enumerate(params) if id(p) in index]
            at = [index[id(params[j])] for j in mine]
            moments[at] = np.column_stack(stats.parameter_moments(table))[mine]
            grads[at] = stats.finish_gradients(
                np.column_stack([grad_finite, sums[S["grad_sumsq"]], grad_finite >= sizes]),
                np.column_stack([group_numels, sizes]))[mine]
            updates[at] = np.sqrt(np.column_stack([sums[S["update"]], sums[S["before"]]])
                                  * scale[:, None])[mine]
            updated[at] = True
        for dev, table in rows.items():  # parameters not stepped, and gradients read apart
            own = [(i, row[1]) for i, (row, _) in enumerate(param_rows)
                   if row is not None and row[0] == dev]
            read = [(i, grad[1]) for i, (_, grad) in enumerate(param_rows)
                    if grad is not None and grad is not _SAMPLED and grad[0] == dev]
            for out, which, pairs in ((moments, 3, own), (grads, 1, read)):
                if pairs:
                    out[[i for i, _ in pairs]] = table[which][[r for _, r in pairs]]
        std, sumsq, finite, m = moments.T
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = np.where((finite == m) & (m > 0), np.sqrt(sumsq * numels / m),
                            np.where(m == 0, 0.0, np.nan))
            grad_norm = np.where(grads[:, stats.G["nonfinite"]] == 0,
                                 np.sqrt(grads[:, stats.G["sumsq"]]), np.nan)
        vectors = np.column_stack([norm, std, grad_norm, updates])
        groups = self.step_lrs if self.step_lrs is not None else optimizer_groups(
            self.optimizers)
        values[("param_finite", tuple(n for n, _ in named))] = np.isfinite(probes)
        # Held by an optimizer the probe was not given that stepped the model (a GAN's critic
        # in a module with its generator): in an optimizer all the same (TL506).
        elsewhere = {id(p) for p in optimizer_params([o for o in (ref() for ref in self.others)
                                                       if o is not None])}
        for i, ((name, p), (_, grad_row)) in enumerate(zip(named, param_rows)):
            has_grad, has_update = grad_row is not None, bool(updated[i])
            columns = _PARAM_COLUMNS[has_grad, has_update]
            group, lr, initial_lr, kind = groups.get(id(p), (None, None, None, None))
            values[("param", name, has_grad, has_update,
                    (id(p) in groups or id(p) in elsewhere) if self.optimizers else None,
                    tuple(p.shape), p.requires_grad, group, lr, initial_lr,
                    str(p.dtype).replace("torch.", ""), kind)] = vectors[i, columns]


# The columns of a parameter's vector (``[norm, std, grad norm, update norm, norm before]``)
# by whether it has a gradient and an update: slices where they are contiguous.
_PARAM_COLUMNS = {(True, True): slice(0, 5), (True, False): slice(0, 3),
                  (False, False): slice(0, 2), (False, True): [0, 1, 3, 4]}


@dataclass
class ProbeSnapshot:
    """Host copies of one observed step's statistics, keyed by what they describe."""

    points: dict
    norm_calls: list
    attention_calls: list
    norm_functions: dict
    edges: set
    output_origins: list
    failed_module: Optional[str]
    backward_order: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    # Per point called more than once this step (a shared pool, a block applied twice): how
    # many observations after its first call each of its calls came, in the order of its rows.
    call_shifts: dict = field(default_factory=dict)
    # The model's train/eval flags (:func:`training_flags`) and the batch size (dim 0 of its
    # first input) at the training forward: the first whose output a backward reached, else
    # the first with autograd on; None when no such forward was observed.
    train_flags: Optional[dict] = None
    batch_size: Optional[int] = None
    # ``(input name,)`` of the inputs that held NaN/Inf; ``(module, key of the last point
    # observed before it finished)`` of the modules with children whose own code made NaN/Inf.
    nonfinite_inputs: list = field(default_factory=list)
    # The names of the batch tensors that held ±Inf and no NaN (a mask's -inf, or bad data).
    infinite_inputs: list = field(default_factory=list)
    # (name, min, max) of each floating-point batch tensor (model inputs, a check's targets).
    batch_ranges: list = field(default_factory=list)
    nonfinite_modules: list = field(default_factory=list)
    # The keys of the points that ran with autograd off and whose module's forward ran again
    # in the backward (reentrant torch.utils.checkpoint): their gradients are not read.
    checkpointed: list = field(default_factory=list)
    # The modules whose outputs were observed with autograd off inside the training forward
    # (torch.no_grad() there, or a reentrant checkpoint's forward).
    gradless: list = field(default_factory=list)
    # An optimizer stepped before the step's backward (:meth:`Probe._stepped_before_backward`).
    stepped_before_backward: bool = False
    # See Probe.inner_ops.
    inner_ops: dict = field(default_factory=dict)
    # See RunTrace.op_sites.
    op_sites: dict = field(default_factory=dict)
    # See RunTrace.module_ops (sets).
    module_ops: dict = field(default_factory=dict)


def _closure_of(args: tuple, kwargs: dict) -> Any:
    """The closure an optimizer's ``step()`` was given (its pre-hook's ``args`` hold the
    optimizer first), or None."""
    return kwargs.get("closure", args[1] if len(args) > 1 else None)


def _named_inputs(args: tuple, kwargs: dict) -> list:
    """``(name, tensor)`` of a forward's inputs: ``input0``... for positional ones, the
    keyword's name (``mask``, or ``mask0``... when it holds several) for keyword ones."""
    named = [(f"input{i}", t) for i, t in enumerate(tensors_in(args))]
    for key, value in kwargs.items():
        found = tensors_in(value)
        named += [(str(key) if len(found) == 1 else f"{key}{j}", t) for j, t in enumerate(found)]
    return named


# Modules whose forward depends on the train/eval mode (MultiheadAttention and RNNs by their
# dropout argument).
MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd,
                  nn.MultiheadAttention, nn.RNNBase)


def training_flags(model: nn.Module) -> dict:
    """``model.training``, the names of its BatchNorm/Dropout modules in eval mode, and of
    those frozen on purpose now (``frozen_eval``): inside a submodule in eval mode whose
    parameters are all frozen (a frozen backbone, a distillation teacher), so their mode is
    the user's choice, whatever later steps unfreeze. While the model trains, also how many
    batches the BatchNorms among them tracked, and their momentum (``norm_batches``: see
    :func:`_norm_batches`), read only when there are any."""
    eval_modules = [n for n, m in model.named_modules()
                    if not m.training and isinstance(m, MODE_DEPENDENT)]
    held = _frozen_in_eval(model) if eval_modules else set()
    return {"model_training": model.training, "eval_modules": eval_modules,
            "frozen_eval": [n for n in eval_modules if n in held],
            "norm_batches": _norm_batches(model) if model.training and eval_modules else {}}


def _norm_batches(model: nn.Module) -> dict:
    """``{name: [num_batches_tracked, momentum]}`` of the BatchNorm-family modules in eval mode
    that track running statistics (momentum None: a cumulative average), read in one copy."""
    norms = [(name, m.num_batches_tracked, m.momentum) for name, m in model.named_modules()
             if not m.training and isinstance(m, nn.modules.batchnorm._NormBase)
             and m.track_running_stats and isinstance(m.num_batches_tracked, torch.Tensor)]
    if not norms:
        return {}
    devices = {c.device for _, c, _ in norms}
    counts = (torch.stack([c.detach().reshape(()).double() for _, c, _ in norms]).tolist()
              if len(devices) == 1 else [float(c) for _, c, _ in norms])
    return {name: [count, momentum] for (name, _, momentum), count in zip(norms, counts)}


def scripted_part(model: nn.Module) -> Optional[str]:
    """Why trainlint cannot observe ``model``: it, or a submodule, is a TorchScript module
    (scripted modules run no Python hooks); None when it can."""
    if isinstance(model, torch.jit.ScriptModule):
        return ("the model is a TorchScript module: scripted modules do not run Python hooks, "
                "so trainlint cannot observe them. Pass the eager nn.Module, before "
                "torch.jit.script/trace, instead")
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            return (f"submodule {name!r} is a TorchScript module: scripted modules do not run "
                    "Python hooks, so trainlint cannot observe them. Build the model from the "
                    "eager nn.Module instead of its scripted version")
    return None


def frozen(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters, none of them trainable."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def _frozen_in_eval(model: nn.Module) -> set:
    """Names of the modules inside (or at) a submodule in eval mode that is :func:`frozen`."""
    names: set = set()
    for name, m in model.named_modules():
        if m is model or m.training or name in names:
            continue
        if frozen(m):
            names.update(f"{name}.{sub}" if sub else name for sub, _ in m.named_modules())
    return names


# Distinct dim sizes for a meta tensor that shows where a reordering op sends each dim.
# Primes: a product of merged dims never equals one of them.
_MARKERS = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
# Ops that move or merge dims without touching values: where the channel dim goes is read off
# the same op on a marked meta tensor.
DIM_MOVING_OPS = REORDERING_OPS | {"flatten", "unsqueeze"}


def _reordered(op: str, args: tuple, kwargs: dict, channel: int, ndim: int) -> Optional[tuple]:
    """``(index, dims)``: where dim ``channel`` of an ``ndim``-dim tensor goes under
    ``op(*args, **kwargs)`` and how many dims the result has, from the same op run on a meta
    tensor whose dims all differ in size (no data, no kernel); None when the channel dim is
    merged with another or the op cannot say."""
    if ndim > len(_MARKERS):
        return None
    marked = torch.empty(_MARKERS[:ndim], device="meta")
    try:
        with torch._C.DisableTorchFunction():
            out = getattr(torch.Tensor, op)(marked, *args[1:], **kwargs)
    except (TypeError, RuntimeError, IndexError, ValueError, AttributeError):
        return None
    if not isinstance(out, torch.Tensor) or _MARKERS[channel] not in out.shape:
        return None
    return list(out.shape).index(_MARKERS[channel]), out.dim()


def _known_extremes(x: torch.Tensor, hi: torch.Tensor, lo: Optional[torch.Tensor]) -> tuple:
    """``(probe, min, max)`` of ``x`` from its per-unit max (and min): NaN propagates through
    them and an Inf shows, so the probe is finite exactly when ``x`` is. Without a min (ReLU
    family: no -Inf comes out of it) the min is left unknown."""
    top = hi.amax()
    if lo is None:
        return top, stats.unknown(x), top
    bottom = lo.amin()
    return stats.finite_probe(bottom, top), bottom, top


def _point_rows(rows: dict, points: dict) -> list:
    """Per point, ``(key, activation rows, gradient rows, signal [sum, pairs])``, None where
    it has none. When every row is on one device (the usual case), one fancy index per table
    for all points, each point's rows a slice of it; else a :func:`_pick` per point."""
    if len(rows) != 1:
        return [(key, _pick(rows, 0, p.act_rows) if p.act_rows else None,
                 _pick(rows, 1, p.grad_rows) if p.grad_rows else None,
                 _pick(rows, 2, p.act_rows).sum(axis=0) if p.act_rows else None)
                for key, p in points.items()]
    act_table, grad_table, signal, _ = next(iter(rows.values()))
    act_ids = [i for p in points.values() for _, i in p.act_rows]
    acts, grads = act_table[act_ids], grad_table[[i for p in points.values()
                                                  for _, i in p.grad_rows]]
    starts = np.cumsum([0] + [len(p.act_rows) for p in points.values() if p.act_rows])[:-1]
    sums = np.add.reduceat(signal[act_ids], starts) if act_ids else signal[:0]
    out, a, g, s = [], 0, 0, 0
    for key, p in points.items():
        na, ng = len(p.act_rows), len(p.grad_rows)
        out.append((key, acts[a:a + na] if na else None, grads[g:g + ng] if ng else None,
                    sums[s] if na else None))
        a, g, s = a + na, g + ng, s + (na > 0)
    return out


def _pick(rows: dict, which: int, ids: list) -> np.ndarray:
    """The rows ``ids`` (``(device, row number)`` pairs) of table ``which`` of each device's
    ``rows``, stacked in order (one fancy index when they share a device)."""
    device = ids[0][0]
    if all(d == device for d, _ in ids):
        return rows[device][which][[i for _, i in ids]]
    return np.stack([rows[d][which][i] for d, i in ids])


def _stack(values: list, device: torch.device) -> torch.Tensor:
    """0-d device tensors as one float64 vector on ``device``, in order (one stack when they
    share a device and dtype)."""
    first = values[0]
    if all(v.device == first.device and v.dtype == first.dtype for v in values):
        return torch.stack(values).to(device=device, dtype=torch.float64)
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in values])


def _fingerprints(params: list, device: torch.device) -> torch.Tensor:
    """The norm of each parameter (float64 for real ones), on ``device`` (the same reduction of
    the same values gives the same number, so a change of any element shows)."""
    return _stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64)
                   if p.is_floating_point() else torch.linalg.vector_norm(p.detach())
                   for p in params], device)


def _changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Element-wise: the fingerprints differ (NaN both times is no change)."""
    return (after != before) & ~(after.isnan() & before.isnan())


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
