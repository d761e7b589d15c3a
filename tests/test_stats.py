"""trainlint.stats and the probe's per-layer numbers against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import trainlint
from tests.conftest import NoForeach
from trainlint import stats
from trainlint.trace import GRADIENT_FREE_KINDS

A = stats.A


def direct_moments(values: np.ndarray, kind: str | None = None) -> dict:
    """Moments of the finite elements, computed in float64 with numpy."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = x[np.isfinite(x)]
    if kind == "tanh":
        saturated = int((np.abs(finite) > 0.99).sum())
    elif kind == "sigmoid":
        saturated = int((np.abs(2 * finite - 1) > 0.99).sum())
    else:
        saturated = 0
    return {"count": x.size, "finite": finite.size, "mean": finite.mean(), "std": finite.std(),
            "min": finite.min(), "max": finite.max(), "zeros": int((finite == 0).sum()),
            "saturated": saturated}


def tensor_with_specials(seed: int, shape: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3] = float("nan")
    flat[5] = float("inf")
    flat[11] = -float("inf")
    return x


@pytest.mark.parametrize("kind", [None, "relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6, 5), (2, 9, 8),
                                   # still copied whole, into rows wider than SAMPLE_TARGET
                                   (2049,), (40, 130), (3, 1000, 3), (16, 64, 4, 4)])
def test_activation_stats_match_direct_computation(kind: str | None, shape: tuple) -> None:
    x = tensor_with_specials(1, shape)
    if kind == "tanh":
        x = torch.where(torch.isfinite(x), torch.tanh(x * 2), x)
    elif kind == "sigmoid":
        x = torch.where(torch.isfinite(x), torch.sigmoid(x * 3), x)
    v = stats.activation_stats(x, kind).numpy()
    d = direct_moments(x.numpy(), kind)
    assert v[A["n"]] == d["count"]
    assert v[A["n_finite"]] == d["finite"] == d["count"] - 3
    assert v[A["m"]] == d["count"] and v[A["m_finite"]] == d["finite"]
    assert v[A["zeros"]] == d["zeros"]
    assert v[A["saturated"]] == d["saturated"]
    assert v[A["min"]] == d["min"] and v[A["max"]] == d["max"]
    merged = stats.merge_moments(v[None])
    assert merged["mean"] == pytest.approx(d["mean"], rel=1e-9, abs=1e-12)
    assert merged["std"] == pytest.approx(d["std"], rel=1e-9)
    assert merged["nonfinite"] == 3
    assert merged["zero_fraction"] == d["zeros"] / d["finite"]
    assert not merged["sampled"]


def test_saturation_counts_are_nonzero_where_expected() -> None:
    """Guard for the test above: the tanh/sigmoid inputs really have saturated elements."""
    x = torch.tanh(torch.linspace(-5, 5, 1001))
    v = stats.activation_stats(x, "tanh").numpy()
    assert v[A["saturated"]] == int((x.double().abs() > 0.99).sum()) > 0
    s = torch.sigmoid(torch.linspace(-8, 8, 1001))
    v = stats.activation_stats(s, "sigmoid").numpy()
    assert v[A["saturated"]] == int(((2 * s.double() - 1).abs() > 0.99).sum()) > 0
    assert stats.activation_stats(x, None).numpy()[A["saturated"]] == 0


def test_all_nonfinite_tensor_gives_nan_extremes_and_zero_moments() -> None:
    x = torch.tensor([float("nan"), float("inf")])
    merged = stats.merge_moments(stats.activation_stats(x, None).numpy()[None])
    assert merged["nonfinite"] == 2 and merged["count"] == 2
    assert math.isnan(merged["min"]) and math.isnan(merged["max"])
    assert merged["mean"] == 0.0 and merged["std"] == 0.0


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1), offset=st.floats(-1e3, 1e3))
def test_merged_moments_equal_moments_of_concatenation(sizes: list, seed: int,
                                                       offset: float) -> None:
    rng = np.random.default_rng(seed)
    chunks = [torch.from_numpy(rng.normal(offset, 1 + i, size=n)).float()
              for i, n in enumerate(sizes)]
    rows = np.stack([stats.activation_stats(c, None).numpy() for c in chunks])
    merged = stats.merge_moments(rows)
    d = direct_moments(torch.cat(chunks).numpy())
    assert merged["count"] == d["count"]
    assert merged["mean"] == pytest.approx(d["mean"], rel=1e-9, abs=1e-9)
    assert merged["std"] == pytest.approx(d["std"], rel=1e-7, abs=1e-9)
    assert merged["rms"] == pytest.approx(math.sqrt(d["std"] ** 2 + d["mean"] ** 2), rel=1e-7)
    assert merged["min"] == d["min"] and merged["max"] == d["max"]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1), offset=st.floats(-1e3, 1e3),
       bad=st.lists(st.booleans(), min_size=6, max_size=6))
def test_rows_folded_one_call_at_a_time_merge_as_all_the_rows(sizes: list, seed: int,
                                                              offset: float, bad: list) -> None:
    rng = np.random.default_rng(seed)
    chunks = [torch.from_numpy(rng.normal(offset, 1 + i, size=n)).float()
              for i, n in enumerate(sizes)]
    for chunk, nan in zip(chunks, bad):
        if nan:
            chunk[0] = math.nan
    rows = np.stack([stats.activation_stats(c, "relu").numpy() for c in chunks])
    folded = rows[:1]
    for row in rows[1:]:
        folded = stats.fold_moments(np.concatenate([folded, row[None]]))
    assert folded.shape == (1, len(stats.ACT_FIELDS))
    once, all_rows = stats.merge_moments(folded), stats.merge_moments(rows)
    assert once.keys() == all_rows.keys()
    for key, value in all_rows.items():
        assert once[key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), key
    values = torch.cat(chunks).numpy()
    assert once["nonfinite"] == sum(bad[:len(sizes)])
    if np.isfinite(values).any():
        d = direct_moments(values)
        assert once["mean"] == pytest.approx(d["mean"], rel=1e-9, abs=1e-9)
        assert once["std"] == pytest.approx(d["std"], rel=1e-7, abs=1e-9)


def kurtosis(x: np.ndarray) -> float:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    return float(((v - v.mean()) ** 4).mean() / v.var() ** 2)


def test_strided_estimate_on_large_tensor_is_within_stated_error() -> None:
    """Above SAMPLE_ABOVE elements the moments come from a sample of SAMPLE_TARGET values;
    the count stays exact and the sample's extremes lie inside the tensor's. Stated error: the
    mean within 5 standard errors, the std within 5 standard errors of a variance estimate
    (``sqrt((kurtosis - 1) / 4m)`` relative), the zero fraction within 5 binomial errors."""
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(17, 8, 64, 64, generator=g) * 3 + 1)
    assert x.numel() > stats.SAMPLE_ABOVE
    v = stats.activation_stats(x, "relu").numpy()
    merged = stats.merge_moments(v[None])
    d = direct_moments(x.numpy())
    m = v[A["m"]]
    assert merged["sampled"] and m == stats.SAMPLE_TARGET
    assert merged["count"] == d["count"] and merged["nonfinite"] == 0
    assert d["min"] <= merged["min"] <= merged["max"] <= d["max"]
    assert abs(merged["mean"] - d["mean"]) <= 5 * d["std"] / math.sqrt(m)
    rel = 5 * math.sqrt((kurtosis(x.numpy()) - 1) / (4 * m))
    assert merged["std"] == pytest.approx(d["std"], rel=rel)
    p = d["zeros"] / d["count"]
    assert abs(merged["zero_fraction"] - p) <= 5 * math.sqrt(p * (1 - p) / m)


def test_probe_extremes_of_sampled_unit_outputs_are_exact() -> None:
    """A sampled ReLU/GELU output's max (GELU: and min) comes from the per-unit record, which
    reads every element: exact, however rare the extreme value."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 48, generator=g)
    model = nn.Sequential(nn.Linear(48, 512), nn.ReLU(), nn.Linear(512, 512), nn.GELU(),
                          nn.Linear(512, 4))
    capture = Capture(model)
    try:
        trace = trainlint.check(model, (x, torch.randint(0, 4, (64,), generator=g)),
                                steps=1).trace
    finally:
        capture.remove()
    layers = trace.layer_by_key()
    for name in ("1", "3"):
        out = capture.outputs[name][0]
        assert out.numel() > stats.SAMPLE_ABOVE
        act = layers[(name, "output")].activation
        assert act.max == float(out.max()), name
    assert layers[("3", "output")].activation.min == float(capture.outputs["3"][0].min())


def test_strided_sample_does_not_alias_with_the_layout() -> None:
    """Power-of-two maps where one column differs (e.g. zero padding): a stride that divides
    the map size would sample only that column."""
    x = torch.randn(16, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 0.0
    merged = stats.merge_moments(stats.activation_stats(x, None).numpy()[None])
    truth = 1 / 64
    assert merged["sampled"]
    m = stats.SAMPLE_TARGET
    # a biased sample would read the zero column in every run (1/16) or in none (0)
    assert abs(merged["zero_fraction"] - truth) <= 5 * math.sqrt(truth * (1 - truth) / m)
    assert merged["std"] == pytest.approx(float(x.double().std()), rel=5 * math.sqrt(2 / (4 * m)))


@pytest.fixture(params=[False, True], ids=["cpu-layouts", "one-reduction"])
def reduction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways of reducing per unit: the CPU's reshaped passes, and CUDA's one op."""
    monkeypatch.setattr(stats, "one_reduction", lambda y: request.param)
    return request.param


@pytest.mark.parametrize("shape,unit_dim", [((4, 6), -1), ((3, 5, 4, 4), 1), ((2, 7, 6), -1),
                                             ((6,), 0), ((300, 80), -1), ((4, 3, 2, 5, 6), 1)])
def test_unit_active_matches_direct_any(shape: tuple, unit_dim: int, reduction: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(*shape, generator=g) - 1.0)
    units = shape[unit_dim]
    for u in range(0, units, 2):  # every other unit is dead
        x.select(unit_dim, u).zero_()
    got = stats.unit_active(x, unit_dim).numpy()
    axes = tuple(i for i in range(x.dim()) if i != unit_dim % x.dim())
    expected = (x.numpy() > 0).any(axis=axes) if axes else x.numpy() > 0
    np.testing.assert_array_equal(got, expected)
    assert not got[::2].any()


@pytest.mark.parametrize("shape,unit_dim", [((5, 3, 4, 4), 1), ((6, 130), -1), ((2, 3, 9), -1)])
def test_unit_extremes_match_direct_max_and_min_with_nan_kept(shape: tuple, unit_dim: int,
                                                              reduction: bool) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    x.select(unit_dim, 1)[(0,) * (x.dim() - 1)] = math.nan
    hi, lo = stats.unit_extremes(x, unit_dim, "gelu")
    moved = np.moveaxis(x.numpy(), unit_dim, 0).reshape(shape[unit_dim], -1)
    np.testing.assert_array_equal(hi.numpy(), moved.max(axis=1))  # NaN where the unit has one
    np.testing.assert_array_equal(lo.numpy(), moved.min(axis=1))
    assert math.isnan(hi[1]) and math.isnan(lo[1]) and not torch.isnan(hi[0])


def test_unit_active_gelu_family_is_a_positive_output_or_one_below_the_level() -> None:
    level = stats.GELU_ACTIVE_LEVEL
    x = torch.tensor([[0.0, 0.5 * level, -0.5 * level, -2 * level, 0.5, -1e-30]])
    got = stats.unit_active(x, -1, "gelu").numpy()
    direct = (x.numpy()[0] > 0) | (x.numpy()[0] < -level)
    np.testing.assert_array_equal(got, direct)
    np.testing.assert_array_equal(got, [False, True, False, True, True, False])


@pytest.mark.parametrize("fill", ["nan", "inf", "-inf", "all -inf", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64])
def test_nan_probe_is_nan_exactly_when_the_tensor_holds_a_nan(fill: str,
                                                              dtype: torch.dtype) -> None:
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    if fill == "all -inf":
        x = torch.full((64, 300), float("-inf")).to(dtype)
    elif fill != "none":
        x[17, 211] = float(fill) if dtype != torch.complex64 else complex(0.5, float(fill))
    view = x.t()  # a transposed (non-contiguous) view reads the same
    for t in (x, view):
        probe = stats.nan_probe(t)
        assert bool(torch.isnan(probe)) == bool(torch.isnan(t).any()) == (fill == "nan")

def test_a_take_of_the_sample_reads_the_same_values_as_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's one ``take`` per sample and the CPU's runs: the same elements, the same numbers."""
    x = torch.randn(64, 300, 8, generator=torch.Generator().manual_seed(6))
    x[3, 7, 2] = math.nan

    def read() -> tuple:
        stats._cache.clear()  # plans are cached per shape and device
        plan = stats.plan_for(x, True)
        return (plan.copies[-1].how, stats.sample_values(x), stats.activation_stats(x, "tanh"),
                stats.between_sample(x), stats.grad_stats(x))

    runs = read()
    monkeypatch.setattr(stats, "gathers_runs", lambda device: False)
    take = read()
    stats._cache.clear()
    assert (runs[0], take[0]) == ("runs", "take")
    positions = stats.sample_positions(x)
    torch.testing.assert_close(take[1], x.reshape(-1)[positions], equal_nan=True)
    for a, b in zip(runs[1:], take[1:]):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_full_probes_are_finite_exactly_when_each_tensor_is(batched: bool) -> None:
    """The weights' full reads: one sum each, or (CUDA) multi-tensor L1 norms per dtype."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, generator=g).to(dtype) for n in (70000, 300, 5, 20000)
          for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.complex64)]
    xs += [torch.zeros(0), torch.randn(8, 9, generator=g).t()]
    for i, bad in ((1, math.nan), (6, math.inf), (10, -math.inf), (15, math.nan),
                   (17, math.inf)):
        xs[i][(3,) if xs[i].dim() == 1 else (3, 2)] = (
            bad if not xs[i].is_complex() else complex(0.0, bad))
    xs += [NoForeach(torch.randn(300, generator=g)), NoForeach(torch.randn(300, generator=g))]
    xs[-1].data[5] = math.nan  # a subclass keeps its own sum
    probes = stats.full_probes(xs, batched)
    finite = [bool(torch.isfinite(torch.as_tensor(p)).all()) for p in probes]
    assert finite == [bool(torch.isfinite(x).all()) for x in xs]
    assert all(p.dim() == 0 for p in probes)


def test_grad_stats_match_direct_norm_and_skip_nonfinite() -> None:
    g = torch.randn(10, 20, generator=torch.Generator().manual_seed(3))
    g[0, 0] = float("nan")
    g[1, 1] = float("inf")
    merged = stats.merge_grads(np.stack([stats.grad_stats(g).numpy(),
                                         stats.grad_stats(g[2:]).numpy()]))
    finite = np.concatenate([g.numpy().ravel(), g[2:].numpy().ravel()])
    finite = finite[np.isfinite(finite)].astype(np.float64)
    assert merged["norm"] == pytest.approx(np.sqrt((finite ** 2).sum()), rel=1e-9)
    assert merged["nonfinite"] == 2
    assert merged["rms"] == pytest.approx(merged["norm"] / math.sqrt(200 + 160), rel=1e-9)


# ------------------------------------------------------------------ the probe on a real model

class Capture:
    """Our own hooks: a copy of every output and of the gradient w.r.t. it, per call."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, list] = {}
        self.grads: dict[str, list] = {}
        self.handles = []
        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.outputs.setdefault(name, []).append(out.detach().clone())
            if out.requires_grad:
                out.register_hook(lambda g: self.grads.setdefault(name, []).append(g.clone()))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def probe_net() -> nn.Sequential:
    """1x1 conv copying its inputs into channels 0 and 1, channel 2 biased dead, channel 3 =
    x0 + x1; then Linear features with two dead ones, a tanh, a head."""
    conv = nn.Conv2d(2, 4, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = conv.weight[1, 1] = 1.0
        conv.weight[3, 0] = conv.weight[3, 1] = 1.0
        conv.bias.copy_(torch.tensor([0.0, 0.0, -100.0, 0.0]))
    fc = nn.Linear(4 * 5 * 5, 12)
    with torch.no_grad():
        fc.bias[:2] = -100.0
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc, nn.ReLU(), nn.Linear(12, 6),
                         nn.Tanh(), nn.Linear(6, 3))


def probe_batches() -> list:
    """Three steps of negative inputs; channel 0 gets one positive value in step 1 only."""
    g = torch.Generator().manual_seed(4)
    batches = []
    for step in range(3):
        x = -torch.rand(6, 2, 5, 5, generator=g) - 0.1
        if step == 1:
            x[2, 0, 3, 1] = 4.0
        batches.append((x * 3, torch.randint(0, 3, (6,), generator=g)))
    return batches


@pytest.fixture(scope="module")
def probed() -> tuple:
    model = probe_net()
    batches = iter(probe_batches())
    capture = Capture(model)
    try:
        report = trainlint.check(model, lambda: next(batches), steps=3)
    finally:
        capture.remove()
    return report.trace, capture


def test_probe_counts_statistics_and_extremes_match_captured_outputs(probed: tuple) -> None:
    trace, capture = probed
    layers = trace.layer_by_key()
    assert set(capture.outputs) == {k[0] for k in layers}
    for name, outs in capture.outputs.items():
        assert len(outs) == trace.observed_steps == 3
        lt = layers[(name, "output")]
        values = np.concatenate([o.numpy().ravel() for o in outs])
        d = direct_moments(values, lt.kind if lt.kind in ("tanh", "sigmoid") else None)
        act = lt.activation
        assert act.count == d["count"], name
        assert round(act.zero_fraction * act.count) == d["zeros"], name
        assert act.zero_fraction * act.count == pytest.approx(d["zeros"], abs=1e-6)
        assert act.mean == pytest.approx(d["mean"], rel=1e-5, abs=1e-9), name
        assert act.std == pytest.approx(d["std"], rel=1e-5), name
        assert act.min == d["min"] and act.max == d["max"], name
        if lt.kind == "tanh":
            assert round(act.saturated_fraction * act.count) == d["saturated"]


def test_probe_dead_units_are_exact_over_all_steps(probed: tuple) -> None:
    trace, capture = probed
    layers = trace.layer_by_key()
    conv_relu, fc_relu = layers[("1", "output")], layers[("4", "output")]
    assert conv_relu.unit_dim == 1 and fc_relu.unit_dim == -1
    conv_outs = np.stack([o.numpy() for o in capture.outputs["1"]])  # (step, N, C, H, W)
    alive_per_step = (conv_outs > 0).any(axis=(1, 3, 4))
    assert alive_per_step[:, 0].tolist() == [False, True, False], "design: unit 0 lives once"
    expected = sorted(np.flatnonzero(~alive_per_step.any(axis=0)))
    assert conv_relu.dead_units == expected
    assert 0 not in expected and {1, 2} <= set(expected)
    fc_outs = np.concatenate([o.numpy() for o in capture.outputs["4"]])
    fc_expected = sorted(np.flatnonzero(~(fc_outs > 0).any(axis=0)))
    assert fc_relu.dead_units == fc_expected and {0, 1} <= set(fc_expected)
    assert fc_relu.dead_fraction == pytest.approx(len(fc_expected) / 12, rel=1e-12)


def test_probe_gradient_norms_match_captured_gradients(probed: tuple) -> None:
    trace, capture = probed
    layers = trace.layer_by_key()
    read = 0
    for name, grads in capture.grads.items():
        assert len(grads) == 3
        layer = layers[(name, "output")]
        if layer.kind in GRADIENT_FREE_KINDS:  # not read inside the network (by design)
            assert layer.grad_norm is None, name
            continue
        expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        assert layer.grad_norm == pytest.approx(expected, rel=1e-5), name
        read += 1
    assert read == 5  # conv, flatten and the three Linear layers


@pytest.mark.parametrize("batches", [2, stats.MAX_BUFFERS + 2])
def test_steps_of_several_batches_of_rows_match_each_tensor_read_alone(batches: int) -> None:
    """A step with more rows than a batch holds, repeated as training repeats it (same
    shapes, same order, new values; once with a smaller batch, as an epoch's last): the rows
    that share a slot across the step's batches differ in size, and each step's statistics
    equal those of each tensor read on its own (no value of another tensor, or of the same
    tensor in a larger batch, left in a row's NaN padding). Past MAX_BUFFERS batches the
    last buffer is shared, and no more are made."""
    per_batch = stats.batch_rows(stats.SAMPLE_TARGET + 2 * stats.SIGNAL_WIDTH)
    count = (batches - 1) * per_batch + 5
    shapes = [(4, 250) if (i // per_batch) % 2 == 0 else (2, 60) for i in range(count)]
    shapes[per_batch + 1] = (4, 400)  # wider than what its slot held in the first batch
    smaller = [(n // 2, width) for n, width in shapes]
    g = torch.Generator().manual_seed(0)
    batch = stats.ActivationBatch(torch.device("cpu"))
    for step in (shapes, shapes, smaller, shapes):
        xs = [torch.randn(*shape, generator=g) * (1 + i % 3) for i, shape in enumerate(step)]
        for x in xs:
            batch.add(x)
        rows, signal = batch.rows(batch.device_part().numpy())
        alone = np.stack([stats.activation_stats(x, None).numpy() for x in xs])
        np.testing.assert_allclose(rows, alone, rtol=1e-12, atol=0)
        pairs = np.stack([stats.between_sample(x).numpy() for x in xs])
        np.testing.assert_allclose(signal, pairs, rtol=1e-12, atol=0)
    (store,) = batch.stores.values()
    assert len(store.buffers) == min(batches, stats.MAX_BUFFERS)


def test_between_sample_is_half_the_mean_squared_pair_difference():
    x = torch.randn(9, 3, 5, 5, dtype=torch.float64)
    total, count = stats.between_sample(x).tolist()
    pairs = min(x.shape[0] // 2, stats.SIGNAL_PAIRS)
    d = torch.stack([x[2 * i] - x[2 * i + 1] for i in range(pairs)])
    assert count == d.numel()
    assert total == pytest.approx(float((d ** 2).sum() / 2), rel=1e-12)


def test_between_sample_of_a_mid_size_tensor_copied_whole():
    x = torch.randn(8, 1300, dtype=torch.float64)  # 10400 values: exact, a 16384-wide row
    total, count = stats.between_sample(x).tolist()
    assert count == stats.SIGNAL_WIDTH
    positions = stats.spread(4 * 1300, stats.SIGNAL_WIDTH, torch.device("cpu"))
    first = (positions // 1300) * 2600 + positions % 1300
    flat = x.reshape(-1)
    d = flat[first] - flat[first + 1300]
    assert total == pytest.approx(float((d ** 2).sum() / 2), rel=1e-12)


def test_between_sample_ignores_what_every_sample_shares():
    bias = torch.randn(1, 64) * 5
    x = bias.expand(16, 64) + 1e-3 * torch.randn(16, 64)
    total, count = stats.between_sample(x).tolist()
    assert (total / count) ** 0.5 == pytest.approx(1e-3, rel=0.2)


@pytest.mark.parametrize("bias, dead", [(0.0, False), (-10.0, True)])
def test_a_gelu_fed_tiny_inputs_is_small_not_dead(bias: float, dead: bool) -> None:
    """GELU after a layer of weights ~1e-5 (FocalNet's init): outputs of both signs below 1e-3,
    from inputs near 0 where the slope is 0.5. After a bias of -10 the units are dead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4))
    nn.init.normal_(model[0].weight, std=1e-5)
    nn.init.constant_(model[0].bias, bias)
    x = torch.randn(16, 32)
    with torch.no_grad():
        y = model[1](model[0](x))
    assert float(y.abs().max()) < stats.GELU_ACTIVE_LEVEL
    report = trainlint.check(model, (x, torch.randint(0, 4, (16,))), steps=1)
    layer = next(lt for lt in report.trace.layers if lt.module == "1")
    direct = ((y.amax(0) <= 0) & (y.amin(0) >= -stats.GELU_ACTIVE_LEVEL)).float().mean()
    assert layer.dead_fraction == pytest.approx(float(direct))
    assert (layer.dead_fraction == 1.0) is dead
    assert any(f.code == "TL101" for f in report.findings) is dead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.complex64])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf, "both"])
def test_the_batch_probe_tells_nan_from_inf(dtype: torch.dtype, bad: object) -> None:
    """NaN where the tensor holds a NaN, +inf where it holds ±Inf and no NaN, else 0: as
    isnan/isinf over its elements say."""
    x = torch.randn(64, 33).to(dtype)
    if bad == "both":
        x[3, 4], x[60, 0] = -math.inf, math.nan
    elif bad is not None:
        x[7, 30] = bad
    parts = torch.view_as_real(x) if x.is_complex() else x
    nan, inf = bool(parts.isnan().any()), bool(parts.isinf().any())
    value, lo, hi = stats.batch_probe(x).tolist()
    if nan:
        assert math.isnan(value)
    else:
        assert value == (math.inf if inf else 0.0)
        finite = parts.float()
        assert (lo, hi) == (finite.min().item(), finite.max().item())
