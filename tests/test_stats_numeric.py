"""Numerical robustness of the statistics: 16-bit activations under autocast, magnitudes near
1e30 and 1e-30, NaN/Inf (counted, and skipped by every other statistic), empty tensors; on
both the exact path (up to SAMPLE_ABOVE elements) and the sampled one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint import stats

A, G = stats.A, stats.G
SMALL = (16, 40)  # 640 elements: the exact path
LARGE = (64, 8, 24, 24)  # 294912 elements: the sampled path


def test_shapes_take_the_intended_paths() -> None:
    assert math.prod(SMALL) <= stats.SAMPLE_ABOVE < math.prod(LARGE)


def finite_truth(x: torch.Tensor) -> dict:
    v = x.detach().double().reshape(-1).numpy()
    f = v[np.isfinite(v)]
    return {"n": v.size, "finite": f.size, "mean": f.mean(), "std": f.std(), "min": f.min(),
            "max": f.max(), "sumsq": float((f * f).sum()),
            "zero_fraction": float((f == 0).mean())}


def merged(x: torch.Tensor, kind: str | None = None) -> tuple[np.ndarray, dict]:
    row = stats.activation_stats(x, kind).numpy()
    return row, stats.merge_moments(row[None])


def assert_estimates(got: dict, truth: dict, m: float) -> None:
    """Sampled moments within 5 standard errors of the truth (the stated error)."""
    assert abs(got["mean"] - truth["mean"]) <= 5 * truth["std"] / math.sqrt(m)
    kurt = 3.0  # the test tensors are Gaussian or nearly so
    assert got["std"] == pytest.approx(truth["std"], rel=5 * math.sqrt((kurt - 1) / (4 * m)))


def outside_sample(n: int, count: int) -> list:
    """Positions that the sample of an n-element tensor does not read."""
    taken = set(stats.sample_positions(torch.empty(LARGE)).tolist())
    assert n == math.prod(LARGE) and len(taken) == stats.SAMPLE_TARGET
    free = [i for i in range(1, n, 97) if i not in taken]
    return free[:count]


# ------------------------------------------------------------------ huge and tiny magnitudes

@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("shape", [SMALL, LARGE])
def test_huge_and_tiny_values_give_finite_correct_statistics(scale: float, shape: tuple) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * scale + 0.5 * scale
    assert torch.isfinite(x).all() and not (x == 0).any()  # representable in float32
    row, got = merged(x)
    truth = finite_truth(x)
    assert all(math.isfinite(got[k]) for k in ("mean", "std", "min", "max", "rms"))
    assert got["count"] == truth["n"] and got["nonfinite"] == 0
    if x.numel() <= stats.SAMPLE_ABOVE:
        assert got["min"] == truth["min"] and got["max"] == truth["max"]
        assert got["mean"] == pytest.approx(truth["mean"], rel=1e-12)
        assert got["std"] == pytest.approx(truth["std"], rel=1e-12)
    else:  # extremes from the sample: inside the tensor's
        assert truth["min"] <= got["min"] <= got["max"] <= truth["max"]
        assert_estimates(got, truth, row[A["m"]])
    grads = stats.merge_grads(stats.grad_stats(x).numpy()[None])
    assert math.isfinite(grads["norm"]) and grads["nonfinite"] == 0
    exact = x.numel() <= stats.SAMPLE_ABOVE
    m = row[A["m"]]
    assert grads["norm"] ** 2 == pytest.approx(truth["sumsq"], rel=1e-12 if exact
                                               else 5 * math.sqrt(2 / m))


# ------------------------------------------------------------------ NaN and Inf

def with_specials(shape: tuple, positions: list) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    flat = x.view(-1)
    for i, pos in enumerate(positions):
        flat[pos] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    return x


def test_exact_path_counts_nan_inf_exactly_and_skips_them() -> None:
    x = with_specials(SMALL, [3, 50, 77, 300, 301])
    row, got = merged(x)
    truth = finite_truth(x)
    assert got["nonfinite"] == 5 and row[A["n_finite"]] == truth["finite"]
    assert got["mean"] == pytest.approx(truth["mean"], rel=1e-12)
    assert got["std"] == pytest.approx(truth["std"], rel=1e-12)
    assert got["min"] == truth["min"] and got["max"] == truth["max"]
    grads = stats.merge_grads(stats.grad_stats(x).numpy()[None])
    assert grads["nonfinite"] == 5
    assert grads["norm"] ** 2 == pytest.approx(truth["sumsq"], rel=1e-12)


def test_sampled_path_finds_a_nan_or_inf_the_sample_does_not_read() -> None:
    n = math.prod(LARGE)
    for value in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(*LARGE, generator=torch.Generator().manual_seed(5))
        pos = outside_sample(n, 1)[0]
        x.view(-1)[pos] = value
        row, got = merged(x)
        truth = finite_truth(x)
        assert got["nonfinite"] >= 1, value  # the presence is exact
        assert all(math.isfinite(got[k]) for k in ("mean", "std", "min", "max"))
        assert_estimates(got, truth, row[A["m"]])
        grads = stats.merge_grads(stats.grad_stats(x).numpy()[None])
        assert grads["nonfinite"] >= 1 and math.isfinite(grads["norm"]), value


def test_sampled_path_estimates_how_many_values_are_nan() -> None:
    x = torch.randn(*LARGE, generator=torch.Generator().manual_seed(6))
    holes = torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) < 0.1
    x[holes] = float("nan")
    row, got = merged(x)
    truth = finite_truth(x)
    n, m = truth["n"], row[A["m"]]
    share = 1 - truth["finite"] / n
    assert abs(got["nonfinite"] / n - share) <= 5 * math.sqrt(share * (1 - share) / m)
    assert_estimates(got, truth, m)
    assert truth["min"] <= got["min"] <= got["max"] <= truth["max"]  # from the sample's finite


def test_all_nan_tensor_on_both_paths() -> None:
    for shape in (SMALL, LARGE):
        x = torch.full(shape, float("nan"))
        _, got = merged(x)
        assert got["nonfinite"] == got["count"] == math.prod(shape)
        assert math.isnan(got["min"]) and math.isnan(got["max"])
        assert got["mean"] == 0.0 and got["std"] == 0.0 and got["zero_fraction"] == 0.0


def test_nan_units_never_read_as_dead() -> None:
    x = torch.zeros(6, 4)
    x[:, 1] = 1.0
    x[2, 2] = float("nan")
    active = stats.unit_active(x, -1).tolist()
    assert active == [False, True, True, False]


# ------------------------------------------------------------------ 16-bit under autocast

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(32, 512)  # batch 128 x 512 = 65536 elements: sampled
        self.head = nn.Linear(512, 16)  # 128 x 16: exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.wide(x)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_16_bit_activations(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = Net()
    seen: dict = {}
    for name in ("wide", "head"):
        getattr(net, name).register_forward_hook(
            lambda m, a, out, name=name: seen.setdefault(name, []).append(out.detach()))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 32, generator=g) * 4, torch.randint(0, 16, (128,), generator=g)
    with trainlint.Monitor(net, opt, every=1) as monitor:
        for _ in range(2):
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        layers = monitor.report().trace.layer_by_key()
    assert seen["wide"][0].dtype == dtype  # the layers really ran in 16 bits
    for name in ("wide", "head"):
        outs = torch.cat([o.reshape(-1) for o in seen[name]])
        truth = finite_truth(outs)
        act = layers[(name, "output")].activation
        assert act.count == truth["n"] and act.nonfinite == 0
        assert act.min == truth["min"] and act.max == truth["max"]
        assert all(math.isfinite(v) for v in (act.mean, act.std, act.rms))
        if outs.numel() // 2 <= stats.SAMPLE_ABOVE:
            assert act.mean == pytest.approx(truth["mean"], rel=1e-12, abs=1e-15)
            assert act.std == pytest.approx(truth["std"], rel=1e-12)
        else:
            assert act.sampled
            assert_estimates({"mean": act.mean, "std": act.std}, truth, 2 * stats.SAMPLE_TARGET)
    assert layers[("", "tanh")].activation.saturated_fraction > 0


# ------------------------------------------------------------------ empty tensors

def test_empty_tensors() -> None:
    for shape in ((0,), (0, 7), (3, 0, 5)):
        x = torch.empty(shape)
        _, got = merged(x, "relu")
        assert got["count"] == 0 and got["nonfinite"] == 0 and not got["sampled"]
        assert math.isnan(got["min"]) and math.isnan(got["max"])
        grads = stats.merge_grads(stats.grad_stats(x).numpy()[None])
        assert grads == {"norm": 0.0, "rms": 0.0, "nonfinite": 0}
        params = stats.MomentBatch(x.device)
        params.add(x)
        std = stats.parameter_moments(params.table(params.device_part().cpu().numpy()))[0]
        assert std.tolist() == [0.0]
    assert stats.unit_active(torch.empty(0, 7), -1).tolist() == [False] * 7
    assert stats.unit_active(torch.empty(4, 0), -1).tolist() == []


class EmptyBranch(nn.Module):
    """Also returns an empty slice of its input (a feature group of size 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0]


def test_a_layer_with_an_empty_output_is_observed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), EmptyBranch())
    head = nn.Linear(8, 2)

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = model, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            empty = self.body(x)
            return self.head(self.body[1](self.body[0](x))) + empty.sum()

    report = trainlint.check(Both(), (torch.randn(4, 8), torch.randint(0, 2, (4,))), steps=1)
    empty = report.trace.layer_by_key()[("body.2", "output")].activation
    assert empty.count == 0 and empty.nonfinite == 0
