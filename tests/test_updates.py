"""UpdateSampler: the before/after samples of the optimizer's parameters and the sums of
squares it derives from them, against the same sums computed directly on the parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import NoForeach
from trainlint import stats
from trainlint.updates import S, UpdateSampler


@pytest.fixture(autouse=True, params=["runs", "take"])
def gather(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Both ways of gathering a contiguous tensor's sample: runs (CPU), one take (CUDA)."""
    monkeypatch.setattr(stats, "gathers_runs", lambda device: request.param == "runs")
    stats._cache.clear()  # plans are cached per shape and device
    yield request.param
    stats._cache.clear()


def _params() -> list:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(300, 200, generator=g),                       # sampled (runs)
        torch.randn(40, 30, generator=g),                         # small: copied whole
        torch.randn(200, 300, generator=g).t(),                   # sampled, not contiguous
        torch.randn(50, generator=g, dtype=torch.float64),        # another dtype group
        torch.randn(70000, generator=g).to(torch.bfloat16),       # 16-bit: float32 sample
        torch.randn(10, 8, generator=g).to(torch.float16).t(),    # 16-bit, small, strided
        torch.zeros(0),                                           # empty
        torch.randn(6, 5, generator=g, dtype=torch.complex64),    # complex: |z|^2
    ]


def _step(params: list) -> None:
    for i, p in enumerate(params):
        p.add_(torch.ones_like(p) * 0.5 * (i + 1))


def _direct(p: torch.Tensor, before: torch.Tensor) -> tuple:
    """Sums of squares of the sample of ``before`` and of the sample of ``p - before``."""
    positions = stats.sample_positions(p)
    if p.is_complex():
        b, a = before.reshape(-1)[positions], p.detach().reshape(-1)[positions]
        return float((b.abs().double() ** 2).sum()), float(((a - b).abs().double() ** 2).sum())
    b = before.reshape(-1).double()[positions] if p.numel() else torch.zeros(0)
    a = p.detach().reshape(-1).double()[positions] if p.numel() else torch.zeros(0)
    if p.dtype in (torch.float16, torch.bfloat16):  # the sample is kept in float32
        b, a = b.float().double(), a.float().double()
    return float((b * b).sum()), float(((a.float() - b.float()).double() ** 2).sum())


def test_sums_match_a_direct_computation_on_each_parameters_sample() -> None:
    params = _params()
    before = [p.clone() for p in params]
    sampler = UpdateSampler()
    sampler.before(params)
    _step(params)
    groups = sampler.after()
    assert sorted(id(p) for ps, _, _ in groups for p in ps) == sorted(id(p) for p in params)
    for ps, sizes, sums in groups:
        for p, size, got_before, got_delta in zip(ps, sizes, sums[0].tolist(),
                                                  sums[1].tolist()):
            i = next(k for k, q in enumerate(params) if q is p)
            want_before, want_delta = _direct(p, before[i])
            assert got_before == pytest.approx(want_before, rel=1e-6)
            assert got_delta == pytest.approx(want_delta, rel=1e-5)
            expected_m = p.numel() if p.numel() <= stats.SAMPLE_ABOVE else stats.SAMPLE_TARGET
            assert size == expected_m


def _moments_of_sample(p: torch.Tensor) -> tuple:
    """Number of finite values, their mean and sum of squared deviations, of ``p``'s sample
    (moduli for complex values; 16-bit values as float32), by numpy in float64."""
    values = p.detach().reshape(-1)[stats.sample_positions(p)] if p.numel() else p.reshape(-1)
    if p.is_complex():
        values = values.abs()
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    values = values.double().numpy()
    finite = values[np.isfinite(values)]
    mean = float(finite.mean()) if finite.size else 0.0
    return finite.size, mean, float(((finite - mean) ** 2).sum())


def test_moments_after_the_step_match_a_direct_computation_on_each_parameters_sample() -> None:
    params = _params()
    params.append(torch.full((500,), 3.0) + torch.arange(500) * 1e-6)  # tiny spread, far from 0
    sampler = UpdateSampler()
    sampler.before(params)
    _step(params)
    params[0].view(-1)[stats.sample_positions(params[0])[5]] = math.nan  # one NaN in a sample
    params[1][0, 0] = -math.inf
    seen = 0
    for ps, _, sums in sampler.after():
        rows = [sums[S[name]].tolist() for name in ("finite", "mean", "m2")]
        for p, count, mean, m2 in zip(ps, *rows):
            want_count, want_mean, want_m2 = _moments_of_sample(p)
            assert count == want_count
            assert mean == pytest.approx(want_mean, rel=1e-9, abs=1e-12)
            assert m2 == pytest.approx(want_m2, rel=1e-6, abs=1e-12)
            seen += 1
    assert seen == len(params)


def test_gradients_laid_out_as_their_parameter_are_sampled_with_it(gather: str) -> None:
    params = _params()
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    # Gathered by runs of a contiguous parameter: a transposed gradient is left to a row; one
    # take of its elements reads any layout.
    params[0].grad = torch.randn(200, 300, generator=g).t()
    # Gathered element by element (a transposed parameter): any layout will do.
    params[2].grad = params[2].grad.contiguous()
    params[2].grad.view(-1)[stats.sample_positions(params[2])[3]] = math.inf
    params[1].grad = torch.randn(30, 40, generator=g).t()  # small: copied whole, any layout
    params[6].grad = None
    sampler = UpdateSampler()
    taken = sampler.before(params)
    left = (0, 6) if gather == "runs" else (6,)
    assert taken == {id(p) for i, p in enumerate(params) if i not in left}
    _step(params)
    for ps, _, sums in sampler.after():
        for p, finite, sumsq in zip(ps, sums[S["grad_finite"]].tolist(),
                                    sums[S["grad_sumsq"]].tolist()):
            if id(p) not in taken:
                continue
            values = p.grad.reshape(-1)[stats.sample_positions(p)]
            values = (values.abs() if values.is_complex() else values.float()).double()
            ok = values[torch.isfinite(values)]
            assert finite == ok.numel()
            assert sumsq == pytest.approx(float((ok * ok).sum()), rel=1e-9)


def test_nonfinite_values_in_the_sample_give_nonfinite_sums() -> None:
    params = [torch.randn(100), torch.randn(100)]
    sampler = UpdateSampler()
    sampler.before(params)
    params[0][7] = math.nan
    params[1][3] = math.inf
    [(_, _, sums)] = sampler.after()
    assert math.isnan(sums[1, 0]) and math.isfinite(sums[0, 0])
    assert math.isinf(sums[1, 1])


def test_a_parameter_subclass_is_sampled_by_its_own_copy() -> None:
    g = torch.Generator().manual_seed(3)
    params = [NoForeach(torch.randn(30, 4, generator=g)), torch.randn(50, generator=g)]
    params[0].grad = torch.randn(30, 4, generator=g)
    befores = [p.detach().clone() for p in params]
    sampler = UpdateSampler()
    assert sampler.before(params) == {id(params[0])}
    with torch.no_grad():
        _step(params)
    [(ps, _, sums)] = sampler.after()
    for p, before, got in zip(ps, befores, sums[S["update"]].tolist()):
        assert got == pytest.approx(_direct(p, before)[1], rel=1e-9)
    assert sums[S["grad_sumsq"], 0] == pytest.approx(float((params[0].grad.double() ** 2).sum()))


def test_the_layout_follows_a_parameter_that_changes_shape() -> None:
    p, q = torch.randn(64), torch.randn(8)
    sampler = UpdateSampler()
    sampler.before([p, q])
    sampler.after()
    p.data = torch.randn(32)  # resized in place of the old tensor's data
    sampler.before([p, q])
    p.data.add_(1.0)
    [(_, sizes, sums)] = sampler.after()
    assert sums[1, 0] == pytest.approx(32.0)
    assert sums[1, 1] == 0.0
    assert sizes.tolist() == [32, 8]


def test_a_complex_parameters_update_is_measured_in_a_monitored_step() -> None:
    class Complex(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((x.to(torch.complex64) @ self.w).abs())

    import trainlint

    torch.manual_seed(0)
    model = Complex()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        before = model.w.detach().clone()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        monitor.step(loss)
        expected = float((model.w.detach() - before).abs().pow(2).sum().sqrt())
        [w] = [p for p in monitor.report().trace.params if p.name == "w"]
    assert w.update_norms == [pytest.approx(expected, rel=1e-5)]


def test_a_nan_in_the_imaginary_part_of_a_complex_weight_is_seen() -> None:
    import trainlint

    model = torch.nn.Linear(4, 2)
    model.register_parameter("c", torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    with torch.no_grad():
        model.c[1] = complex(0.0, float("nan"))
    probe = trainlint.probe.Probe(model).attach()
    probe.begin_step()
    model(torch.randn(5, 4)).sum().backward()
    snap = probe.collect()
    probe.detach()
    [(names, finite)] = [(k[1], v) for k, v in snap.values.items() if k[0] == "param_finite"]
    assert dict(zip(names, finite.tolist())) == {"weight": True, "bias": True, "c": False}


def test_a_monitored_steps_parameter_statistics_match_the_tensors() -> None:
    import trainlint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.LayerNorm(256), torch.nn.Linear(256, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 256), torch.randint(0, 4, (16,))
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
        params = {p.name: p for p in monitor.report().trace.params}
    for name, p in model.named_parameters():
        positions = stats.sample_positions(p)
        scale = p.numel() / positions.numel()
        grad = grads[name].reshape(-1)[positions].double()
        weight = p.detach().reshape(-1)[positions].double()
        assert params[name].grad_norm == pytest.approx(float(grad.square().sum() * scale) ** 0.5,
                                                       rel=1e-9)
        assert params[name].norm == pytest.approx(float(weight.square().sum() * scale) ** 0.5,
                                                  rel=1e-9)
        assert params[name].std == pytest.approx(float(weight.std()), rel=1e-9)

