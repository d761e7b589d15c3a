"""Property: ``trainlint.check`` leaves the user's model, optimizer and RNGs bit-identical and
no hook, tensor hook, global hook or TorchFunctionMode behind, also when the user's code raises.

Architectures, optimizers, flags and failures are drawn at random (hypothesis); every example
is tiny (a handful of 4-to-8-wide layers, batches of 1-5) so that 200 of them run in seconds.
"""

from __future__ import annotations

import importlib
import random
from typing import Any, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import trainlint
from trainlint.errors import TrainlintError, UserCodeError

WIDTH, CHANNELS, SIDE, FEATURES_IN, CLASSES = 8, 4, 4, 6, 3
BN_MESSAGE = "Expected more than 1 value per channel when training, got input size [1, 8]"

MODULE_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
OPTIMIZER_HOOK_DICTS = (
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
)
GLOBAL_MODULE_HOOKS = tuple(n for n in dir(torch.nn.modules.module) if n.startswith("_global_"))
OPTIMIZER_MODULE = importlib.import_module("torch.optim.optimizer")
GLOBAL_OPTIMIZER_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the user's modules
def _make_exception(kind: str) -> BaseException:
    if kind == "runtime":
        return RuntimeError("boom from the user's code")
    if kind == "bn":
        return ValueError(BN_MESSAGE)
    if kind == "oom":
        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return KeyboardInterrupt()


class Boom(nn.Module):
    """Passes its input through; once armed, raises on its k-th call."""

    def __init__(self, k: int, kind: str) -> None:
        super().__init__()
        self.k, self.kind, self.calls, self.armed = k, kind, 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.calls += 1
            if self.calls == self.k:
                raise _make_exception(self.kind)
        return x


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, owner: BackwardBoom) -> torch.Tensor:
        ctx.owner = owner
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        owner = ctx.owner
        if owner.armed:
            owner.calls += 1
            if owner.calls == owner.k:
                raise _make_exception(owner.kind)
        return grad, None


class BackwardBoom(Boom):
    """Identity whose backward raises on its k-th call once armed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RaiseInBackward.apply(x, self)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Twice(nn.Module):
    """One module applied twice: shared weights, two calls per forward."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


class InplaceRelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(x * 1.0)


class Counted(nn.Module):
    """Buffers the forward changes: a call counter and a running mean."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.running.mul_(0.9).add_(0.1 * x.detach().mean())
        return x


class Reassigned(nn.Module):
    """Replaces its buffer with a new tensor each call (the object must come back)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps = self.steps + 1
        return x


class Retain(nn.Module):
    """Keeps a reference to its last output (tensor hooks on it must not outlive the check)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x * 1.0
        self.last = out
        return out


# ------------------------------------------------------------------ building a case
SIMPLE = ("linear", "batchnorm", "layernorm", "groupnorm", "relu", "relu_inplace",
          "functional_relu_", "tanh", "sigmoid", "gelu", "dropout", "counted", "reassigned",
          "retain")


def _simple(name: str, image: bool) -> nn.Module:
    if name == "linear":
        return (nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1) if image
                else nn.Linear(WIDTH, WIDTH))
    if name == "batchnorm":
        return nn.BatchNorm2d(CHANNELS) if image else nn.BatchNorm1d(WIDTH)
    if name == "layernorm":
        return nn.LayerNorm((CHANNELS, SIDE, SIDE) if image else WIDTH)
    if name == "groupnorm":
        return nn.GroupNorm(2, CHANNELS if image else WIDTH)
    factories = {"relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True),
                 "functional_relu_": InplaceRelu, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                 "gelu": nn.GELU, "dropout": lambda: nn.Dropout(0.5), "counted": Counted,
                 "reassigned": Reassigned, "retain": Retain}
    return factories[name]()


def _block(spec: Any, image: bool) -> nn.Module:
    if isinstance(spec, str):
        return _simple(spec, image)
    kind, body = spec
    if kind == "residual":
        return Residual(nn.Sequential(*(_simple(s, image) for s in body)))
    if kind == "twice":
        return Twice(_simple("linear", image))
    frozen = _simple("linear", image)
    frozen.requires_grad_(False)
    return frozen


block_specs = st.one_of(
    st.sampled_from(SIMPLE),
    st.tuples(st.just("residual"), st.lists(st.sampled_from(SIMPLE), min_size=1, max_size=3)),
    st.tuples(st.sampled_from(["twice", "frozen"]), st.none()),
)
failures = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["forward", "backward", "loss", "batch"]), st.integers(1, 3),
              st.sampled_from(["runtime", "bn", "oom", "interrupt"])),
)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    blocks = draw(st.lists(block_specs, min_size=1, max_size=5))
    return {
        "image": draw(st.booleans()),
        "blocks": blocks,
        "failure": draw(failures),
        "failure_at": draw(st.integers(0, len(blocks))),
        "batch": draw(st.integers(1, 5)),
        "targets": draw(st.sampled_from(["classes", "none", "loss_fn"])),
        "optimizer": draw(st.sampled_from(["default", "sgd", "adam", "adamw_all", "factory"])),
        "prior_step": draw(st.booleans()),
        "keep_grads": draw(st.booleans()),
        "eval_modules": draw(st.sets(st.integers(0, 30), max_size=4)),
        "user_hook": draw(st.booleans()),
        "steps": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(case: dict) -> tuple[nn.Module, list[Boom]]:
    image = case["image"]
    stem = nn.Conv2d(3, CHANNELS, 3, padding=1) if image else nn.Linear(FEATURES_IN, WIDTH)
    body = [_block(spec, image) for spec in case["blocks"]]
    booms: list[Boom] = []
    failure = case["failure"]
    if failure is not None and failure[0] in ("forward", "backward"):
        where, k, kind = failure
        boom = (Boom if where == "forward" else BackwardBoom)(k, kind)
        body.insert(case["failure_at"], boom)
        booms.append(boom)
    head_in = CHANNELS * SIDE * SIDE if image else WIDTH
    model = nn.Sequential(stem, *body, nn.Flatten(), nn.Linear(head_in, CLASSES))
    modules = list(model.modules())
    for index in case["eval_modules"]:
        if index < len(modules):
            modules[index].eval()
    return model, booms


def make_batch(case: dict) -> Any:
    g = torch.Generator().manual_seed(case["seed"])
    n = case["batch"]
    shape = (n, 3, SIDE, SIDE) if case["image"] else (n, FEATURES_IN)
    x = torch.randn(*shape, generator=g)
    if case["targets"] == "none":
        return x
    return x, torch.randint(0, CLASSES, (n,), generator=g)


class FailingLoss:
    """Cross-entropy that raises on its k-th call once armed."""

    def __init__(self, k: int = 0, kind: str = "runtime") -> None:
        self.k, self.kind, self.calls, self.armed = k, kind, 0, False

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.calls += 1
            if self.calls == self.k:
                raise _make_exception(self.kind)
        return F.cross_entropy(outputs, targets)


class FailingBatch:
    """A batch function that raises on its k-th call once armed."""

    def __init__(self, batch: Any, k: int, kind: str) -> None:
        self.batch, self.k, self.kind, self.calls, self.armed = batch, k, kind, 0, False

    def __call__(self) -> Any:
        if self.armed:
            self.calls += 1
            if self.calls == self.k:
                raise _make_exception(self.kind)
        return self.batch


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
    if kind == "adamw_all":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return torch.optim.Adam(trainable, lr=1e-3)


def prior_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any, keep_grads: bool) -> None:
    """One ordinary training step by the user before the check (optimizer state, grads)."""
    x = batch[0] if isinstance(batch, tuple) else batch
    out = model(x)
    loss = F.cross_entropy(out, batch[1]) if isinstance(batch, tuple) else out.pow(2).mean()
    loss.backward()
    opt.step()
    if not keep_grads:
        opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ what must not change
def _bits(t: torch.Tensor) -> tuple:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return (t.dtype, tuple(t.shape), t.device, flat.view(torch.uint8).clone())


def _value(v: Any) -> Any:
    return _bits(v) if isinstance(v, torch.Tensor) else v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and a and isinstance(a[-1], torch.Tensor):
        return a[:-1] == b[:-1] and torch.equal(a[-1], b[-1])
    return a == b


def user_state(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict:
    state: dict = {
        "params": [(n, id(p), _bits(p), p.requires_grad,
                    None if p.grad is None else (id(p.grad), _bits(p.grad)))
                   for n, p in model.named_parameters()],
        "buffers": [(n, id(b), _bits(b)) for n, b in model.named_buffers()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "attributes": [(n, sorted(vars(m))) for n, m in model.named_modules()],
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "rng_numpy": np.random.get_state(),
        "grad_enabled": torch.is_grad_enabled(),
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    if opt is not None:
        state["opt_state"] = [
            (id(p), id(opt.state[p]) if p in opt.state else None,
             {k: (id(v), _value(v)) for k, v in opt.state[p].items()} if p in opt.state else None)
            for group in opt.param_groups for p in group["params"]]
        state["opt_groups"] = [(id(g), [id(p) for p in g["params"]],
                                {k: _value(v) for k, v in g.items() if k != "params"})
                               for g in opt.param_groups]
    return state


def _pairs(a: list, b: list) -> Any:
    assert len(a) == len(b)
    return zip(a, b)


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for (n, pid, bits, rg, grad), (n2, pid2, bits2, rg2, grad2) in _pairs(
            before["params"], after["params"]):
        assert (n, pid, rg) == (n2, pid2, rg2), n
        assert _same(bits, bits2), f"parameter {n} changed"
        assert (grad is None) == (grad2 is None), f"grad of {n} appeared or vanished"
        if grad is not None:
            assert grad[0] == grad2[0], f"grad of {n} is a different tensor"
            assert _same(grad[1], grad2[1]), f"grad of {n} changed"
    for (n, bid, bits), (n2, bid2, bits2) in _pairs(before["buffers"],
                                                             after["buffers"]):
        assert (n, bid) == (n2, bid2) and _same(bits, bits2), f"buffer {n} changed"
    assert before["training"] == after["training"]
    assert before["attributes"] == after["attributes"]
    for key in ("rng_torch", "rng_cuda"):
        if key in before:
            a, b = before[key], after[key]
            pairs = _pairs(a, b) if isinstance(a, list) else [(a, b)]
            assert all(torch.equal(x, y) for x, y in pairs), f"{key} changed"
    assert before["rng_python"] == after["rng_python"]
    np_a, np_b = before["rng_numpy"], after["rng_numpy"]
    assert np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and np_a[2:] == np_b[2:]
    assert before["grad_enabled"] == after["grad_enabled"]
    if "opt_state" in before:
        for (pid, did, entries), (pid2, did2, entries2) in _pairs(
                before["opt_state"], after["opt_state"]):
            assert (pid, did) == (pid2, did2), "optimizer state entry replaced"
            assert (entries is None) == (entries2 is None)
            if entries is not None:
                assert entries.keys() == entries2.keys()
                for k in entries:
                    assert entries[k][0] == entries2[k][0], f"optimizer state {k} replaced"
                    assert _same(entries[k][1], entries2[k][1]), f"optimizer state {k} changed"
        for (gid, ps, opts), (gid2, ps2, opts2) in _pairs(
                before["opt_groups"], after["opt_groups"]):
            assert (gid, ps) == (gid2, ps2)
            assert opts.keys() == opts2.keys()
            assert all(_same(opts[k], opts2[k]) for k in opts), "param_group options changed"


def _keys(value: Any) -> Any:
    return tuple(value) if isinstance(value, dict) else value


def hook_census(model: nn.Module, opt: Optional[torch.optim.Optimizer]) -> dict:
    """Every place a hook or mode can hide, as plain comparable data."""
    census: dict = {
        "modules": [(n, attr, tuple(getattr(m, attr))) for n, m in model.named_modules()
                    for attr in MODULE_HOOK_DICTS],
        "params": [(n, tuple(p._backward_hooks or ()),
                    tuple(getattr(p, "_post_accumulate_grad_hooks", None) or ()))
                   for n, p in model.named_parameters()],
        "global_modules": [(n, _keys(getattr(torch.nn.modules.module, n)))
                           for n in GLOBAL_MODULE_HOOKS],
        "global_optim": [(n, tuple(getattr(OPTIMIZER_MODULE, n)))
                         for n in GLOBAL_OPTIMIZER_HOOKS],
        "function_modes": torch._C._len_torch_function_stack(),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "module_init": nn.Module.__init__,
        "module_call": nn.Module.__call__,
    }
    if opt is not None:
        census["optimizer"] = [(attr, tuple(getattr(opt, attr))) for attr in OPTIMIZER_HOOK_DICTS]
    return census


def _user_hook(module: nn.Module, args: tuple, output: Any) -> None:
    return None


# ------------------------------------------------------------------ the property
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_check_leaves_user_state_and_no_hooks(case: dict) -> None:
    torch.manual_seed(case["seed"])
    model, booms = build(case)
    batch = make_batch(case)
    opt = None
    if case["optimizer"] not in ("default", "factory") or case["prior_step"]:
        opt = make_optimizer(case["optimizer"], model)
    if case["prior_step"]:
        try:
            prior_step(model, opt, batch, case["keep_grads"])
        except (RuntimeError, ValueError):
            pass  # a batch of one in a training BatchNorm: the user's step fails, state stays
    if case["user_hook"]:
        model[0].register_forward_hook(_user_hook)
    loss_fn = None
    failure = case["failure"]
    if case["targets"] == "loss_fn" and isinstance(batch, tuple):
        loss_fn = (FailingLoss(failure[1], failure[2]) if failure and failure[0] == "loss"
                   else FailingLoss())
        booms.append(loss_fn)
    fed: Any = batch
    if failure and failure[0] == "batch":
        fed = FailingBatch(batch, failure[1], failure[2])
        booms.append(fed)
    for boom in booms:
        boom.armed = True
    passed = {"default": None, "factory": lambda params: torch.optim.Adam(params, lr=1e-3)}.get(
        case["optimizer"], opt)
    retained = [m for m in model.modules() if isinstance(m, Retain)]

    before, hooks_before = user_state(model, opt), hook_census(model, opt)
    outcome: Any = None
    try:
        outcome = trainlint.check(model, fed, loss_fn=loss_fn, optimizer=passed,
                                  steps=case["steps"])
    except (TrainlintError, KeyboardInterrupt) as exc:
        outcome = exc
    event(f"outcome: {type(outcome).__name__}")
    assert_same_state(before, user_state(model, opt))
    assert hook_census(model, opt) == hooks_before
    for module in retained:
        if module.last is not None:
            assert not module.last._backward_hooks, "a tensor hook outlived the check"

    raised = [b for b in booms if b.calls >= b.k > 0]
    if raised and raised[0].kind in ("runtime", "oom"):
        assert isinstance(outcome, UserCodeError)
    if raised and raised[0].kind == "interrupt":
        assert isinstance(outcome, KeyboardInterrupt)
