"""The host record a Monitor keeps of each observed step: what it holds, read back as the
rules and sinks read it, and how much it grows over a long run."""

from __future__ import annotations

import gc
import math
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint import stats
from trainlint.assemble import MAX_UNIT_WINDOW, UNIT_VALUES, UNIT_WINDOW, TraceBuilder, window_for
from trainlint.probe import ProbeSnapshot
from trainlint.trace import StepLayers, layer_columns


def _snapshot(values: dict) -> ProbeSnapshot:
    return ProbeSnapshot(points={}, norm_calls=[], attention_calls=[], norm_functions={},
                         edges=set(), output_origins=[], failed_module=None, values=values,
                         train_flags={"model_training": True, "eval_modules": []})


def test_the_dead_unit_window_covers_a_points_last_calls() -> None:
    """A unit counts as active when it was in any of its point's last UNIT_WINDOW observed
    records; a step that did not observe the point does not age its window."""
    rng = np.random.default_rng(0)
    builder = TraceBuilder(nn.Identity(), mode="monitor")
    key = ("relu", "output", 12)
    history = []
    for step in range(40):
        if step % 7 == 3:  # a step that did not run this point (a branch not taken)
            builder.add(_snapshot({}), step)
            continue
        record = rng.random(12) < (0.05 if step > 15 else 0.4)  # most units go quiet later
        history.append(record)
        builder.add(_snapshot({("units", key): record.astype(np.float64)}), step)
        expected = np.logical_or.reduce(history[-UNIT_WINDOW:])
        assert builder.active_units(key).tolist() == expected.tolist(), step
        dead = builder.per_step[-1]["layers"][key]["dead_fraction"]
        assert dead == pytest.approx(1 - expected.mean())


def _act_row(values: int) -> np.ndarray:
    """An activation row (ACT_FIELDS) of ``values`` elements, all finite, read whole."""
    row = np.zeros((1, len(stats.ACT_FIELDS)))
    for field in ("n", "n_finite", "m", "m_finite"):
        row[0, stats.A[field]] = values
    row[0, stats.A["m2"]] = values / 4.0
    row[0, stats.A["max"]] = 1.0
    return row


@pytest.mark.parametrize("per_unit, window", [
    (UNIT_VALUES, UNIT_WINDOW),            # a conv map: UNIT_WINDOW records, the fewest
    (64, UNIT_VALUES // 64),               # a batch of 64: as many records as hold 512
    (4, UNIT_VALUES // 4),                 # a batch of 4
    (1, MAX_UNIT_WINDOW),                  # a batch of 1: at most MAX_UNIT_WINDOW records
])
def test_the_dead_unit_window_holds_enough_values_per_unit(per_unit: int, window: int) -> None:
    """Over few values a rarely active unit looks dead: the window takes as many records as
    hold UNIT_VALUES values per unit (the point's element count over its units), at least
    UNIT_WINDOW, at most MAX_UNIT_WINDOW; each unit is checked against an independent OR of
    the point's last ``window`` records."""
    rng = np.random.default_rng(1)
    builder = TraceBuilder(nn.Identity(), mode="monitor")
    units = 16
    key = ("relu", "output", units)
    history = []
    for step in range(window + 30):
        record = rng.random(units) < 0.03
        history.append(record)
        builder.add(_snapshot({("act", key): _act_row(per_unit * units),
                               ("units", key): record.astype(np.float64)}), step)
        expected = np.logical_or.reduce(history[-window:])
        assert builder.active_units(key).tolist() == expected.tolist(), step
    assert builder.unit_records(key) == window
    dead = builder.per_step[-1]["layers"][key]["dead_fraction"]
    assert dead == pytest.approx(1 - expected.mean())


@pytest.mark.parametrize("per_record, window", [
    (UNIT_VALUES / UNIT_WINDOW, UNIT_WINDOW), (UNIT_VALUES / UNIT_WINDOW * 0.99, UNIT_WINDOW + 1),
    (UNIT_VALUES / MAX_UNIT_WINDOW, MAX_UNIT_WINDOW),
    (UNIT_VALUES / MAX_UNIT_WINDOW * 1.01, math.ceil(MAX_UNIT_WINDOW / 1.01)),
    (0.0, MAX_UNIT_WINDOW),
])
def test_window_for_at_its_edges(per_record: float, window: int) -> None:
    assert window_for(per_record) == window


def _capture(model: nn.Module) -> tuple[dict, list]:
    """Each leaf's output (float64 copies) and the gradient w.r.t. it, per forward."""
    seen: dict = {}
    handles = []
    for name, module in model.named_children():
        def hook(_m, _a, out, name=name):
            seen.setdefault(name, []).append(out.detach().double())
            if out.requires_grad and not isinstance(_m, nn.ReLU):
                out.register_hook(lambda g, name=name: seen.setdefault(
                    name + ".grad", []).append(g.double()))
        handles.append(module.register_forward_hook(hook))
    return seen, handles


def test_each_steps_layers_read_as_dicts_of_what_was_measured() -> None:
    """per_step[i]["layers"][key] reads as a dict of that step's values: the output's mean, std,
    zero and saturated fractions, the norm of the gradient w.r.t. it where it is read, the
    dead fraction of a ReLU's units; computed here again from the same tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(4.0)  # the tanh partly in its tails
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    seen, handles = _capture(model)
    grads = []
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads.append({n: p.grad.double().norm().item() for n, p in model.named_parameters()})
            opt.step()
            monitor.step(loss)
        trace = monitor.report().trace
    for handle in handles:
        handle.remove()
    assert len(trace.per_step) == 3
    keys = {lt.module: lt.node[1:] for lt in trace.layers}
    for i, step in enumerate(trace.per_step):
        layers = step["layers"]
        assert set(layers) == set(keys.values()) and len(layers) == 5
        for name, key in keys.items():
            entry = layers[key]
            fields = {"std", "mean", "zero_fraction", "saturated_fraction", "signal"}
            measured = {"1": {"dead_fraction"}, "3": set()}  # (activations: no gradient)
            assert set(entry) == fields | measured.get(name, {"grad_norm"})
            out = seen[name][i]
            assert entry["mean"] == pytest.approx(out.mean().item(), rel=1e-9, abs=1e-12)
            assert entry["std"] == pytest.approx(out.std(unbiased=False).item(), rel=1e-9)
            assert entry["zero_fraction"] == pytest.approx((out == 0).double().mean().item())
            tails = (out.abs() > 0.99).double().mean().item() if name == "3" else 0.0
            assert entry["saturated_fraction"] == pytest.approx(tails)
            assert (tails > 0) is (name == "3")
            if name == "1":  # the ReLU: its units, not its gradient
                assert "grad_norm" not in entry
                ever = np.logical_or.reduce([(o > 0).any(0).numpy() for o in seen[name][:i + 1]])
                assert entry["dead_fraction"] == pytest.approx(1 - ever.mean())
            elif name != "3":
                assert "dead_fraction" not in entry
                assert entry["grad_norm"] == pytest.approx(
                    seen[name + ".grad"][i].norm().item(), rel=1e-9)
        assert layers.get(("nothing", "output", None)) is None
        norms = step["param_grad_norms"]
        assert set(norms) == set(grads[i]) and "nothing" not in norms
        assert dict(norms) == pytest.approx(grads[i], rel=1e-6)
        assert step["grad_norm"] == pytest.approx(np.linalg.norm(list(grads[i].values())),
                                                  rel=1e-6)
    again = pickle.loads(pickle.dumps(trace.per_step))
    assert [dict(s["layers"]) for s in again] == [dict(s["layers"]) for s in trace.per_step]


def _record_growth(width: int, depth: int, steps: int) -> tuple[float, int, int]:
    """Bytes the Monitor's host record grows by per observed step (after a warm-up), and the
    model's observed points and parameters."""
    torch.manual_seed(0)
    layers: list = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, width), torch.randint(0, 2, (8,))

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        monitor.step(loss)

    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(5):
            step()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(steps):
                step()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        trace = monitor.report().trace
    return grown / steps, len(trace.layers), len(trace.params)


def test_a_long_runs_record_grows_by_a_few_numbers_per_layer_and_step() -> None:
    """What an observed step adds to the record is its numbers: up to 6 float64 values a layer
    and 3 a parameter kept in arrays (~9 KB a step here, with the step's own dicts), not a
    dict per layer and a float object per value (~29 KB a step here before): under 150 bytes
    per layer and parameter."""
    per_step, points, params = _record_growth(width=16, depth=24, steps=30)
    assert points == 49 and params == 50
    assert per_step < 150 * (points + params), per_step


def test_a_steps_layers_read_by_columns_as_by_entries() -> None:
    """``layer_columns`` reads a step's fields for many layers at once, from the builder's
    columns or from a plain dict of dicts (a hand-built trace), with the same answers: None
    for a field a layer lacks, None for the whole when a layer was not observed."""
    index = {("a", "output", None): 0, ("b", "output", 4): 1, ("c", "relu", 4): 2}
    columns = {"std": (np.array([1.0, 2.0, 3.0]), None),
               "grad_norm": (np.array([0.5, np.nan, 0.25]), np.array([True, False, True])),
               "signal": (np.array([np.nan, np.nan, 7.0]), np.array([False, False, True]))}
    packed = StepLayers(index, columns)
    plain = {key: dict(packed[key]) for key in packed}
    assert plain == {("a", "output", None): {"std": 1.0, "grad_norm": 0.5},
                     ("b", "output", 4): {"std": 2.0},
                     ("c", "relu", 4): {"std": 3.0, "grad_norm": 0.25, "signal": 7.0}}
    assert packed == plain and len(packed[("b", "output", 4)]) == 1
    assert packed.get(("b", "output", 4)).get("grad_norm", -1.0) == -1.0
    keys = [("c", "relu", 4), ("a", "output", None)]
    names = ("std", "grad_norm", "signal", "mean")
    for layers in (packed, plain):
        assert layer_columns(layers, keys, names) == {
            "std": [3.0, 1.0], "grad_norm": [0.25, 0.5], "signal": [7.0, None],
            "mean": [None, None]}
        assert layer_columns(layers, keys + [("d", "output", None)], names) is None
