"""Turn the probe's per-step host snapshots into the RunTrace the rules read."""

from __future__ import annotations

import inspect
import math
from array import array
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import stats
from .origins import library_of, locate
from .probe import (
    MIXED,
    ProbeSnapshot,
    is_leaf_module,
    keep_inner_ops,
    note_site,
    training_flags,
)
from .trace import (
    REORDERING_OPS,
    ActivationStats,
    Edge,
    InputTrace,
    LayerTrace,
    ModuleFacts,
    ParamTrace,
    RunTrace,
    StepLayers,
    StepValues,
    TargetTrace,
)

_PLAIN = (bool, int, float, str)
# The dead-unit records cover at least this many of a point's last observed steps (those that
# ran it; a check's three): a unit that a too-high learning rate killed mid-run is dead
# although it was active at the run's start, from a few observations after it died ...
UNIT_WINDOW = 3
# ... and as many of them as hold at least this many values per unit (samples times positions):
# over 40 values a unit active for 2% of its inputs looks dead almost half of the time (an MLP
# at batch 4 read 67% dead units where 20 000 fresh samples found 11-25%). At most
# MAX_UNIT_WINDOW records: a unit killed earlier than that is still seen dying.
UNIT_VALUES = 512
MAX_UNIT_WINDOW = 256
# A shorter window, of the records that hold this many values per unit, shows a layer killed
# since its full window began (a learning-rate spike 12 observed steps ago at every=10, where
# the window holds 16); the rule asks nearly every unit dead there.
RECENT_VALUES = 128
_NO_SIGNAL = np.zeros(2)
# A long run keeps every observed step's losses and total gradient norm, but the per-layer
# values, per-parameter gradient norms, input scales, batch ranges and learning rates, and the
# update series of at most HISTORY observed steps (~10 KB a step for 81 layers): each time
# HISTORY is reached, every other one between the first KEEP_FIRST and the latest
# HISTORY // 2 is dropped, so older steps grow sparser.
HISTORY = 1024
KEEP_FIRST = 64
# The ``nonfinite`` entry of every observed step that had none: one dict, shared, never
# written (traces are pickled, which a read-only mapping proxy is not).
_CLEAN: dict = {"activations": {}, "gradients": {}, "inputs": (), "modules": (),
                "parameters": (), "parameter_grads": (), "parameters_before": ()}


# A step's input scale (TL201 mid-run) is read with this many standard errors of its estimate
# taken off: a later batch is read on ~8 samples, where one rare standardized value of 18 (a
# one-hot column of a 0.3% category) reads a mean of 2.3 and a std of 6.4, the whole batch's
# 0.2 and 2.3.
SCALE_SIGMAS = 3.0


def _input_scale(mean: np.ndarray, std: np.ndarray, count: np.ndarray) -> tuple:
    """(the largest |mean| of a varying channel, less SCALE_SIGMAS standard errors; the largest
    std, divided by 1 + SCALE_SIGMAS standard errors of a normal sample's std) from each
    channel's ``count`` values read."""
    n = np.maximum(count, 1.0)
    varying = std > 0
    means = np.maximum(np.abs(mean) - SCALE_SIGMAS * std / np.sqrt(n), 0.0)[varying]
    stds = std / (1.0 + SCALE_SIGMAS / np.sqrt(2.0 * np.maximum(n - 1.0, 1.0)))
    return (float(means.max()) if means.size else 0.0,
            float(stds.max()) if stds.size else 0.0)


def kept_positions(n: int) -> list:
    """The positions of a series of ``n`` entries that thinning keeps (all up to HISTORY)."""
    if n <= HISTORY:
        return list(range(n))
    recent = n - HISTORY // 2
    return [*range(KEEP_FIRST), *range(KEEP_FIRST, recent, 2), *range(recent, n)]


def _thinned(series: array) -> array:
    """A per-parameter series (doubles) thinned as :func:`kept_positions` says."""
    return array("d", (series[i] for i in kept_positions(len(series))))


def window_for(per_record: float, values: int = UNIT_VALUES) -> int:
    """How many records a point's unit window holds when each gives ``per_record`` values per
    unit: ``UNIT_WINDOW``, or as many as make ``values`` values (at most
    ``MAX_UNIT_WINDOW``)."""
    if per_record * UNIT_WINDOW >= values:
        return UNIT_WINDOW
    if per_record * MAX_UNIT_WINDOW <= values:
        return MAX_UNIT_WINDOW
    return math.ceil(values / per_record)


def _later_calls(acts: list, nonfinite: dict, shifts: dict) -> dict:
    """Per point called more than once whose output held NaN/Inf, where its first call did
    not: how many observations after its first call the first call that held it came (TL504
    orders it there, not at the shared module's first call)."""
    later = {}
    for key, rows in acts:
        calls = shifts.get(key)
        if key not in nonfinite or calls is None or len(calls) != len(rows):
            continue
        rows = np.asarray(rows).reshape(-1, len(stats.ACT_FIELDS))
        bad = np.flatnonzero(rows[:, stats.A["n_finite"]] < rows[:, stats.A["n"]])
        if len(bad) and bad[0] > 0:
            later[key] = calls[int(bad[0])]
    return later


def _shared_index(keys: tuple, last: dict) -> dict:
    """``{key: position}`` of ``keys``: ``last`` itself when it holds the same keys in the
    same order (each step of a run then shares one)."""
    if len(keys) == len(last) and all(a == b for a, b in zip(keys, last)):
        return last
    return {key: i for i, key in enumerate(keys)}


def _put(columns: dict, name: str, size: int, at: list, values: np.ndarray) -> None:
    """Set column ``name`` (of ``size`` positions) to ``values`` at positions ``at``, with a
    mask of them unless they are all the positions."""
    column = np.full(size, np.nan)
    column[at] = values
    mask = None
    if len(at) < size:
        mask = np.zeros(size, dtype=bool)
        mask[at] = True
    columns[name] = (column, mask)


def module_attrs(module: nn.Module) -> dict:
    """Plain constructor-level facts of a module (ints, floats, bools, strings, int tuples)."""
    attrs: dict = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _PLAIN) or (
            isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
        ):
            attrs[key] = value
    for name in ("bias", "weight"):
        found = _present(module, name)
        if found is not None:
            attrs[f"has_{name}"] = found
    return attrs


def pruned_units(module: nn.Module) -> list:
    """The output units (rows of the weight) of a Linear/Conv layer that
    ``torch.nn.utils.prune`` masked out entirely (structured pruning): zero on purpose."""
    mask = module._buffers.get("weight_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or \
            not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or \
            getattr(module, "transposed", False):
        return []
    kept = mask.detach().reshape(mask.shape[0], -1).ne(0).any(dim=1)
    return torch.nonzero(~kept).flatten().tolist()


def _present(module: nn.Module, name: str) -> Optional[bool]:
    """Whether ``module.<name>`` holds a tensor (None: no such attribute), found without
    evaluating it: reading a parametrized weight runs its parametrization, and spectral_norm's
    then takes a power-iteration step that changes the model's buffers."""
    if name in module._parameters:
        return module._parameters[name] is not None
    if parametrize.is_parametrized(module, name):
        return True
    if name in module._buffers:
        return module._buffers[name] is not None
    if name in vars(module):  # a plain attribute (the hook-based spectral_norm's weight)
        return vars(module)[name] is not None
    static = inspect.getattr_static(module, name, None)  # a property is code: not run
    return True if isinstance(static, torch.Tensor) else None


def torch_base(cls: type) -> str:
    """The name of the first torch.nn class other than ``Module`` in ``cls``'s MRO (a subclass
    of ``nn.BatchNorm2d`` gives "BatchNorm2d"), or ``cls``'s own name when there is none."""
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        if klass.__module__.startswith("torch.nn.") and klass.__module__ != parametrize.__name__:
            return klass.__name__  # (a ParametrizedConv2d is a Conv2d)
    return cls.__name__


# Libraries whose train() overrides only pass the mode on (DistributedDataParallel,
# transformers' PreTrainedModel): not a user's way to keep layers in eval.
MODE_FORWARDING_LIBRARIES = ("torch.", "transformers.", "lightning.", "pytorch_lightning.")


def overrides_train(module: nn.Module) -> bool:
    """Whether the module's class redefines ``train()`` in user code (e.g. to keep its
    BatchNorm layers in eval mode while the rest trains)."""
    train = type(module).train
    return train is not nn.Module.train and not getattr(train, "__module__", "").startswith(
        MODE_FORWARDING_LIBRARIES)


class TraceBuilder:
    """Accumulates observed steps of one model and builds the RunTrace on demand."""

    def __init__(self, model: nn.Module, *, mode: str = "check") -> None:
        self.model = model
        self.mode = mode
        # Per point, every observed call so far folded into one activation row and one
        # gradient row (memory stays O(points), however long the run).
        self.act_rows: dict[tuple, np.ndarray] = {}
        self.grad_rows: dict[tuple, np.ndarray] = {}
        self.unit_counts: dict[tuple, int] = {}
        self.unit_last: dict[tuple, np.ndarray] = {}
        self.unit_window: dict[tuple, int] = {}
        self.unit_recent: dict[tuple, int] = {}  # the records RECENT_VALUES take
        self.signal: dict[tuple, np.ndarray] = {}
        self.param_finite: dict[str, bool] = {}
        # The weights read finite in full at the step before this one (None: not observed).
        self.finite_before: Optional[dict] = None
        self.last_step: Optional[int] = None
        self.backward_order: dict[tuple, int] = {}
        self.points: dict = {}
        # The distinct normalization-layer calls (an ordered set: every observed step repeats
        # them, and the rules read their minimum batch and their shapes).
        self.norm_calls: dict = {}
        self.batch_runs: dict[str, list] = {}
        # Modules whose own forward called F.scaled_dot_product_attention, or a functional norm
        # (name -> the norm's torch.nn class name).
        self.attention_calls: set = set()
        self.norm_functions: dict = {}
        self.inner_ops: dict = {}  # (see Probe.inner_ops)
        self.edges: set = set()
        self.op_sites: dict = {}
        self.module_ops: dict = {}
        self.output_origins: list = []
        self.before_nonfinite: list = []
        self.inputs: dict = {}
        self.targets: dict = {}
        self.forget_gates: dict = {}
        self.params: dict[str, ParamTrace] = {}
        self.losses: list[float] = []
        self.per_step: list[dict] = []
        # The key -> position dicts of the last step's StepLayers and StepValues (shared by the
        # next steps with the same keys).
        self._layer_index: dict = {}
        self._grad_index: dict = {}
        self.errors: list[dict] = []
        self.train_flags: list[dict] = []
        self.observed = 0
        # The positions in per_step of the steps that keep their per-layer values.
        self._detailed: list[int] = []
        # The model's children whose layers ran at observed steps where the model's own
        # forward did not (a training step calling ``model.net(x)``), and how many such steps.
        self.bypassed: set = set()
        self.rootless = 0
        # Points whose gradients reentrant checkpointing hid (see ProbeSnapshot.checkpointed).
        self.checkpointed: set = set()
        self.gradless: set = set()  # (see ProbeSnapshot.gradless)

    def add(self, snap: ProbeSnapshot, step: int, started: Optional[int] = None,
            micro_batches: int = 1) -> None:
        """Fold one observed step into the run (``started``: the step its observation began
        at, where it ran on over micro-batches of gradient accumulation or was retried after
        steps a GradScaler skipped; ``micro_batches``: the steps it ran on over, its own
        included, before an optimizer step ended it)."""
        self.observed += 1
        self.points.update(snap.points)
        self.checkpointed.update(snap.checkpointed)
        self.gradless.update(snap.gradless)
        self.norm_calls.update(dict.fromkeys(snap.norm_calls))
        self._add_batch_runs(snap.norm_calls)
        self.attention_calls.update(snap.attention_calls)
        for name, ops in snap.inner_ops.items():
            keep_inner_ops(self.inner_ops, name, ops)
        self.norm_functions.update(snap.norm_functions)
        self.edges |= snap.edges
        for key, module in snap.op_sites.items():
            note_site(self.op_sites, key, module)
        for name, ops in snap.module_ops.items():
            self.module_ops.setdefault(name, set()).update(ops)
        if snap.output_origins:
            self.output_origins = snap.output_origins
        self.finite_before = self.param_finite if self.last_step == step - 1 else None
        self.last_step = step
        step_info: dict = {"step": step}
        if started is not None and started != step:
            step_info["started"] = started
        if micro_batches > 1:
            step_info["micro_batches"] = micro_batches
        nonfinite: dict = {"activations": {}, "gradients": {},
                           "inputs": sorted({name for name, in snap.nonfinite_inputs}),
                           "modules": [[name, self.points[key].depth if key in self.points
                                        else -1] for name, key in snap.nonfinite_modules]}
        self.before_nonfinite = []
        order: dict = {}  # the layers in the snapshot's order (an ordered set)
        found: dict = {"act": [], "grad": [], "units": [], "signal": []}
        scale: dict = {}  # per input and channel dim: its _input_scale
        lrs: dict = {}  # per param group: its learning rate
        moved: dict = {}
        for tag, value in snap.values.items():
            kind = tag[0]
            if kind in found:
                order[tag[1]] = None
                found[kind].append((tag[1], value))
            elif kind == "input":
                scale[tag[2], tag[5]] = self._add_input(tag, value)
            elif kind == "target":
                self._add_target(tag, value)
            elif kind == "gates":  # an LSTM's forget gates at the first step that ran it
                self.forget_gates.setdefault(tag[1], tuple(value.tolist()))
            elif kind == "param_finite":
                self.param_finite = dict(zip(tag[1], value.astype(bool)))
            elif kind == "param":
                self._add_param(tag, value)
                group, lr = tag[7], tag[8]
                if group is not None and isinstance(lr, (int, float)):
                    lrs[group] = float(lr)
            elif kind == "moved_outside":
                moved.update(zip(tag[1], value.astype(bool).tolist()))
            elif kind == "grads_cleared":  # see trainlint.gradclear
                step_info["grads_cleared"] = bool(np.any(value))
            elif kind == "extra" and tag[1] == "loss":
                loss = float(value.reshape(-1)[0])
                self.losses.append(loss)
                step_info["loss"] = loss
            elif kind == "extra" and tag[1] in ("loss_mean", "loss_max", "loss_min"):
                step_info[tag[1]] = float(value.reshape(-1)[0])
        for name, changed in moved.items():
            if name in self.params:
                self.params[name].outside_checks += 1
                self.params[name].moved_outside += int(changed)
        index = _shared_index(tuple(order), self._layer_index)
        self._layer_index = index
        columns: dict = {}
        sizes: dict = {}  # this step's element count per point
        if found["act"]:
            sizes = self._add_acts(found["act"], index, columns, nonfinite["activations"])
            later = _later_calls(found["act"], nonfinite["activations"], snap.call_shifts)
            if later:
                nonfinite["later_call"] = later
        if found["grad"]:
            self._add_grads(found["grad"], index, columns, nonfinite["gradients"])
        if found["units"]:
            self._add_units(found["units"], index, columns, sizes)
        if found["signal"]:
            self._add_signal(found["signal"], index, columns)
        if snap.train_flags is None and found["act"]:  # layers ran, the model's forward did not
            self.rootless += 1
            self.bypassed.update(key[0].split(".")[0] for key, _ in found["act"] if key[0])
        step_info["layers"] = StepLayers(index, columns)
        if scale:
            step_info["input_scale"] = scale
        if lrs:
            step_info["lrs"] = lrs
        if snap.stepped_before_backward:
            step_info["stepped_before_backward"] = True
        if snap.batch_ranges:  # the batch tensors' extremes (the last forward's per name)
            step_info["batch_range"] = {name: (lo, hi) for name, lo, hi in snap.batch_ranges}
        for key, rank in snap.backward_order.items():
            self.backward_order.setdefault(key, rank)
        with_grad = [(n, p.grad_norm) for n, p in self.params.items() if p.grad_norm is not None]
        step_info["grad_norm"] = (math.sqrt(sum(g * g for _, g in with_grad)) if with_grad
                                  else None)
        self._grad_index = _shared_index(tuple(n for n, _ in with_grad), self._grad_index)
        step_info["param_grad_norms"] = StepValues(
            self._grad_index, np.array([g for _, g in with_grad], dtype=np.float64))
        nonfinite["parameters"] = [p.name for p in self.params.values() if p.nonfinite]
        nonfinite["parameter_grads"] = [p.name for p in self.params.values() if p.grad_nonfinite]
        nonfinite["parameters_before"] = self.before_nonfinite
        if any(nonfinite.values()):  # (a mask's -inf in an input every step is no fault)
            nonfinite["infinite_inputs"] = sorted(set(snap.infinite_inputs))
        step_info["nonfinite"] = (nonfinite if any(nonfinite.values()) else _CLEAN)
        self.per_step.append(step_info)
        self._detailed.append(len(self.per_step) - 1)
        if len(self._detailed) > HISTORY:
            self._thin()
        # The modes the training forward ran in (read now when no forward said: a check).
        self.train_flags.append({"step": step, **(snap.train_flags or training_flags(self.model))})

    def _add_batch_runs(self, calls: list) -> None:
        """Each normalization layer's smallest training batch at this step onto its runs of
        ``[batch, steps]`` (a run grows while the batch stays the same)."""
        smallest: dict = {}
        for call in calls:
            if call.training and len(call.shape) >= 2:
                batch = call.shape[0]
                smallest[call.module] = min(smallest.get(call.module, batch), batch)
        for module, batch in smallest.items():
            runs = self.batch_runs.setdefault(module, [])
            if runs and runs[-1][0] == batch:
                runs[-1][1] += 1
            else:
                runs.append([batch, 1])

    def _thin(self) -> None:
        """Drop the per-layer values, per-parameter gradient norms, input scales, batch ranges
        and learning rates of the observed steps that :func:`kept_positions` leaves out (their
        losses and total norm stay); the rules read such a step as one that kept none."""
        keep = kept_positions(len(self._detailed))
        kept = set(keep)
        for i, at in enumerate(self._detailed):
            if i not in kept:
                for key in ("layers", "param_grad_norms", "input_scale", "batch_range", "lrs"):
                    self.per_step[at].pop(key, None)
        self._detailed = [self._detailed[i] for i in keep]

    def _add_acts(self, acts: list, index: dict, columns: dict, nonfinite: dict) -> dict:
        """This step's activation rows of every point: its std, mean and zero fraction into
        ``columns``, its NaN/Inf count into ``nonfinite``, and the rows folded into the run's
        (all points at once). Returns each point's element count this step."""
        keys = [key for key, _ in acts]
        if all(len(value) == 1 for _, value in acts):  # one call each: the rows as they are
            step = np.concatenate([value for _, value in acts]).astype(np.float64, copy=False)
        else:
            step = np.concatenate([stats.fold_moments(value) for _, value in acts])
        summary = stats.moment_summaries(step)
        sizes = dict(zip(keys, step[:, stats.A["n"]].tolist()))
        at = [index[key] for key in keys]
        for name in ("std", "mean", "zero_fraction", "saturated_fraction"):
            _put(columns, name, len(index), at, summary[name])
        for i in np.flatnonzero(summary["nonfinite"]).tolist():
            nonfinite[keys[i]] = int(summary["nonfinite"][i])
        seen = [i for i, key in enumerate(keys) if key in self.act_rows]
        if seen:
            before = np.concatenate([self.act_rows[keys[i]] for i in seen])
            step[seen] = stats.fold_stacked(np.stack([before, step[seen]], axis=1))
        for i, key in enumerate(keys):
            self.act_rows[key] = step[i:i + 1]
        return sizes

    def _add_grads(self, grads: list, index: dict, columns: dict, nonfinite: dict) -> None:
        """This step's gradient rows of every point (all fields are sums): its norm into
        ``columns``, its NaN/Inf count into ``nonfinite``, and the sums into the run's."""
        rows = [value.reshape(-1, len(stats.GRAD_FIELDS)) for _, value in grads]
        starts = np.cumsum([0] + [len(r) for r in rows])[:-1]
        step = np.add.reduceat(np.concatenate(rows).astype(np.float64, copy=False), starts)
        _put(columns, "grad_norm", len(index), [index[key] for key, _ in grads],
             np.sqrt(step[:, stats.G["sumsq"]]))
        bad = step[:, stats.G["nonfinite"]]
        for i in np.flatnonzero(bad).tolist():
            nonfinite[grads[i][0]] = int(bad[i])
        seen = [i for i, (key, _) in enumerate(grads) if key in self.grad_rows]
        if seen:
            step[seen] += np.concatenate([self.grad_rows[grads[i][0]] for i in seen])
        for i, (key, _) in enumerate(grads):
            self.grad_rows[key] = step[i:i + 1]

    def _add_units(self, units: list, index: dict, columns: dict, sizes: dict) -> None:
        """Each point's "ever active" record over its window of records (:func:`window_for`
        of this step's values per unit: its element count in ``sizes`` over its units), and
        its dead fraction into ``columns``. Per unit, the
        number of the point's last record that found it active (its records counted from 1;
        0: none yet): the unit is active in the window when that is one of the window's (one
        small array per point)."""
        at, dead = [], []
        for key, value in units:
            count = self.unit_counts.get(key, 0) + 1
            last = self.unit_last.get(key)
            if last is None or last.shape != value.shape:
                last = self.unit_last[key] = np.zeros(value.shape, dtype=np.int32)
            self.unit_counts[key] = count
            size = sizes.get(key)  # (None: not said; the window stays as it was)
            if size is not None:
                per_record = size / max(value.size, 1)
                self.unit_window[key] = window_for(per_record)
                self.unit_recent[key] = window_for(per_record, RECENT_VALUES)
            np.putmask(last, value.astype(bool), count)
            active = self.active_units(key)
            if active.size:
                at.append(index[key])
                dead.append(1.0 - np.count_nonzero(active) / active.size)
        if at:
            _put(columns, "dead_fraction", len(index), at, np.array(dead))

    def active_units(self, key: tuple) -> Optional[np.ndarray]:
        """Which units of point ``key`` were active in its window of records (None: it has no
        unit record)."""
        last = self.unit_last.get(key)
        if last is None:
            return None
        window = self.unit_window.get(key, UNIT_WINDOW)
        return last > max(self.unit_counts[key] - window, 0)

    def recent_units(self, key: tuple) -> tuple:
        """``(active, records)`` of point ``key``'s units over its recent window, when that is
        shorter than its full one and holds fewer records than the point has; else
        ``(None, 0)``."""
        recent = self.unit_recent.get(key, UNIT_WINDOW)
        count = self.unit_counts.get(key, 0)
        last = self.unit_last.get(key)
        if last is None or recent >= min(self.unit_window.get(key, UNIT_WINDOW), count):
            return None, 0
        return last > count - recent, recent

    def unit_records(self, key: tuple) -> int:
        """How many of point ``key``'s records its unit window holds now."""
        return min(self.unit_counts.get(key, 0), self.unit_window.get(key, UNIT_WINDOW))

    def _add_signal(self, signal: list, index: dict, columns: dict) -> None:
        """Each point's between-sample ``[sum, pairs]``: added to the run's, and this step's
        RMS into ``columns`` where it has pairs."""
        keys = [key for key, _ in signal]
        step = np.stack([value for _, value in signal]).astype(np.float64, copy=False)
        before = np.stack([self.signal.get(key, _NO_SIGNAL) for key in keys])
        total = before + step
        for i, key in enumerate(keys):
            self.signal[key] = total[i]
        paired = np.flatnonzero(step[:, 1] > 0)
        if len(paired):
            _put(columns, "signal", len(index), [index[keys[i]] for i in paired.tolist()],
                 np.sqrt(step[paired, 0] / step[paired, 1]))

    def _add_input(self, tag: tuple, value: np.ndarray) -> tuple:
        """One step's per-channel moments and range of a model input into its InputTrace;
        returns the step's :func:`_input_scale`."""
        _, _, name, shape, dtype, dim = tag
        current = self.inputs.get((name, dim))
        if len(shape) == 1:  # one value per sample: a single feature over the batch
            value = np.array([[value[0].mean()], [value[0].std()], [value[2].min()],
                              [value[3].max()], [value[0].size]])
        scale = _input_scale(value[0], value[1], value[4])
        if current is None:
            self.inputs[(name, dim)] = InputTrace(name=name, shape=shape, dtype=dtype,
                                                  channel_dim=dim, mean=value[0], std=value[1],
                                                  min=value[2], max=value[3],
                                                  range_values=np.array(value[4], copy=True))
            return scale
        if current.mean.shape == value[0].shape:
            current.last_mean, current.last_std = value[0], value[1]
            current.last_step = self.last_step
        if current.min.shape == value[2].shape:
            # The first step's batch gives the moments (inputs are the data, not the model
            # state); the range spans every observed batch, so a feature constant in one batch
            # by chance (a rare 0/1 indicator) varies over the run, and one constant for good
            # does not.
            current.min = np.minimum(current.min, value[2])
            current.max = np.maximum(current.max, value[3])
            if self.mode == "monitor" and current.range_values is not None and \
                    current.range_values.shape == value[4].shape:
                current.range_values = current.range_values + value[4]
        return scale

    def _add_target(self, tag: tuple, value: np.ndarray) -> None:
        """One step's range of a target tensor: the extremes over the run, the shares of the
        first step that saw it."""
        _, _, name, shape, origin = tag
        low, high, below, above, far_below = value.tolist()
        current = self.targets.get(name)
        if current is None:
            self.targets[name] = TargetTrace(name, shape, low, high, below, above, far_below,
                                             origin)
        else:
            current.min, current.max = min(current.min, low), max(current.max, high)

    def _add_param(self, tag: tuple, value: np.ndarray) -> None:
        """This step's vector of one parameter, folded into its ``ParamTrace`` in place (the
        builder's own; :meth:`build` hands out copies)."""
        (_, name, has_grad, has_update, in_opt, shape, requires_grad, group, lr, initial_lr,
         dtype, optimizer) = tag
        values = value.tolist()
        norm, std = values[0], values[1]
        grad = values[2] if has_grad else None
        trace = self.params.get(name)
        if trace is None:
            module = name.rsplit(".", 1)[0] if "." in name else ""
            # Its per-step series as arrays of doubles (8 bytes a value, not a float object
            # each); build() hands out lists.
            trace = self.params[name] = ParamTrace(name=name, module=module, shape=shape,
                                                   requires_grad=requires_grad,
                                                   in_optimizer=in_opt, norm=norm, std=std,
                                                   grad_norm=grad, update_ratios=array("d"),
                                                   norms_before=array("d"),
                                                   update_norms=array("d"), first_norm=norm)
        trace.shape, trace.requires_grad, trace.in_optimizer = shape, requires_grad, in_opt
        trace.norm, trace.std, trace.grad_norm = norm, std, grad
        trace.group, trace.lr, trace.dtype = group, lr, dtype
        trace.initial_lr = initial_lr
        trace.optimizer = optimizer
        if isinstance(lr, (int, float)) and math.isfinite(lr):
            trace.peak_lr = lr if trace.peak_lr is None else max(trace.peak_lr, lr)
        # NaN marks NaN/Inf values; +inf a sum of squares past float64's range (a float64
        # weight or gradient of 1e160: finite values)
        trace.nonfinite = int(math.isnan(norm) or not self.param_finite.get(name, True))
        trace.grad_nonfinite = int(grad is not None and math.isnan(grad))
        trace.grad_steps += int(has_grad)
        trace.update_norm = None
        if has_update:
            update, before = values[-2], values[-1]
            trace.update_norm = update
            # NaN/Inf in the weight's sample before the step; +inf alone is also a sum of
            # squares past float64's range, of finite weights where the step before read them
            if math.isnan(before) or (math.isinf(before) and not (
                    self.finite_before is not None and self.finite_before.get(name, False))):
                self.before_nonfinite.append(name)
            trace.norms_before.append(before)
            trace.update_norms.append(update)
            if before > 0:
                trace.update_ratios.append(update / before)
            if len(trace.norms_before) > HISTORY:
                trace.norms_before, trace.update_norms = (_thinned(trace.norms_before),
                                                          _thinned(trace.update_norms))
            if len(trace.update_ratios) > HISTORY:
                trace.update_ratios = _thinned(trace.update_ratios)

    def build(self, **run: object) -> RunTrace:
        """The RunTrace of everything observed so far (``run`` fills RunTrace fields)."""
        modules = self._module_facts()
        layers = []
        for key, point in self.points.items():
            rows = self.act_rows.get(key)
            activation = None
            if rows is not None:
                merged = stats.merge_moments(rows)
                signal = self.signal.get(key)
                if signal is not None and signal[1] > 0:
                    merged["signal"] = float(np.sqrt(signal[0] / signal[1]))
                activation = ActivationStats(**merged)
            grad_norm = grad_rms = None
            grad_nonfinite = 0
            if key in self.grad_rows:
                g = stats.merge_grads(self.grad_rows[key])
                grad_norm, grad_rms, grad_nonfinite = g["norm"], g["rms"], g["nonfinite"]
            facts = modules.get(point.module)
            recent, recent_records = self.recent_units(key)
            layers.append(LayerTrace(
                module=point.module, type=point.type, op=point.op, depth=point.depth,
                kind=point.kind, activation=activation, unit_ever_active=self.active_units(key),
                unit_records=self.unit_records(key), unit_recent_active=recent,
                unit_recent_records=recent_records,
                unit_dim=point.unit_dim, grad_norm=grad_norm, grad_rms=grad_rms,
                grad_nonfinite=grad_nonfinite, backward_order=self.backward_order.get(key),
                location=facts.location if facts else None, shape=point.shape,
                node=("point",) + key, base=facts.base if facts else point.type))
        layers.sort(key=lambda lt: lt.depth)
        trace = RunTrace(
            layers=layers, modules=modules,
            params=[replace(p, update_ratios=list(p.update_ratios),
                            norms_before=list(p.norms_before),
                            update_norms=list(p.update_norms)) for p in self.params.values()],
            inputs=self._chosen_inputs(modules),
            targets=[replace(t) for t in self.targets.values()],
            forget_gates=dict(self.forget_gates),
            edges=[Edge(src=s, dst=d, via=v) for s, d, v in sorted(self.edges, key=repr)],
            op_sites=dict(self.op_sites),
            module_ops={name: tuple(sorted(ops)) for name, ops in self.module_ops.items()},
            losses=list(self.losses), observed_steps=self.observed, mode=self.mode,
            model_type=type(self.model).__name__,
            output_ops=tuple(o for o in self.output_origins if o is not None),
            errors=list(self.errors), train_flags=list(self.train_flags),
            per_step=list(self.per_step), gradless=sorted(self.gradless),
        )
        for name, value in run.items():
            setattr(trace, name, value)
        if self.rootless and self.rootless == self.observed and self.bypassed:
            trace.rootless = True
            children = sorted(self.bypassed)
            name = children[0] if len(children) == 1 else "..."
            trace.notes.append(
                f"the model's own forward did not run at the observed steps: the training step "
                f"called its submodules directly ({', '.join(map(repr, children))}), so the "
                "model's inputs (TL201, TL202) and the link from its output to the loss (TL302, "
                "TL601) were not read; observe the submodule the training step calls "
                f"(trainlint.Monitor(model.{name}, ...); with Lightning, "
                f"TrainlintCallback(module={name!r}))")
        if self.checkpointed:
            trace.notes.append(
                f"{len(self.checkpointed)} layer(s) ran with autograd off and were recomputed in "
                "the backward (torch.utils.checkpoint with use_reentrant=True): their gradients "
                "are not measured, and the gradient rules (TL501, TL502) read the other layers; "
                "use_reentrant=False lets trainlint see them")
        return trace

    def _module_facts(self) -> dict:
        facts: dict[str, ModuleFacts] = {}
        for name, module in self.model.named_modules():
            facts[name] = ModuleFacts(
                name=name, type=type(module).__name__, base=torch_base(type(module)),
                training=module.training,
                is_leaf=is_leaf_module(module),
                location=locate(self.model, name, module), library=library_of(type(module)),
                attrs={**module_attrs(module), "overrides_train": overrides_train(module)})
            pruned = pruned_units(module)
            if pruned:
                facts[name].attrs["pruned_units"] = pruned
        # A weight shared with an earlier module (a language model's head tied to the token
        # embedding) is named once, under that module: keep where.
        canonical = {id(p): n for n, p in self.model.named_parameters()}
        for name, module in self.model.named_modules():
            weight = module._parameters.get("weight")
            own = f"{name}.weight" if name else "weight"
            if weight is not None and canonical.get(id(weight), own) != own:
                facts[name].attrs["weight_of"] = canonical[id(weight)]
        for name in self.attention_calls:
            if name in facts:
                facts[name].attrs["attends"] = True
        for name, ops in self.inner_ops.items():
            if name in facts and ops != MIXED:
                facts[name].attrs["inner_ops"] = list(ops)
        for name, norm in self.norm_functions.items():
            fact = facts.get(name)
            if fact is not None and fact.is_leaf and fact.base == fact.type:
                fact.base = norm  # a user's leaf class that is F.layer_norm: a LayerNorm
        for name, runs in self.batch_runs.items():
            if name in facts:
                facts[name].batch_runs = [list(run) for run in runs]
        for call in self.norm_calls:
            fact = facts.get(call.module)
            if fact is None or len(call.shape) < 2 or not call.training:
                continue
            numel = 1
            for s in call.shape:
                numel *= s
            fact.values_per_channel.append(numel // max(call.shape[1], 1))
            fact.batch_sizes.append(call.shape[0])
            if call.shape not in fact.input_shapes:
                fact.input_shapes.append(call.shape)
        return facts

    def _chosen_inputs(self, modules: dict) -> list:
        """One InputTrace per input; for 3-D and larger inputs the channel dim follows the
        first consumer (dim 1 for Conv1d/BatchNorm1d, the last dim otherwise; for a layer
        that takes the input flattened, the shorter of the two)."""
        chosen: dict[str, InputTrace] = {}
        for (name, dim), trace in sorted(self.inputs.items(), key=lambda kv: kv[0][1]):
            if len(trace.shape) < 3:
                chosen[name] = trace
                continue
            wants_channel_first = self._first_consumer_is_channel_first(name, trace.shape,
                                                                        modules)
            if (dim == 1) == wants_channel_first:
                chosen[name] = trace
        return list(chosen.values())

    def _first_consumer_is_channel_first(self, name: str, shape: tuple, modules: dict) -> bool:
        """Whether the input's channels are its dim 1: its first leaf consumer reads channels
        first (Conv, BatchNorm...), unless the input is permuted on the way (an NHWC image
        permuted for a Conv2d has its channels last, an NCHW one permuted for a Linear first).
        A consumer that takes the input flattened (nn.Flatten, or a Linear whose features are
        not the last dim: an MLP on MNIST images) makes every element a feature; the channels
        are then the shorter of dim 1 and the last dim (1 of (N, 1, 28, 28), 3 of NHWC)."""
        for src, dst, via in sorted(self.edges, key=repr):
            if src == ("input", name) and dst[0] == "module":
                facts: Optional[ModuleFacts] = modules.get(dst[1])
                if facts is not None and facts.is_leaf:
                    if _takes_flattened(facts, shape):
                        return shape[1] <= shape[-1]
                    first = facts.base.startswith(("Conv", "BatchNorm", "InstanceNorm",
                                                   "GroupNorm", "MaxPool", "AvgPool"))
                    return first != bool(REORDERING_OPS.intersection(via))
        return False


def _takes_flattened(facts: ModuleFacts, shape: tuple) -> bool:
    """Whether a layer takes an input of ``shape`` flattened: nn.Flatten, or a Linear whose
    features are not the input's last dim."""
    features = facts.attrs.get("in_features")
    return facts.base == "Flatten" or (isinstance(features, int) and features != shape[-1])
