"""TL504 names where NaN/Inf first appears also when no layer output shows it first: code in a
module's own forward, ops between two layers, the input batch, or an unobserved step."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.reports.layers import layer_rows


def _tl504(report: trainlint.Report) -> trainlint.Finding:
    found = [f for f in report.findings if f.code == "TL504"]
    assert len(found) == 1
    return found[0]


class LogBlock(nn.Module):
    """A module with a child whose own forward takes the log of the child's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(x))  # negative values: NaN


def _batch() -> tuple:
    torch.manual_seed(0)
    return torch.randn(16, 8), torch.randint(0, 3, (16,))


def test_nan_made_by_a_modules_own_forward_code_names_that_module() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), LogBlock(), nn.Linear(8, 3))
    found = _tl504(trainlint.check(model, _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("2", "forward")
    assert "own forward code" in found.message


class LogBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.log(self.a(x)))))


def test_nan_made_by_ops_between_two_layers_names_their_parent_and_the_op() -> None:
    torch.manual_seed(0)
    found = _tl504(trainlint.check(LogBetween(), _batch(), steps=1))
    assert found.module == ""
    assert "from a, which is finite, through log" in found.message
    assert "overflowed" not in found.fix


class LogFirst(nn.Module):
    """A wrapper whose own forward takes the log of its input before its child runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.log(x))


class Decoder(nn.Module):
    def __init__(self, wrap_log: bool) -> None:
        super().__init__()
        self.up = nn.Linear(8, 8)
        self.dec = LogFirst() if wrap_log else nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.wrap_log = wrap_log
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.head(self.dec(h if self.wrap_log else torch.log(h)))


@pytest.mark.parametrize("wrap_log, module", [(True, "dec"), (False, "")])
def test_nan_made_before_a_child_names_the_module_whose_forward_ran_the_op(
        wrap_log: bool, module: str) -> None:
    """U-Net's decoder block taking the log of its input before its conv: the NaN is made in
    dec's forward (its input from up is finite, measured below), not the model's; the same
    log in the model's own forward is the model's."""
    torch.manual_seed(0)
    model = Decoder(wrap_log)
    x, y = _batch()
    with torch.no_grad():
        assert torch.isfinite(model.up(x)).all()
        assert not torch.isfinite(torch.log(model.up(x))).all()
    found = _tl504(trainlint.check(model, (x, y), steps=1))
    assert (found.module, found.evidence["where"]) == (module, "forward")
    assert f"through log in the forward of {module or 'the model'}" in found.message


class Scaled(nn.Module):
    """Divides its layer's output by sqrt(d): safe."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / 8 ** 0.5


class Divides(nn.Module):
    """Divides its input by a temperature, then runs its layer."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x / self.temperature)


class TwoReaders(nn.Module):
    """Two modules divide the same encoder output: one by 2 (safe), one by 0 (Inf)."""

    def __init__(self, log_after_scaled: bool) -> None:
        super().__init__()
        self.log_after_scaled = log_after_scaled
        self.pre, self.blk = Scaled(), LogFirst()
        self.enc = nn.Linear(8, 8)
        self.safe, self.bad = Divides(2.0), Divides(0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_after_scaled:
            return self.head(self.blk(self.pre(x)))
        h = self.enc(x)
        return self.head(self.safe(h) + self.bad(h))


def test_risky_ops_run_by_two_modules_name_neither() -> None:
    """pre divides its output by sqrt(d) (finite, measured), blk takes the log: either could
    have made the NaN as far as the ops tell (a log in the parent before a safe division in a
    child is the mirror case), so neither is named; their common parent is."""
    torch.manual_seed(0)
    model = TwoReaders(log_after_scaled=True)
    x, y = _batch()
    with torch.no_grad():
        assert torch.isfinite(model.pre(x)).all()
    found = _tl504(trainlint.check(model, (x, y), steps=1))
    assert found.module == ""
    assert "through div, log in the forward of the model" in found.message


def test_the_same_ops_in_two_modules_name_neither() -> None:
    """safe and bad both divide enc's output (by 2 and by 0): the same ops on the same
    source, so the probe cannot tell which one made the Inf, and names neither."""
    torch.manual_seed(0)
    found = _tl504(trainlint.check(TwoReaders(log_after_scaled=False), _batch(), steps=1))
    assert found.module not in ("safe", "safe.fc")


class Standardized(nn.Module):
    """Standardizes each sample by its own std (0/0 for an all-zero sample), then runs net."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True))


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Standardized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("model, parent", [(Standardized, ""), (Wrapped, "body")])
def test_nan_made_from_the_input_before_a_child_names_the_module_that_made_it(
        model: type, parent: str) -> None:
    x, y = _batch()
    x[0] = 0.0
    torch.manual_seed(0)
    found = _tl504(trainlint.check(model(), (x, y), steps=1))
    assert (found.module, found.evidence["where"]) == (parent, "forward")
    assert "the model's input input0, which holds no NaN, through div" in found.message
    assert "overflowed" not in found.fix and "clamp inputs" in found.fix


def test_nan_in_the_input_batch_is_the_datas() -> None:
    x, y = _batch()
    x[3, 2] = float("nan")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    found = _tl504(trainlint.check(model, (x, y), steps=1))
    assert found.evidence["where"] == "input"
    assert "input0" in found.message


@pytest.mark.parametrize("several", [False, True])
def test_nan_in_a_checks_regression_targets_is_the_datas(several: bool) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    y[5, 0] = float("nan")
    targets = (torch.randn(16, 1), y) if several else y

    def loss_fn(out: torch.Tensor, target: Any) -> torch.Tensor:
        return sum(F.mse_loss(out, t) for t in target) if several else F.mse_loss(out, target)

    found = _tl504(trainlint.check(nn.Linear(8, 1), (x, targets), loss_fn=loss_fn, steps=1))
    assert found.evidence["where"] == "input"
    assert ("targets[1]" if several else "(targets)") in found.message


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_inf_in_an_input_a_layer_takes_as_it_is_is_the_datas(value: float) -> None:
    x, y = _batch()
    x[3, 2] = value
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    found = _tl504(trainlint.check(model, (x, y), steps=1))
    assert found.evidence["where"] == "input"
    assert "holds Inf before the model runs (input0), and 0 (Linear) takes it" in found.message
    assert found.fix.startswith("clean the data")


def test_inf_in_a_checks_regression_targets_is_the_datas() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    y[5, 0] = math.inf
    found = _tl504(trainlint.check(nn.Linear(8, 1), (x, y), loss_fn=F.mse_loss, steps=1))
    assert found.evidence["where"] == "input" and "(targets)" in found.message


class MaskedScores(nn.Module):
    """Attention over 4 positions with an additive float mask (-inf where masked) given as an
    input; the last sample's mask hides every key: a softmax over nothing, NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5 + mask[:, None, :], dim=-1)
        return self.head((weights @ x).mean(1))


def test_a_masks_inf_is_not_blamed_on_the_data() -> None:
    """The mask's -inf reaches the scores through an add, not as it is: the NaN is the
    attention's, made where the mask hides a whole row, and the fix says so (a hand-written
    attention that calls no scaled_dot_product_attention: its softmax is the first output
    holding NaN)."""
    torch.manual_seed(0)
    x, mask = torch.randn(6, 4, 8), torch.zeros(6, 4)
    mask[:, 3] = -math.inf
    mask[5] = -math.inf
    found = _tl504(trainlint.check(MaskedScores(), ((x, mask), torch.randint(0, 3, (6,))),
                                   steps=1))
    assert found.evidence["where"] != "input"
    assert "holds Inf" not in found.message
    assert found.fix.startswith("check the attention mask of 'the model': a query whose keys")


def test_finite_targets_with_a_nan_loss_still_blame_the_loss() -> None:
    def log_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.log(out - out.detach()).mean() + F.mse_loss(out, target)  # log(0)

    torch.manual_seed(0)
    found = _tl504(trainlint.check(nn.Linear(8, 1), (torch.randn(16, 8), torch.randn(16, 1)),
                                   loss_fn=log_loss, steps=1))
    assert found.evidence["where"] == "loss"


def test_nan_weights_before_training_are_the_inits_or_the_checkpoints() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    found = _tl504(trainlint.check(model, _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("2", "initial parameters")
    assert "built or loaded" in found.message and "every=1" not in found.fix


class Breaks(nn.Module):
    """Divides by zero at its seventh call (training step 6, not observed with every=5)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x / 0.0 if self.calls == 7 else x


def test_nan_made_at_an_unobserved_step_is_not_blamed_on_the_first_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Breaks(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    with trainlint.Monitor(model, optimizer=opt, every=5) as monitor:
        for _ in range(11):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            monitor.step(loss)
        found = _tl504(monitor.report())
    assert (found.evidence["step"], found.evidence["where"]) == (10, "stale parameter")
    assert "every=1" in found.fix


class MaskedAttention(nn.Module):
    """A causal mask of -inf passed as an input, and logits masked with -inf inside a module
    with children: both legitimate, every loss finite."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = Policy()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = x @ x.transpose(1, 2) + mask
        return self.policy(torch.softmax(scores, -1) @ x)


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.fc(h.mean(1))
        illegal = torch.zeros_like(logits, dtype=torch.bool)
        illegal[:, 2] = True
        return logits.masked_fill(illegal, float("-inf"))


def test_minus_inf_masks_that_stay_contained_are_no_nonfinite_error() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 5, 8)
    for fill in (float("-inf"), torch.finfo(torch.float32).min):
        mask = torch.triu(torch.full((5, 5), fill), diagonal=1)
        report = trainlint.check(MaskedAttention(), ({"x": x, "mask": mask},
                                                     torch.randint(0, 2, (16,))), steps=2)
        assert math.isfinite(report.trace.losses[0])
        assert "TL504" not in {f.code for f in report.findings}


class LogOfNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).log()  # negative logits: NaN made by the model's own forward


def test_the_models_own_output_is_read() -> None:
    torch.manual_seed(0)
    found = _tl504(trainlint.check(LogOfNet(), _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("", "forward")
    assert "the output of the model" in found.message


def test_huge_finite_weights_are_not_nan_weights_from_an_earlier_step() -> None:
    """lr=1e30: step 0's update leaves the weights finite (about 1e29) and step 1's forward
    overflows. Their squares overflow float32, which read as 'NaN/Inf before the step began'
    and blamed an unobserved step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    report = trainlint.check(model, batch, optimizer=lambda p: torch.optim.SGD(p, lr=1e30),
                             steps=3)
    nan = next(f for f in report.findings if f.code == "TL504")
    assert not report.trace.per_step[1]["nonfinite"]["parameters_before"]
    assert "not observed" not in nan.message and "forward" in nan.message
    assert nan.evidence["step"] == 1


class TwoOutputs(nn.Module):
    """A leaf (no children) or a container (``wrap``) returning ``(mean, spread)``; the spread,
    ``sqrt`` of a parameter, is NaN when the parameter is negative."""

    def __init__(self, var: float, wrap: bool = False) -> None:
        super().__init__()
        self.var = nn.Parameter(torch.full((1,), var))
        self.inner = nn.Identity() if wrap else None

    def forward(self, mu: torch.Tensor) -> tuple:
        if self.inner is not None:
            mu = self.inner(mu)
        return mu, self.var.sqrt().expand_as(mu)


class Regressor(nn.Module):
    def __init__(self, var: float, wrap: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.noise = TwoOutputs(var, wrap)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.noise(self.body(x))


def _gaussian_nll(out: tuple, y: torch.Tensor) -> torch.Tensor:
    mu, sd = out
    return (((y - mu) / sd) ** 2 / 2 + torch.log(sd)).mean()


@pytest.mark.parametrize("wrap", [False, True], ids=["leaf", "container"])
def test_nan_in_a_modules_second_output_names_that_module(wrap: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    report = trainlint.check(Regressor(-0.5, wrap), (x, 0.1 * x[:, :1]),
                             loss_fn=_gaussian_nll, steps=1)
    found = _tl504(report)
    assert (found.module, found.evidence["where"]) == ("noise", "forward")
    assert "own forward code" in found.message


def test_a_finite_second_output_and_a_minus_inf_one_are_no_fault() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    report = trainlint.check(Regressor(0.5), (x, 0.1 * x[:, :1]), loss_fn=_gaussian_nll,
                             steps=2)
    assert "TL504" not in {f.code for f in report.findings}
    report = trainlint.check(Masked(), _batch(), steps=1)
    assert "TL504" not in {f.code for f in report.findings}
    later = nn.Sequential(Masked(), LogBlock3())  # a NaN after the mask is not the mask's
    found = _tl504(trainlint.check(later, _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("1", "forward")


class LogBlock3(nn.Module):
    """``LogBlock`` on 3 features, whose log always sees negative values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(x) - 100.0)


class MaskOut(nn.Module):
    """Returns its input and an additive mask with -inf in it."""

    def forward(self, h: torch.Tensor) -> tuple:
        return h, torch.zeros_like(h).masked_fill(h < 0, float("-inf"))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.mask, self.head = nn.Linear(8, 8), MaskOut(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, m = self.mask(self.fc(x))
        assert torch.isinf(m).any()
        return self.head(h * torch.exp(m))  # exp(-inf) = 0: the mask stays contained



class _NanBackward(torch.autograd.Function):
    """The identity forward; a backward that makes NaN of a finite gradient (a sqrt at 0, a
    0/0 in a user's autograd.Function)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * torch.full_like(grad, math.nan)


class NanBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NanBackward.apply(x)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.GELU])
def test_nan_made_in_a_backward_behind_an_activation_names_that_module(act: type) -> None:
    """Linear -> activation -> NanBackward: the activation's output gradient is not read, so
    the NaN is first seen at the Linear's output gradient; TL504 looks through the activation
    to the module whose backward made it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), act(), NanBackward(), nn.Linear(8, 3))
    found = _tl504(trainlint.check(model, _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("2", "backward")
    assert "made in the backward of 2" in found.message


class ReluBlock(nn.Module):
    """A Linear, then ``torch.relu`` in the block's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class DistanceBlock(nn.Module):
    """Weights each sample by exp(-its distance to a neighbour) before its Linear; a sample
    paired with itself is at distance sqrt(0): a finite forward, an infinite derivative."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.lin = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pair = torch.arange(len(h)) // 2 * 2  # 0, 0, 2, 2, ...: each even sample with itself
        dist = torch.sqrt(((h - h[pair]) ** 2).sum(-1, keepdim=True) + self.eps)
        return torch.relu(self.lin(0.5 * (h + torch.exp(-dist) * h[pair])))


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_nan_made_by_a_blocks_backward_behind_a_functional_relu_names_that_block(eps) -> None:
    """The first NaN gradient read is at block 0's Linear output (the ReLU after it, called
    in the block's forward, has no gradient read); block 1's Linear has a finite one, fed
    through safe ops: block 1's own ops made it in their backward."""
    torch.manual_seed(0)
    model = nn.Sequential(ReluBlock(), DistanceBlock(eps), nn.Linear(8, 3))
    report = trainlint.check(model, _batch(), steps=1)
    if eps:
        assert not [f for f in report.findings if f.code == "TL504"]
        return
    found = _tl504(report)
    assert (found.module, found.evidence["where"]) == ("1", "backward")
    assert "gradient at the output of 0.lin" in found.message
    assert "made in the backward of 1" in found.message
    assert "sqrt" in found.fix and "overflowed" not in found.fix


class AngleBlock(nn.Module):
    """The angle between each sample's features and a learned direction, by acos of their
    cosine scaled past 1 (a margin-style head computed by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(x, self.direction.expand_as(x), dim=-1)
        return torch.acos(4.0 * cos).unsqueeze(-1) * x


def test_nan_from_acos_outside_its_domain_gets_the_clamp_in_the_fix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), AngleBlock(), nn.Linear(8, 3))
    found = _tl504(trainlint.check(model, _batch(), steps=1))
    assert found.module == "1" and found.evidence["where"] == "forward"
    assert "acos/asin (x.clamp(-1 + 1e-7, 1 - 1e-7))" in found.fix


class CentreAngle(nn.Module):
    """The angle to class centres that sit on samples (initialized from the data): acos of a
    cosine of exactly 1 is finite, its derivative infinite."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin
        self.centres = nn.Parameter(torch.randn(3, 8))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.centres.copy_(e[:3])
        cos = F.cosine_similarity(e[:, None, :], self.centres[None], dim=-1)
        return -torch.acos(cos.clamp(-1 + self.margin, 1 - self.margin))


@pytest.mark.parametrize("margin", [0.0, 1e-7])
def test_nan_from_acos_backward_at_one_gets_the_clamp_in_the_fix(margin: float) -> None:
    """ArcFace-style: clamping to [-1, 1] keeps the forward finite, not the backward at 1;
    the fix's clamp into the open interval (measured: no NaN at 1e-7) is what it names."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), CentreAngle(margin))
    report = trainlint.check(model, _batch(), steps=1)
    if margin:
        assert not [f for f in report.findings if f.code == "TL504"]
        return
    found = _tl504(report)
    assert found.module == "2" and found.evidence["where"] == "backward"
    assert "acos/asin at ±1" in found.fix and "1 - 1e-7" in found.fix


class LogThenFunctional(nn.Module):
    """Ops in this module's own forward feed a functional activation: log of a shifted linear
    output (all negative: NaN), then sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.log(self.lin(x) - 1000.0))


@pytest.mark.parametrize("inside", [False, True])
def test_nan_made_by_ops_before_a_functional_activation_names_the_module_that_ran_them(
        inside: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LogThenFunctional()) if inside else LogThenFunctional()
    batch = (torch.randn(16, 8), torch.rand(16, 4))
    found = _tl504(trainlint.check(model, batch, loss_fn=F.mse_loss, steps=1))
    assert found.module == ("0" if inside else "")
    assert "from " + ("0.lin" if inside else "lin") + ", which is finite, through log" in \
        found.message


def test_a_loss_that_raises_on_nan_outputs_is_reported_where_the_nan_was_made() -> None:
    """BCE raises on a NaN probability ("all elements of input should be between 0 and 1"):
    the check reports where the model made the NaN and stops there, not a bare error."""
    torch.manual_seed(0)
    batch = (torch.randn(16, 8), torch.rand(16, 4).round())
    report = trainlint.check(LogThenFunctional(), batch, loss_fn=nn.BCELoss(), steps=3)
    found = _tl504(report)
    assert found.module == "" and "through log" in found.message
    assert "the loss function then raised RuntimeError: all elements of input" in found.message
    assert report.trace.observed_steps == 1
    assert any("stopped at training step 1" in note and "NaN/Inf" in note
               for note in report.notes)
    rows = {row["label"]: row["activation"] for row in layer_rows(report.trace)}
    nan_row = rows["(model):sigmoid"]
    assert nan_row["nonfinite"] == nan_row["count"] == 64
    assert all(math.isnan(nan_row[k]) for k in ("mean", "std", "rms"))
    assert nan_row["saturated_fraction"] is None  # not measured: no finite value
    assert math.isfinite(rows["lin"]["mean"])  # a finite output keeps its moments


def test_a_loss_that_raises_on_finite_outputs_is_the_users_error() -> None:
    def picky(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise ValueError("this loss needs a dict")

    with pytest.raises(trainlint.UserCodeError, match="computing the loss raised ValueError"):
        trainlint.check(nn.Linear(8, 4), (torch.randn(16, 8), torch.rand(16, 4)),
                        loss_fn=picky, steps=1)


class PaddedAttention(nn.Module):
    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.att = SelfAttention() if by_hand else nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        if isinstance(self.att, nn.MultiheadAttention):
            h = self.att(h, h, h, key_padding_mask=x == 0)[0]
        else:
            h = self.att(h, x == 0)
        return self.head(h.mean(1))


class SelfAttention(nn.Module):
    """A hand-written attention layer: softmax over scores masked with -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, h: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).chunk(3, -1)
        scores = (q @ k.transpose(1, 2)).masked_fill(padding[:, None, :], float("-inf"))
        return torch.softmax(scores / 32 ** 0.5, -1) @ v


@pytest.mark.parametrize("by_hand", [False, True])
def test_nan_from_a_sample_that_is_all_padding_points_at_the_attention_mask(
        by_hand: bool) -> None:
    torch.manual_seed(0)
    x = torch.randint(1, 50, (8, 10))
    x[2] = 0  # every key of sample 2 is padding: its softmax is over nothing
    found = _tl504(trainlint.check(PaddedAttention(by_hand), (x, torch.randint(0, 3, (8,))),
                                   steps=1))
    assert (found.module, found.evidence["where"]) == ("att", "forward")
    assert "attention mask of 'att'" in found.fix and "torch.finfo(dtype).min" in found.fix


class Reparameterized(nn.Module):
    """A VAE's sampling step, ``mu + exp(logvar / 2) * eps``: a logvar of 200 overflows exp,
    on the second operand of the sum (data flow keeps the first's origin, mu's)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(8, 8), nn.Linear(4, 3)
        with torch.no_grad():
            self.enc.bias[4:] = 200.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, -1)
        return self.dec(mu + torch.exp(logvar / 2) * torch.randn_like(mu))


def test_a_layer_fed_nothing_but_nan_by_ops_points_at_the_ops_not_at_the_layer() -> None:
    torch.manual_seed(0)
    found = _tl504(trainlint.check(Reparameterized(), _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("", "forward")
    assert "every value of the output of dec (Linear) is NaN/Inf" in found.message
    assert "comes from enc, which is finite, through ops (chunk, add)" in found.message
    assert "overflowed" not in found.fix and "exp" in found.fix


def test_a_layer_fed_a_finite_output_as_it_is_overflowed_itself() -> None:
    """Every output Inf, but fed a finite output directly: the layer's own weights (finite,
    3e38) overflowed, and the finding stays at it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.fill_(1.0)
        model[2].weight.fill_(3e38)
    found = _tl504(trainlint.check(model, _batch(), steps=1))
    assert (found.module, found.evidence["where"]) == ("2", "forward")
    assert "overflowed" in found.fix


class TimestepEmbedded(nn.Module):
    """A diffusion model's timestep embedding, ``log(t) * freqs`` through sin/cos into an MLP:
    the frequencies are a buffer, so the data-flow graph loses ``t``'s path at the product and
    nothing observed feeds ``temb.0``. ``log(0)`` makes -inf, ``sin(-inf)`` NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(-torch.arange(4) / 4.0))
        self.temb = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8))
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = torch.log(t.float())[:, None] * self.freqs
        return self.head(self.fc(x) + self.temb(torch.cat([a.sin(), a.cos()], 1)))


def _timesteps(lowest: int) -> tuple:
    torch.manual_seed(0)
    t = torch.randint(lowest, 100, (16,))
    t[3] = lowest
    return (torch.randn(16, 8), t), torch.randint(0, 3, (16,))


def test_nan_in_a_layer_no_observed_tensor_feeds_names_the_code_that_built_its_input() -> None:
    """Measured here: temb.0's weights are finite and its output NaN in one sample's row; the
    finding names the model's forward (and the log the graph saw), not an overflow."""
    torch.manual_seed(0)
    model = TimestepEmbedded()
    found = _tl504(trainlint.check(model, _timesteps(0), steps=1))
    assert all(torch.isfinite(p).all() for p in model.temb[0].parameters())
    assert (found.module, found.evidence["where"]) == ("", "forward")
    assert "the output of temb.0 (Linear) holds 8 NaN/Inf" in found.message
    assert "no observed layer output or model input feeds it" in found.message
    assert "log on input1" in found.message
    assert "overflowed" not in found.fix and "clamp inputs of log" in found.fix
    healthy = trainlint.check(TimestepEmbedded(), _timesteps(1), steps=3)
    assert [f for f in healthy.findings if f.code == "TL504"] == []


def test_a_layer_no_observed_tensor_feeds_with_weights_out_of_range_overflowed_itself() -> None:
    torch.manual_seed(0)
    model = TimestepEmbedded()
    with torch.no_grad():
        model.temb[0].weight.fill_(3e38)
    found = _tl504(trainlint.check(model, _timesteps(1), steps=1))
    assert (found.module, found.evidence["where"]) == ("temb.0", "forward")
    assert "overflowed" in found.fix


class TimeMLP(nn.Module):
    """A wrapper that takes the embedding as it is (diffusers' TimestepEmbedding's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(e)))


class WrappedEmbedding(TimestepEmbedded):
    """The timestep embedding built in the model's forward, handed to a TimeMLP."""

    def __init__(self) -> None:
        super().__init__()
        self.temb = TimeMLP()


def test_the_code_that_built_an_untraced_input_is_where_its_risky_op_ran() -> None:
    """The log ran in the model's forward, not in the wrapper that received its result."""
    torch.manual_seed(0)
    found = _tl504(trainlint.check(WrappedEmbedding(), _timesteps(0), steps=1))
    assert (found.module, found.evidence["where"]) == ("", "forward")
    assert "the output of temb.linear_1 (Linear)" in found.message


def test_an_inf_in_the_batch_that_an_untraced_input_is_built_from_is_the_datas() -> None:
    (x, t), y = _timesteps(1)
    t = t.float()
    t[5] = math.inf
    torch.manual_seed(0)
    found = _tl504(trainlint.check(TimestepEmbedded(), ((x, t), y), steps=1))
    assert (found.module, found.evidence["where"]) == ("", "input")
    assert "the batch holds Inf before the model runs (input1)" in found.message


def _triplet(out: torch.Tensor, y: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """A triplet loss whose first positive is its anchor itself: a distance of exactly 0, whose
    sqrt has an infinite derivative (finite with ``eps`` inside)."""
    positive, negative = out.roll(0, 0), out.roll(1, 0)
    near = (((out - positive) ** 2).sum(1) + eps).sqrt()
    far = (((out - negative) ** 2).sum(1) + eps).sqrt()
    return F.relu(near - far + 1.0).mean()


@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_nan_made_by_the_loss_functions_backward_names_the_loss(eps: float) -> None:
    """The first NaN gradient is at the model's output and the loss is finite: the loss
    function's backward made it (measured: its sqrt at 0; Kaiming init, the old fix, left the
    gradients NaN; eps inside the sqrt made them finite)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    report = trainlint.check(model, _batch(), loss_fn=lambda o, y: _triplet(o, y, eps), steps=1)
    if eps:
        assert not [f for f in report.findings if f.code == "TL504"]
        return
    found = _tl504(report)
    assert found.module == "" and found.evidence["where"] == "backward"
    assert "the loss function's backward made it" in found.message
    assert found.fix.startswith("make the backward of the loss function safe")
    assert "Kaiming" not in found.fix


class ActionMask(nn.Module):
    def forward(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~allowed, float("-inf"))


class MaskedLogits(nn.Module):
    """Logits with the actions a mask forbids at -inf (padded rows: every action)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
        self.mask = ActionMask()

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return self.mask(self.body(x), allowed)


@pytest.mark.parametrize("ignored", [True, False])
def test_masked_logits_of_rows_the_loss_ignores_are_no_nan(ignored: bool) -> None:
    """Padded rows masked to -inf whose labels the loss ignores: the loss, the parameters and
    their gradients stay finite, so nothing is reported; the same rows with labels make the
    loss infinite, and TL504 fires."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    allowed = torch.ones(32, 5, dtype=torch.bool)
    allowed[:4] = False
    if ignored:
        y[:4] = -100
    report = trainlint.check(MaskedLogits(), ((x, allowed), y), steps=2,
                             loss_fn=lambda o, t: F.cross_entropy(o, t, ignore_index=-100))
    assert bool([f for f in report.findings if f.code == "TL504"]) is not ignored


class SharedPool(nn.Module):
    """One MaxPool1d called twice (as a U-Net's one pool is): 'big' overflows between the two
    calls, at its first step when ``scale`` is large."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.big = nn.Conv1d(16, 16, 3, padding=1)
        self.out = nn.Linear(16, 4)
        nn.init.constant_(self.big.weight, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.big(self.pool(torch.relu(self.c1(x))))
        return self.out(self.pool(h).mean(2))


@pytest.mark.parametrize("scale", [1e38, 1e30])  # Inf at the first step; at the second
def test_nan_made_between_two_calls_of_a_shared_module_names_the_maker(scale) -> None:
    """The shared pool's first call was finite; its output held Inf from its second call on:
    TL504 named 'pool', where 'big' made it (measured with hooks)."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 16)
    report = trainlint.check(SharedPool(scale), (x, x[:, :, 0].argmax(1)))
    found = _tl504(report)
    assert found.module == "big"
    assert "the output of big (Conv1d)" in found.message


def test_nan_from_a_shared_modules_first_call_still_names_it() -> None:
    """Inf already in the pool's first call (its input overflowed in the ReLU's producer's own
    output): the first layer that held it is named, as before."""
    torch.manual_seed(0)
    model = SharedPool(1.0)
    nn.init.constant_(model.c1.weight, 1e38)
    x = torch.randn(32, 4, 16).abs() + 1
    report = trainlint.check(model, (x, x[:, :, 0].argmax(1)))
    assert _tl504(report).module == "c1"


class _LogCounts(nn.Module):
    """torch.where(h > 0, log(h), 0), h = counts x a learned scale: a count of 0 makes the
    unselected log's gradient 0 * inf = NaN in the scale's gradient, the forward finite."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.scale
        return torch.where(h > 0, torch.log(h), torch.zeros_like(h))


def test_a_nan_parameter_gradient_at_step_0_is_the_unsafe_where_not_the_learning_rate() -> None:
    """At step 0 no update ran: lowering the rate and clipping (the old fix) spread the NaN
    total norm to every parameter; the traced log names the safe unselected branch."""
    model = nn.Sequential(_LogCounts(), nn.Linear(4, 1))
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 4.0, 2.0]])
    found = _tl504(trainlint.check(model, (x, torch.ones(2, 1)), steps=1))
    assert found.module == "0" and "which ran log" in found.message
    assert "torch.log(x.clamp_min(1e-12))" in found.fix and "learning rate" not in found.fix


class _Gumbel(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        u = torch.ones_like(logits)  # quantized noise that reached 1
        return torch.softmax(logits - torch.log(-torch.log(u)), -1)


def test_a_gumbel_softmax_nan_is_told_to_clamp_the_log_not_to_check_a_mask() -> None:
    """No fill with -inf ran: the softmax's NaN is the log's (-log(-log 1) = +inf)."""
    model = nn.Sequential(nn.Linear(4, 4), _Gumbel(), nn.Linear(4, 2))
    found = _tl504(trainlint.check(model, (torch.randn(3, 4), torch.randn(3, 2)), steps=1))
    assert found.module == "1" and not found.fix.startswith("check the attention mask")
    assert "clamp the input of log" in found.fix


class _MaskedMean(nn.Module):
    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        keep = (~pad).float()[..., None]
        filled = h.masked_fill(pad[..., None], float("-inf"))
        return torch.cat([filled.max(1).values, (filled * keep).sum(1) / keep.sum(1)], -1)


def test_a_masked_mean_over_a_minus_inf_fill_is_told_to_fill_with_finfo_min() -> None:
    """0 * -inf is NaN: eps in the denominator does not help, finfo.min does."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.pool, self.out = nn.Linear(3, 4), _MaskedMean(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            return self.out(self.pool(self.emb(x), pad))

    pad = torch.arange(5)[None] >= torch.tensor([[5], [3]])
    found = _tl504(trainlint.check(Net(), ((torch.randn(2, 5, 3), pad), torch.tensor([0, 1])),
                                   steps=1))
    assert found.module == "pool" and "masked_fill with -inf" in found.fix
    assert "torch.finfo(dtype).min instead of -inf" in found.fix


def test_an_overflowing_exp_in_a_custom_loss_is_named() -> None:
    def poisson(rate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (torch.exp(rate) - y * rate).mean()

    x = torch.randn(4, 3)
    x[0] *= 5000.0
    found = _tl504(trainlint.check(nn.Linear(3, 1), (x, torch.ones(4, 1)), loss_fn=poisson,
                                   steps=1))
    assert found.evidence["where"] == "loss" and "ran exp" in found.fix
    assert "exp(x.clamp_max(80))" in found.fix


def test_a_loss_overflowing_after_the_weights_blew_up_is_the_learning_rates() -> None:
    """SGD at lr 5 on MSE: weights 4.7 -> 1.3e3 -> 4.7e11, then the loss is inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=5.0, momentum=0.9)
    with trainlint.Monitor(model, optimizer=opt, every=1) as mon:
        for step in range(5):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
            loss = F.mse_loss(model(x), x[:, :1] * 2 + x[:, 1:2])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss)
        found = _tl504(mon.report())
    assert found.evidence["where"] == "loss" and "lower the learning rate" in found.fix
    assert "CrossEntropyLoss" not in found.fix


MASK_BUFFER_MODEL = """
import math, torch, torch.nn as nn


class Attn(nn.Module):
    def __init__(self, d=16, t=8):
        super().__init__()
        self.d = d
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.full((t, t), float("-inf")), diagonal=0))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        att = q @ k.transpose(-2, -1) / math.sqrt(self.d) + self.mask
        return self.proj(att.softmax(-1) @ v)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(50, 16), Attn(), nn.Linear(16, 50)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.attn(h))
"""


def test_a_mask_buffer_that_hides_every_key_is_the_masks_not_a_division(tmp_path) -> None:
    """Causal attention whose -inf mask is a buffer built with triu(diagonal=0): query 0 sees
    no key, a softmax over nothing (measured: NaN at step 0; diagonal=1 trains, 3.66 after 50
    steps). The fix had become "its forward ran div: add eps to denominators", which cannot
    help: its only division is by sqrt(d), a number, no NaN maker. (The model is the user's
    file, as a model.py is.)"""
    path = tmp_path / "mask_model.py"
    path.write_text(MASK_BUFFER_MODEL)
    spec = importlib.util.spec_from_file_location("mask_model", path)
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    torch.manual_seed(0)
    ids, y = torch.randint(0, 50, (32, 8)), torch.randint(0, 50, (32, 8))
    report = trainlint.check(user.TinyLM(), (ids, y))
    [found] = [f for f in report.findings if f.code == "TL504"]
    assert found.module == "attn"
    assert found.fix.startswith("check the attention mask of 'attn'")
    assert "eps to denominators" not in found.fix
