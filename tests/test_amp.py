"""Mixed precision: statistics accumulate in float64 under autocast, GradScaler'd gradients are
unscaled, skipped scaler steps are not linted, and TL104's float16 check follows the dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint
from trainlint.engine import RULES, Thresholds, load_rules
from trainlint.trace import ActivationStats, LayerTrace, RunTrace

FP16_MAX = float(torch.finfo(torch.float16).max)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def capture(net: nn.Sequential, index: int) -> dict:
    """Record the output of ``net[index]`` and the gradient w.r.t. it, at every call."""
    seen: dict = {"act": [], "grad": []}

    def keep(module, args, out):
        seen["act"].append(out.detach())
        out.register_hook(lambda g: seen["grad"].append(g.detach()))

    net[index].register_forward_hook(keep)
    return seen


def train(net: nn.Module, steps: int, *, scaler=None, monitor_scaler=True, autocast=None,
          every: int = 1, gain: float = 1.0) -> trainlint.Report:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    with trainlint.Monitor(net, opt, every=every,
                           scaler=scaler if monitor_scaler else None) as monitor:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = gain * (net(x).float() - y).pow(2).mean()
            opt.zero_grad()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            monitor.step(loss)
        return monitor.report()


def layer(report: trainlint.Report, module: str) -> LayerTrace:
    return next(lt for lt in report.trace.layers if lt.module == module and lt.op == "output")


def test_bf16_autocast_statistics_are_exact():
    net = mlp()
    seen = capture(net, 2)
    report = train(net, 2, autocast=torch.bfloat16)
    outs = torch.cat([a.reshape(-1) for a in seen["act"]])
    assert outs.dtype == torch.bfloat16  # the layer really computed in bfloat16
    ref = outs.double()
    act = layer(report, "2").activation
    # Accumulating in bfloat16 would be off by ~1e-3; float64 accumulation is exact.
    assert act.mean == pytest.approx(ref.mean().item(), rel=1e-12, abs=1e-15)
    assert act.std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-12)
    assert act.max == ref.max().item() and act.min == ref.min().item()
    assert report.trace.amp_dtype == "bfloat16"


def test_fp16_autocast_is_recorded():
    report = train(mlp(), 1, autocast=torch.float16)
    assert report.trace.amp_dtype == "float16"
    assert train(mlp(), 1).trace.amp_dtype is None


class Large(nn.Module):
    """Activations of ~4e4: fine in bfloat16, 61% of float16's range."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        with torch.no_grad():
            self.body[2].weight.mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_autocast_entered_inside_the_forward_is_recorded() -> None:
    """accelerate (transformers' Trainer with bf16=True) wraps model.forward in autocast: the
    root module's hooks run outside it, the layers inside. The Monitor and check both record
    bfloat16, so TL104's float16-range check stays silent on ~4e4 activations."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    wrapped = Large()
    wrapped.forward = torch.autocast("cpu", dtype=torch.bfloat16)(wrapped.forward)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-12)
    with trainlint.Monitor(wrapped, opt, every=1) as monitor:
        for _ in range(2):
            loss = (wrapped(x).float() - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    assert report.trace.amp_dtype == "bfloat16"
    assert "TL104" not in {f.code for f in report.findings}
    checked = trainlint.check(wrapped, (x, y), optimizer=lambda p: torch.optim.SGD(p, lr=1e-12))
    assert checked.trace.amp_dtype == "bfloat16"
    assert "TL104" not in {f.code for f in checked.findings}
    plain = trainlint.check(Large(), (x, y), optimizer=lambda p: torch.optim.SGD(p, lr=1e-12))
    assert plain.trace.amp_dtype is None and "TL104" in {f.code for f in plain.findings}


def test_grad_scaler_gradients_are_unscaled():
    scale = 2.0 ** 10
    plain = train(mlp(), 2)
    scaled = train(mlp(), 2, scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    unaware = train(mlp(), 2, scaler=torch.amp.GradScaler("cpu", init_scale=scale),
                    monitor_scaler=False)
    for module in ("0", "2", "4"):
        expected = layer(plain, module).grad_norm
        assert layer(scaled, module).grad_norm == pytest.approx(expected, rel=1e-6)
        # Without the scaler, what the hooks see is the scaled gradient.
        assert layer(unaware, module).grad_norm == pytest.approx(expected * scale, rel=1e-6)
    plain_params = {p.name: p.grad_norm for p in plain.trace.params}
    for p in scaled.trace.params:
        assert p.grad_norm == pytest.approx(plain_params[p.name], rel=1e-6)


def test_step_skipped_by_the_scaler_is_not_linted():
    # A loss scale of 2**127 on a loss weighted 2**10 overflows the gradients: the scaler
    # skips the step and backs off to 2**107, where the next step goes through.
    net = mlp()
    seen = capture(net, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -20)
    report = train(net, 4, scaler=scaler, every=4, gain=2.0 ** 10)
    assert scaler.get_scale() == 2.0 ** 107
    assert report.trace.observed_steps == 1
    assert any("GradScaler skipped 1" in note for note in report.notes)
    lt = layer(report, "2")
    assert lt.grad_nonfinite == 0
    retried = seen["grad"][1].double() / 2.0 ** 107
    assert lt.grad_norm == pytest.approx(retried.norm().item(), rel=1e-6)
    assert not [f for f in report.findings if f.code == "TL504"]


def test_nonfinite_loss_is_not_hidden_by_the_scaler():
    net = mlp()
    with torch.no_grad():
        net[0].bias.fill_(float("nan"))
    report = train(net, 1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert report.trace.observed_steps == 1
    assert all(v != v for v in report.trace.losses)  # NaN kept, for TL504/TL604 to see


def fp16_trace(peak: float, amp_dtype) -> RunTrace:
    act = ActivationStats(count=64, mean=0.0, std=peak / 4, min=-peak, max=peak,
                          zero_fraction=0.0, rms=peak / 4)
    lt = LayerTrace(module="fc", type="Linear", op="output", depth=0, activation=act,
                    node=("point", "fc", "output", None))
    return RunTrace(layers=[lt], amp_dtype=amp_dtype)


@pytest.mark.parametrize("amp_dtype, fires, wording", [
    (None, True, "mixed precision would overflow"),
    ("float16", True, "computes in float16"),
    ("bfloat16", False, None),
])
def test_tl104_fp16_check_follows_the_dtype(amp_dtype, fires, wording):
    load_rules()
    rule = RULES["TL104"]
    t = Thresholds(rule.defaults)
    peak = t.fp16_fraction * FP16_MAX * 1.01
    hits = list(rule.func(fp16_trace(peak, amp_dtype), t))
    assert bool(hits) == fires
    if fires:
        assert wording in hits[0].message
    below = t.fp16_fraction * FP16_MAX * 0.99
    assert not list(rule.func(fp16_trace(below, amp_dtype), t))


def test_a_scaler_that_skips_many_first_steps_is_waited_for_and_the_init_judged() -> None:
    """A loss scale far above what the gradients allow (Megatron-LM starts at 2**32) is halved
    at each skipped step, more steps than MAX_SCALER_SKIPS: the weights stay at the init
    meanwhile, so the step finally linted is the run's first, its gradients finite."""
    from trainlint.monitor import MAX_SCALER_SKIPS

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    report = train(mlp(), 16, scaler=scaler, every=8, gain=2.0 ** 10)
    [note] = [n for n in report.notes if "GradScaler skipped" in n]
    skipped = int(note.split("skipped ")[1].split(" ")[0])
    assert skipped > MAX_SCALER_SKIPS
    first = report.trace.per_step[0]
    assert first["step"] == skipped and report.trace.at_start(first)
    assert not [f for f in report.findings if f.code == "TL504"]


class SqrtAtZero(nn.Module):
    """sqrt of a sum of squares that is 0: a finite forward, an infinite gradient at any loss
    scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out + torch.sqrt((out[:, :1] * 0) ** 2)


def test_gradients_that_overflow_at_scale_one_are_linted() -> None:
    """The scaler halves its scale down to 1 and still skips: the gradient is the model's own
    Inf/NaN, and TL504 reports it."""
    torch.manual_seed(0)
    report = train(SqrtAtZero(), 16, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 4),
                   every=1)
    assert [f for f in report.findings if f.code == "TL504"]
