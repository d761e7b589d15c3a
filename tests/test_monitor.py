"""``trainlint.Monitor``: sampling every N-th step, idle hooks in between, clean detach."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

import trainlint
from trainlint import stats
from trainlint.assemble import RECENT_VALUES, UNIT_VALUES, UNIT_WINDOW, window_for
from trainlint.engine import RULES


class ModeSpy(nn.Module):
    """Records, at each forward, whether a TorchFunctionMode is active (the probe's)."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(len(_get_current_function_mode_stack()))
        return x


def make() -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(ModeSpy(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def hook_count(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    total = len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return total


def train(model: nn.Module, opt: torch.optim.Optimizer, monitor: trainlint.Monitor,
          steps: int, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("every,steps", [(3, 10), (1, 4), (5, 5)])
def test_monitor_observes_exactly_every_nth_step(every: int, steps: int) -> None:
    model, opt = make()
    monitor = trainlint.Monitor(model, optimizer=opt, every=every)
    losses = train(model, opt, monitor, steps)
    observed = list(range(0, steps, every))
    report = monitor.report()
    trace = report.trace
    assert trace.observed_steps == len(observed) and trace.steps == steps
    assert [s["step"] for s in trace.per_step] == observed
    assert trace.losses == pytest.approx([losses[i] for i in observed], rel=1e-6)
    # Statistics come from the observed steps only: 4 samples x 16 features per step.
    relu = trace.layer_by_key()[("2", "output")]
    assert relu.activation.count == len(observed) * 4 * 16
    spy = model[0].modes
    assert spy == [1 if i in observed else 0 for i in range(steps)]
    assert trace.mode == "monitor" and trace.batch_size == 4
    monitor.close()


def test_idle_steps_gather_no_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make()
    calls = []
    original = stats.ActivationBatch.add
    monkeypatch.setattr(stats.ActivationBatch, "add",
                        lambda self, *args: calls.append(1) or original(self, *args))
    with trainlint.Monitor(model, optimizer=opt, every=4) as monitor:
        train(model, opt, monitor, 1)
        per_step = len(calls)
        assert per_step > 0
        train(model, opt, monitor, 3)
        assert len(calls) == per_step
        train(model, opt, monitor, 1)
        assert len(calls) == 2 * per_step


def test_close_and_context_manager_remove_every_hook() -> None:
    model, opt = make()
    bare = hook_count(model, opt)
    monitor = trainlint.Monitor(model, optimizer=opt, every=2)
    assert hook_count(model, opt) > bare
    train(model, opt, monitor, 3)
    monitor.close()
    monitor.close()
    assert hook_count(model, opt) == bare
    assert _get_current_function_mode_stack() == []
    with pytest.raises(trainlint.ConfigError):
        monitor.step()
    with trainlint.Monitor(model, optimizer=opt, every=2) as again:
        train(model, opt, again, 2)
        assert again.report().trace.observed_steps == 1
    assert hook_count(model, opt) == bare


def test_context_manager_detaches_when_training_raises() -> None:
    model, opt = make()
    bare = hook_count(model, opt)
    with pytest.raises(RuntimeError, match="shape"):
        with trainlint.Monitor(model, optimizer=opt, every=1):
            model(torch.randn(2, 5))
    assert hook_count(model, opt) == bare
    assert _get_current_function_mode_stack() == []


def test_monitor_report_finds_a_dead_layer() -> None:
    model, opt = make()
    with torch.no_grad():
        model[1].bias.fill_(-50.0)
    with trainlint.Monitor(model, optimizer=opt, every=2) as monitor:
        train(model, opt, monitor, 4, batch=16)
        report = monitor.report()
    assert [(f.code, f.module) for f in report.findings if f.code == "TL101"] == [("TL101", "2")]


def test_a_report_keeps_its_parameter_numbers_while_training_goes_on() -> None:
    model, opt = make()
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        train(model, opt, monitor, 2)
        early = monitor.report().trace.params
        as_built = [dataclasses.asdict(p) for p in early]
        train(model, opt, monitor, 3)
        later = monitor.report().trace.params
    assert [dataclasses.asdict(p) for p in early] == as_built
    assert all(len(p.update_norms) == 2 and p.grad_steps == 2 for p in early)
    assert all(len(p.update_norms) == 5 and p.grad_steps == 5 for p in later)
    assert [p.norm for p in later] != [p.norm for p in early]


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_every_must_be_a_positive_whole_number(every: object) -> None:
    model, opt = make()
    with pytest.raises(trainlint.ConfigError):
        trainlint.Monitor(model, optimizer=opt, every=every)


@pytest.mark.parametrize("bad,message", [
    (lambda model: {"optimizer": list(model.parameters())}, "not the parameters"),
    (lambda model: {"optimizer": "sgd"}, "must be a torch.optim.Optimizer"),
    (lambda model: {"selection": ["TL101"]}, "selection must be"),
])
def test_bad_arguments_are_config_errors_that_leave_nothing_behind(bad, message: str) -> None:
    import torch._dynamo  # noqa: F401  (loaded: a Monitor would take the eager stance)
    from torch._dynamo import eval_frame

    model, opt = make()
    bare = hook_count(model, opt)
    kwargs = {"optimizer": opt, **bad(model)}
    with pytest.raises(trainlint.ConfigError, match=message):
        trainlint.Monitor(model, every=2, **kwargs)
    assert hook_count(model, opt) == bare
    assert eval_frame._stance.stance == "default"


def test_a_constructor_that_fails_after_attaching_detaches(monkeypatch) -> None:
    from trainlint import monitor as monitor_module

    def broken(*args, **kwargs):
        raise RuntimeError("trace builder failed")

    model, opt = make()
    bare = hook_count(model, opt)
    monkeypatch.setattr(monitor_module, "TraceBuilder", broken)
    with pytest.raises(RuntimeError, match="trace builder failed"):
        trainlint.Monitor(model, optimizer=opt, every=1)
    assert hook_count(model, opt) == bare


def test_two_monitors_closed_in_any_order_restore_the_compile_stance() -> None:
    """A GAN's two Monitors: each holds force_eager during its observed steps; the stance the
    process had comes back when the last lets go, whatever the order they close in."""
    import torch._dynamo  # noqa: F401
    from torch._dynamo import eval_frame

    generator, gen_opt = make()
    critic, critic_opt = make()
    first = trainlint.Monitor(generator, optimizer=gen_opt, every=2)
    second = trainlint.Monitor(critic, optimizer=critic_opt, every=3)
    assert eval_frame._stance.stance == "force_eager"
    train(generator, gen_opt, first, 1)
    assert eval_frame._stance.stance == "force_eager"  # the second still observes
    first.close()
    second.close()
    assert eval_frame._stance.stance == "default"
    third = trainlint.Monitor(critic, optimizer=critic_opt, every=2)
    del third  # dropped without close(): it lets go when collected
    import gc

    gc.collect()
    assert eval_frame._stance.stance == "default"


def test_step_takes_a_tensor_or_a_number() -> None:
    model, opt = make()
    with trainlint.Monitor(model, optimizer=opt, every=4) as monitor:
        with pytest.raises(trainlint.ConfigError, match="must be a tensor or a number"):
            monitor.step("loss")
        monitor.step(torch.tensor([1.0, 3.0]))  # a per-sample loss counts by its mean
        monitor.step(torch.tensor(5.0))
        monitor.step(np.float32(2.0))  # numpy scalars and one-value arrays are numbers
        monitor.step(np.array(2.0))
        for odd in (np.array([1.0, 2.0]), np.bool_(True), True):
            with pytest.raises(trainlint.ConfigError, match="must be a tensor or a number"):
                monitor.step(odd)
        last = train(model, opt, monitor, 1)[0]
        first, window = monitor.report().trace.per_step
    assert first["loss"] == 2.0
    assert window["loss_max"] == 5.0
    assert window["loss_mean"] == pytest.approx((5.0 + 2.0 + 2.0 + last) / 4)
    assert window["loss_min"] == pytest.approx(min(2.0, last))


def test_a_window_keeps_its_lowest_loss_and_so_does_the_tail() -> None:
    """A policy-gradient loss dips below 0 between observations while the windows' means
    stay above: the lowest loss of each window (and of the steps after the last observed
    one) is kept, so the rules see that the loss has no floor at 0."""
    model, opt = make()
    with trainlint.Monitor(model, optimizer=opt, every=4) as monitor:
        train(model, opt, monitor, 1)
        for value in (0.5, -0.25, 0.75):
            monitor.step(value)
        train(model, opt, monitor, 1)
        for value in (0.5, -0.5):
            monitor.step(value)
        trace = monitor.report().trace
    assert trace.per_step[1]["loss_min"] == -0.25 and trace.per_step[1]["loss_mean"] > 0
    assert trace.loss_tail["loss_min"] == -0.5


def test_every_step_observed_keeps_hooks_on_and_hooks_a_module_added_later() -> None:
    """With every=1 the hooks stay on between observed steps; a module added to the model
    between steps is hooked, under its name, at the next observed forward; close() leaves
    none."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(monitor: trainlint.Monitor) -> None:
        opt.zero_grad()
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        monitor.step(loss)

    monitor = trainlint.Monitor(model, optimizer=opt, every=1)
    step(monitor)
    assert model[0]._forward_hooks  # kept for the next observed step
    model.append(nn.Tanh())
    step(monitor)
    assert model[2]._forward_hooks
    step(monitor)
    keys = {lt.node[1:3] for lt in monitor.report().trace.layers}
    assert ("2", "output") in keys
    monitor.close()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("every", [1, 2])
def test_a_module_replaced_mid_run_is_observed_under_its_name(every: int) -> None:
    """Replacing a module keeps the module count: the new one is still hooked and named (it was
    reported as a functional op of the root), and the one it replaced keeps no hook."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    old = model[1]
    with trainlint.Monitor(model, optimizer=opt, every=every) as monitor:
        for i in range(4):
            if i == 1:
                model[1] = nn.Sigmoid()
            opt.zero_grad()
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            opt.step()
            monitor.step(loss)
        layers = {(lt.module, lt.type) for lt in monitor.report().trace.layers}
    assert ("1", "Sigmoid") in layers
    assert not any(module == "" for module, _ in layers)
    assert not old._forward_hooks and not old._forward_pre_hooks


def _train_then_evaluate(model: nn.Module, opt: torch.optim.Optimizer,
                         monitor: trainlint.Monitor, steps: int, x: torch.Tensor,
                         y: torch.Tensor, x_eval: torch.Tensor, train_mode: bool = True) -> None:
    """A plain loop that evaluates (eval mode, autograd off) after each optimizer step and
    before monitor.step()."""
    for _ in range(steps):
        model.train(train_mode)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            model(x_eval)
        monitor.step(loss)


@pytest.mark.parametrize("eval_when", ["after_update", "whole_step"])
def test_eval_mode_is_read_at_the_training_forward(eval_when: str) -> None:
    """TL602 judges the mode the training forward ran in: a validation pass in eval mode after
    optimizer.step() and before monitor.step() is no eval-mode training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        _train_then_evaluate(model, opt, monitor, 4, x, y, x,
                             train_mode=eval_when == "after_update")
        found = [f for f in monitor.report().findings if f.code == "TL602"]
    assert bool(found) is (eval_when == "whole_step")


def _validate_then_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         x_val: torch.Tensor, train_mode: bool = True,
                         logits: Callable = lambda out: out) -> trainlint.Report:
    """Three observed steps that each start with a validation forward in eval mode with
    autograd on (no no_grad, never backpropagated), then train; the Monitor's report."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(3):
            model.eval()
            model(x_val)
            model.train(train_mode)
            opt.zero_grad()
            F.cross_entropy(logits(model(x)), y).backward()
            opt.step()
            monitor.step()
        return monitor.report()


@pytest.mark.parametrize("train_after", [True, False])
def test_eval_mode_is_read_at_the_forward_the_backward_reached(train_after: bool) -> None:
    """TL602 judges the forward whose output the backward reached."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    report = _validate_then_train(model, x, y, x[:8], train_mode=train_after)
    assert ("TL602" in {f.code for f in report.findings}) is not train_after


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.fc(self.drop(x))
        return {"probs": torch.softmax(logits, -1), "logits": logits}


def test_the_training_forward_is_found_through_any_output() -> None:
    """The loss reads the second output: TL602 and the batch size are still the training
    forward's, not the validation forward's."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    report = _validate_then_train(TwoOutputs(), x, y, x[:5], logits=lambda out: out["logits"])
    assert "TL602" not in {f.code for f in report.findings}
    assert report.trace.batch_size == 64


class FlatTokens(nn.Module):
    """BatchNorm1d over the (N*L, C) rows of token embeddings: it sees N*L rows, not N."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.bn, self.out = nn.Embedding(50, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        n, length, c = h.shape
        return self.out(self.bn(h.reshape(n * length, c)).reshape(n, length, c).mean(1))


def test_the_batch_size_is_dim_0_of_the_training_forwards_input() -> None:
    """As trainlint check reads it: 8 sequences of 12 tokens, not the BatchNorm's 96 rows (and
    not the 3 of a validation forward run with autograd on before the training forward)."""
    torch.manual_seed(0)
    model = FlatTokens()
    x, y = torch.randint(0, 50, (8, 12)), torch.randint(0, 4, (8,))
    report = _validate_then_train(model, x, y, x[:3])
    assert report.trace.batch_size == 8
    assert "TL402" in {f.code for f in report.findings}
    assert report.trace.batch_size == trainlint.check(model, (x, y)).trace.batch_size


def _knocked_out(steps: int, at: Optional[int], every: int = 1) -> list:
    """TL101's findings after ``steps`` training steps at batch 64 of a ReLU MLP whose second
    layer's bias is pushed to -100 at step ``at`` (None: never), observed every ``every``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with trainlint.Monitor(model, optimizer=opt, every=every) as monitor:
        for step in range(steps):
            if step == at:
                with torch.no_grad():
                    model[2].bias -= 100.0
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    return [f for f in report.findings if f.code == "TL101"]


@pytest.mark.parametrize("knock_out", [True, False])
def test_units_killed_mid_run_are_dead_over_the_recent_steps(knock_out: bool) -> None:
    """One huge update at step 5 (here: the bias pushed to -100) kills every unit of a layer
    that was active before: a Monitor run reports them once they stay dead for the window."""
    window = window_for(64)  # 64 samples a step: its window holds 512 per unit
    assert window >= UNIT_WINDOW
    found = _knocked_out(5 + window, 5 if knock_out else None)
    assert [f.module for f in found] == (["3"] if knock_out else [])
    if knock_out:
        assert found[0].evidence["dead_fraction"] == 1.0
        assert f"over the last {window} observed step(s)" in found[0].message


def test_units_killed_early_in_a_short_run_are_reported() -> None:
    """Units knocked out at the third observed step at batch 64, the run as long as the
    window after it (8 steps: 512 samples per unit): the layer reads 100% dead; a window of
    the whole run would still see them active at its first two steps."""
    window = window_for(64)
    assert window == math.ceil(UNIT_VALUES / 64) > UNIT_WINDOW  # set by samples, not the floor
    [found] = _knocked_out(2 + window, 2)
    assert found.module == "3" and found.evidence["dead_fraction"] == 1.0
    assert f"over the last {window} observed step(s)" in found.message


@pytest.mark.parametrize("knock_out", [True, False])
def test_units_killed_since_a_sparse_window_began_are_dead_over_its_recent_records(
        knock_out: bool) -> None:
    """At every=10 and batch 64 the window holds 8 records (80 steps); units knocked out 30
    steps before the end are dead over the recent records that hold 128 values per unit."""
    recent = window_for(64, RECENT_VALUES)
    assert recent < window_for(64) and 10 * recent <= 30
    found = _knocked_out(100, 70 if knock_out else None, every=10)
    assert [f.module for f in found] == (["3"] if knock_out else [])
    if knock_out:
        assert found[0].evidence["dead_fraction"] == 1.0
        assert f"over the last {recent} observed step(s)" in found[0].message


@pytest.mark.parametrize("knock_out", [True, False])
def test_at_batch_4_the_unit_window_holds_enough_samples(knock_out: bool) -> None:
    """Each unit of a Linear(16, 256) + ReLU sees N(-2.3, 1) before the ReLU: active for 1%
    of samples, so over ten steps of 4 (40 samples) 65% of the units look dead. The window
    holds 512 samples per unit (128 steps) and finds ~0.4%; units knocked out at step 20 are
    dead over those 128 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 3))
    with torch.no_grad():
        model[0].weight.copy_(F.normalize(torch.randn(256, 16), dim=1))
        model[0].bias.fill_(-2.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(150):
            if step == 20 and knock_out:
                with torch.no_grad():
                    model[0].bias.fill_(-100.0)
            opt.zero_grad()
            loss = F.cross_entropy(model(torch.randn(4, 16)), torch.randint(0, 3, (4,)))
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    found = [f for f in report.findings if f.code == "TL101"]
    assert [f.module for f in found] == (["1"] if knock_out else [])
    if knock_out:
        assert found[0].evidence["dead_fraction"] == 1.0
        assert 20 + window_for(4) <= 150
        assert f"over the last {window_for(4)} observed step(s)" in found[0].message


def test_a_warmup_from_zero_records_the_rate_of_each_step_and_does_not_fail_at_it() -> None:
    """transformers' linear warmup starts at lr 0; the scheduler steps after the optimizer,
    before monitor.step(). The record keeps the rate the update ran at (0, then 1e-5), and
    fail_on='warning' does not stop the run at its first step on TL503."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, i / 100))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    lrs = []
    with trainlint.Monitor(model, optimizer=opt, every=1, fail_on="warning") as monitor:
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            monitor.step(loss)
            lrs.append({p.lr for p in monitor.report().trace.params})
    assert lrs == [{0.0}, {1e-5}]


def test_an_evaluation_inside_the_observed_window_is_not_read() -> None:
    """A plain loop that evaluates (autograd off, eval mode, another batch size) between the
    training step and monitor.step(): the step's statistics are the training forward's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y, x_eval = torch.randn(64, 8), torch.randint(0, 3, (64,)), 50 * torch.randn(3, 8)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        _train_then_evaluate(model, opt, monitor, 3, x, y, x_eval)
        report = monitor.report()
    assert report.trace.batch_size == 64
    first = next(lt for lt in report.trace.layers if lt.module == "0")
    assert first.activation.count == 3 * 64 * 16
    norm = report.trace.modules["1"]
    assert norm.batch_sizes == [64]  # each distinct call once: never the evaluation's 3


def test_a_keyboard_interrupt_in_forward_leaves_no_mode_over_the_users() -> None:
    """torch skips the forward hooks on a KeyboardInterrupt: the probe's mode stays pushed.
    It must never pop a mode the user entered later (here torch.device('meta'))."""
    class Interrupting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.armed = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt
            return self.fc(x)

    model = Interrupting()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = trainlint.Monitor(model, optimizer=opt, every=1)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    with torch.device("meta"):
        model(torch.randn(2, 4, device="cpu"))
        assert torch.empty(1).device.type == "meta"  # the user's mode is still on
    model(torch.randn(2, 4))
    monitor.close()
    assert torch._C._len_torch_function_stack() == 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _train_with_no_mode_left(model: nn.Module, opt: torch.optim.Optimizer,
                             monitor: trainlint.Monitor, steps: int = 2) -> None:
    """Observed steps on batches of 8 four-feature rows; no torch-function mode is left on
    the stack after any forward."""
    for _ in range(steps):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        assert torch._C._len_torch_function_stack() == 0
        loss.backward()
        opt.step()
        monitor.step(loss)


def test_a_report_after_an_interrupted_forward_takes_the_probes_mode_off() -> None:
    """In a notebook: Ctrl-C inside forward (here in the user's own block, where the probe's
    mode is on the stack), then the report, and no further step or close(): every torch call
    afterwards would go through the probe's mode."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = trainlint.Monitor(model, optimizer=opt, every=1)
    model[1].register_forward_pre_hook(_interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    assert torch._C._len_torch_function_stack() == 1
    monitor.report()
    assert torch._C._len_torch_function_stack() == 0
    monitor.close()


def test_an_interrupt_inside_a_torch_nn_layer_leaves_no_mode_and_the_next_step_is_read() -> None:
    """The probe's mode is off the stack while a torch.nn leaf runs (it follows nothing in
    there): Ctrl-C inside one leaves no mode behind, and the next forward is read as usual,
    its functional activation too (which only the mode sees)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = trainlint.Monitor(model, optimizer=opt, every=1)
    handle = model.out.register_forward_pre_hook(_interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(torch.randn(2, 4))
    assert torch._C._len_torch_function_stack() == 0
    monitor.report()
    assert not monitor.probe.stale_modes  # none waits to be popped: it is off the stack
    with pytest.raises(KeyboardInterrupt):  # again, and this time straight on to training
        model(torch.randn(2, 4))
    handle.remove()
    _train_with_no_mode_left(model, opt, monitor)
    layers = {(lt.module, lt.op): lt for lt in monitor.report().trace.layers}
    assert set(layers) == {("fc", "output"), ("", "tanh"), ("out", "output")}
    # Read in both steps (and in the interrupted forwards, which got past it, into the step).
    assert layers[("", "tanh")].activation.count == 2 * 2 * 4 + 2 * 8 * 4
    monitor.close()
    assert torch._C._len_torch_function_stack() == 0


class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


def test_a_mode_a_hook_enters_inside_a_layer_and_leaves_after_it_is_popped_in_order() -> None:
    """The user's hooks enter a mode before a torch.nn layer runs (while the probe's mode is
    off the stack) and leave it after the layer's parent: the probe's mode must not go back
    above it, or the user's exit would pop the probe's mode and leave the user's on."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = trainlint.Monitor(model, optimizer=opt, every=1)
    users = _Passthrough()

    def enter(*_: object) -> None:
        users.__enter__()

    def leave(*_: object) -> None:
        users.__exit__(None, None, None)

    model[0][0].register_forward_pre_hook(enter)
    model[0].register_forward_hook(leave)
    _train_with_no_mode_left(model, opt, monitor)
    assert not monitor.probe.stale_modes
    layers = {lt.module for lt in monitor.report().trace.layers}
    assert layers == {"0.0", "1"}
    monitor.close()
    assert torch._C._len_torch_function_stack() == 0


def test_a_loop_that_goes_on_after_run_failed_stays_on_the_every_grid() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    failed_at = []
    with trainlint.Monitor(model, optimizer=opt, every=2, fail_on="error") as monitor:
        for step in range(9):
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean()
            if step >= 4:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
            try:
                monitor.step(loss)
            except trainlint.RunFailed:  # (exported at the top, as check and Monitor are)
                failed_at.append(step)
    assert failed_at == [4, 6, 8]


class Attends(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.att(x, x, x)[0].mean(1))


def test_attention_with_dropout_left_in_eval_while_the_model_trains() -> None:
    torch.manual_seed(0)
    model = Attends()
    model.att.eval()  # its dropout is off for the whole run
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, opt, every=1) as monitor:
        for _ in range(3):
            x, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        found = [f for f in monitor.report().findings if f.code == "TL602"]
    assert [f.module for f in found] == ["att"]


class WithUnused(nn.Module):
    """A classifier with a layer its forward never calls (TL505)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.unused = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("accumulate", [1, 4])
def test_gradients_zeroed_right_after_the_step_are_still_read(accumulate: int) -> None:
    """``opt.step(); opt.zero_grad(); monitor.step(loss)`` (the usual order under gradient
    accumulation): the step's gradients are read before the optimizer applies them, so the
    gradient and update rules see what a loop that zeroes first shows them."""
    def run(zero_after: bool) -> trainlint.Report:
        torch.manual_seed(0)
        model = WithUnused()
        opt = torch.optim.SGD(model.parameters(), lr=1e-5)  # far too small: TL503
        g = torch.Generator().manual_seed(1)
        with trainlint.Monitor(model, opt, every=1) as monitor:
            for _ in range(8):
                if not zero_after:
                    opt.zero_grad()
                for _ in range(accumulate):
                    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
                    loss = F.cross_entropy(model(x), y)
                    (loss / accumulate).backward()
                opt.step()
                if zero_after:
                    opt.zero_grad()
                monitor.step(loss)
            return monitor.report()

    first, after = run(zero_after=False), run(zero_after=True)
    assert {"TL503", "TL505"} <= {f.code for f in first.findings}
    assert {f.code for f in after.findings} == {f.code for f in first.findings}
    norms = [s["grad_norm"] for s in after.trace.per_step]
    assert norms == pytest.approx([s["grad_norm"] for s in first.trace.per_step])


def accumulating_loop(monitor: trainlint.Monitor, model: nn.Module, opt: torch.optim.Optimizer,
                      micro_batches: int, accumulate: int, batch: int = 4) -> list:
    """``monitor.step(loss)`` once per micro-batch; the optimizer steps every ``accumulate``."""
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(micro_batches):
        x, y = torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
        monitor.step(loss)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("every", [4, 8, 6])
def test_step_per_micro_batch_observes_on_to_the_optimizer_step(every: int) -> None:
    """``step()`` per micro-batch of gradient accumulation, ``every`` a multiple of the window
    (the default 100 with 4 micro-batches): an observed micro-batch saw no optimizer step, and
    TL503 was never measured. The observation runs on to the micro-batch that steps it."""
    accumulate, micro_batches = 4, 24
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # far too small: TL503
    with trainlint.Monitor(model, opt, every=every) as monitor:
        losses = accumulating_loop(monitor, model, opt, micro_batches, accumulate)
        report = monitor.report()
    trace = report.trace
    starts = list(range(0, micro_batches, every))
    ends = [s + (accumulate - 1 - s % accumulate) for s in starts]
    assert [s["step"] for s in trace.per_step] == ends
    assert trace.losses == pytest.approx([losses[i] for i in ends], rel=1e-6)
    # The activations of every micro-batch from the due one to the one that stepped.
    relu = trace.layer_by_key()[("1", "output")]
    assert relu.activation.count == sum(e - s + 1 for s, e in zip(starts, ends)) * 4 * 16
    assert all(p.update_ratios for p in trace.params)
    assert "TL503" not in report.skipped
    assert "TL503" in {f.code for f in report.findings}


@pytest.mark.parametrize("every", [1, 8])
def test_an_observation_run_on_from_step_zero_is_the_runs_first_step(every: int) -> None:
    """``step()`` per micro-batch from the start: the first observation begins at step 0 and
    ends at the micro-batch that steps (3), all at the initial weights. It was read as a run
    joined later, and a head at 30x its init (its first losses far above ln(3),
    measured below) went without TL302."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[2].weight.mul_(30.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with trainlint.Monitor(model, opt, every=every) as monitor:
        losses = accumulating_loop(monitor, model, opt, 24, accumulate=4, batch=16)
        report = monitor.report()
    assert sum(losses[:4]) / 4 > 2 * math.log(3)  # four micro-batches at the initial weights
    [found] = [f for f in report.findings if f.code == "TL302"]
    assert found.module == "2"
    first = report.trace.per_step[0]
    assert (first["step"], first["started"]) == (3, 0) and report.trace.at_start(first)


def test_an_observation_runs_on_at_most_max_accumulation_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop that never steps the watched optimizer: the first observation ends after
    MAX_ACCUMULATION steps without one, and the later ones are one step each again."""
    from trainlint import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "MAX_ACCUMULATION", 3)
    model, opt = make()
    with trainlint.Monitor(model, opt, every=2) as monitor:
        accumulating_loop(monitor, model, opt, 12, accumulate=100)
        report = monitor.report()
    assert [s["step"] for s in report.trace.per_step] == [3, 4, 6, 8, 10]
    assert "TL503" in report.skipped


def test_a_loss_gone_nan_after_the_last_observed_step_is_reported() -> None:
    """every=10, the loss turns NaN at step 13 and the report comes at step 15, before the
    next observation: the window since step 10 is read at the report (and left for it)."""
    model, opt = make()
    g = torch.Generator().manual_seed(1)
    with trainlint.Monitor(model, opt, every=10) as monitor:
        for step in range(16):
            x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss * math.nan if step >= 13 else loss)
        report = monitor.report()
        assert [s["step"] for s in report.trace.per_step] == [0, 10]
        [nan] = [f for f in report.findings if f.code == "TL604"]
        assert nan.evidence["step"] == 15
        again = monitor.report().trace.loss_tail  # read, not taken: the window stays
        assert again["step"] == 15 and math.isnan(again["loss_mean"])


class SparseBag(nn.Module):
    """A sparse embedding (SparseAdam's) and a dense head (Adam's)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16, sparse=True)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("head_lr, slow", [(1e-3, False), (1e-10, True)])
def test_several_optimizers_that_each_step_part_of_the_model(head_lr: float, slow: bool) -> None:
    torch.manual_seed(0)
    model = SparseBag()
    sparse = torch.optim.SparseAdam(model.embed.parameters(), lr=1e-2)
    dense = torch.optim.Adam(model.head.parameters(), lr=head_lr)
    g = torch.Generator().manual_seed(0)
    with trainlint.Monitor(model, optimizer=[sparse, dense], every=1) as monitor:
        for _ in range(6):
            ids, y = torch.randint(0, 50, (32, 5), generator=g), torch.randint(0, 3, (32,),
                                                                                generator=g)
            loss = F.cross_entropy(model(ids), y)
            sparse.zero_grad()
            dense.zero_grad()
            loss.backward()
            sparse.step()
            dense.step()
            monitor.step(loss)
        report = monitor.report()
    codes = {f.code for f in report.findings}
    assert "TL506" not in codes, "every parameter is in one of the optimizers"
    params = {p.name: p for p in report.trace.params}
    assert all(p.in_optimizer and p.update_ratios for p in params.values())
    assert params["embed.weight"].group == 0 and params["head.0.weight"].group == 1
    assert params["head.0.weight"].lr == head_lr
    tl503 = [f for f in report.findings if f.code == "TL503"]
    assert bool(tl503) is slow
    with pytest.raises(trainlint.ConfigError, match="or a list of them, got str"):
        trainlint.Monitor(model, optimizer=[sparse, "adam"])


def test_lbfgs_steps_are_solves_not_learning_rate_updates() -> None:
    """LBFGS runs a line-searched solve per step (its closure several times): TL503 says it
    does not judge it, and check, which writes no closure, says what to do instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.LBFGS(model.parameters(), lr=1, line_search_fn="strong_wolfe")
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(4):
            loss = opt.step(closure)
            monitor.step(loss)
        report = monitor.report()
    assert report.trace.closure_optimizer == "LBFGS"
    assert "TL503" not in {f.code for f in report.findings}
    assert "LBFGS" in report.skipped["TL503"]
    assert trainlint.optimizers.needs_closure(opt) and not trainlint.optimizers.needs_closure(
        torch.optim.SGD(model.parameters(), lr=0.1))
    for optimizer in (opt, lambda params: torch.optim.LBFGS(params)):
        with pytest.raises(trainlint.TargetError, match=r"LBFGS.step\(\) needs a closure"):
            trainlint.check(model, (x, y), optimizer=optimizer)


@pytest.mark.parametrize("as_keyword", [False, True])
def test_a_step_given_a_closure_reads_the_gradients_the_closure_made(as_keyword) -> None:
    """Lightning calls optimizer.step(closure): the forward and backward run inside step(), so
    the gradients are read when the closure returns, not in the step's pre-hook (which held the
    previous batch's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
               for _ in range(4)]
    made = []

    def closure_for(x, y):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            made.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
            return loss
        return closure

    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for x, y in batches:
            closure = closure_for(x, y)
            loss = opt.step(closure=closure) if as_keyword else opt.step(closure)
            monitor.step(loss)
        report = monitor.report()
    read = [s["param_grad_norms"] for s in report.trace.per_step]
    assert len(read) == len(made) == 4
    for step_read, step_made in zip(read, made):
        assert step_read == pytest.approx(step_made, rel=1e-5)


def test_a_gans_two_monitors_know_they_are_adversaries() -> None:
    """The generator's loss runs through the discriminator, which its own Monitor watches: both
    runs are marked adversarial (TL603/TL604 judge no loss level there); a Monitor alone is
    not."""
    torch.manual_seed(0)
    gen, disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6)), nn.Sequential(
        nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    mon_g = trainlint.Monitor(gen, optimizer=opt_g, every=1)
    mon_d = trainlint.Monitor(disc, optimizer=opt_d, every=1)
    lone_model, lone_opt = make()
    lone = trainlint.Monitor(lone_model, optimizer=lone_opt, every=1)
    train(lone_model, lone_opt, lone, 2)
    for _ in range(3):
        real, fake = torch.randn(16, 6), gen(torch.randn(16, 4))
        opt_d.zero_grad()
        loss_d = bce(disc(real), torch.ones(16, 1)) + bce(disc(fake.detach()), torch.zeros(16, 1))
        loss_d.backward()
        opt_d.step()
        mon_d.step(loss_d)
        opt_g.zero_grad()
        loss_g = bce(disc(fake), torch.ones(16, 1))
        loss_g.backward()
        opt_g.step()
        mon_g.step(loss_g)
    for monitor in (mon_g, mon_d, lone):
        monitor.close()
    assert mon_g.report().trace.foreign_params == 4  # the discriminator's weights and biases
    assert mon_g.report().trace.adversarial and mon_d.report().trace.adversarial
    assert not lone.report().trace.adversarial


def test_two_monitors_on_the_halves_of_one_model_cooperate() -> None:
    """A backbone and a head, each with its optimizer and its Monitor, trained on one loss:
    each loss runs through the other's model both ways, which is no GAN; the other half's
    parameters are not outside the run (TL603/TL604 judge the loss)."""
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3)
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1)
    opt_h = torch.optim.SGD(head.parameters(), lr=0.1)
    mon_b = trainlint.Monitor(backbone, optimizer=opt_b, every=1)
    mon_h = trainlint.Monitor(head, optimizer=opt_h, every=1)
    for _ in range(3):
        loss = F.cross_entropy(head(backbone(torch.randn(16, 8))), torch.randint(0, 3, (16,)))
        opt_b.zero_grad()
        opt_h.zero_grad()
        loss.backward()
        opt_b.step()
        opt_h.step()
        mon_b.step(loss)
        mon_h.step(loss)
    mon_b.close()
    mon_h.close()
    for monitor in (mon_b, mon_h):
        trace = monitor.report().trace
        assert (trace.adversarial, trace.foreign_params) == (False, 0)


def test_a_loop_that_calls_the_models_children_labels_each_step_alike() -> None:
    """A Monitor on Sequential(backbone, head) while the loop calls head(backbone(x)): the
    model's own forward, which starts each forward's call counts, never runs; each observed
    step's calls must still be the same points, not a ReLU's 'output#1', 'output#2'..."""
    torch.manual_seed(0)
    backbone, head = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3)
    full = nn.Sequential(backbone, head)
    opt = torch.optim.SGD(full.parameters(), lr=0.01)
    with trainlint.Monitor(full, optimizer=opt, every=1) as monitor:
        for _ in range(3):
            loss = F.cross_entropy(head(backbone(torch.randn(16, 8))), torch.randint(0, 3, (16,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        labels = sorted(lt.label for lt in monitor.report().trace.layers)
    assert labels == ["0.0", "0.1", "1"]


def test_a_long_run_keeps_each_distinct_norm_call_once() -> None:
    """Every observed step repeats the BatchNorm calls: the record keeps each distinct call (its
    input shape, train mode) once, so it does not grow with the run, and the smallest batch
    still counts."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for step in range(12):
            batch = 4 if step == 5 else 16  # one short last batch of an epoch
            x, y = torch.randn(batch, 3, 8, 8), torch.randint(0, 2, (batch,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            monitor.step()
        facts = monitor.report().trace.modules["1"]
    assert sorted(facts.batch_sizes) == [4, 16]
    assert facts.input_shapes == [(16, 8, 8, 8), (4, 8, 8, 8)]
    assert facts.values_per_channel == [16 * 64, 4 * 64]


class Wrapper(nn.Module):
    """A LightningModule-like holder: the training step may call ``holder.net`` directly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("bypass", [True, False])
def test_a_training_step_that_bypasses_the_models_forward_is_noted(bypass: bool) -> None:
    """Layers ran but the observed model's own forward never did: its inputs and the loss's
    link to its output were not read, and the note says which submodule to observe."""
    torch.manual_seed(0)
    holder = Wrapper()
    opt = torch.optim.SGD(holder.parameters(), lr=0.1)
    x, y = torch.randn(32, 4) * 50 + 100, torch.randint(0, 3, (32,))  # unnormalized inputs
    with trainlint.Monitor(holder, optimizer=opt, every=2) as monitor:
        for _ in range(6):
            loss = F.cross_entropy(holder.net(x) if bypass else holder(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    noted = [n for n in report.notes if n.startswith("the model's own forward did not run")]
    assert bool(noted) == bypass
    if bypass:
        assert "('net')" in noted[0] and "TrainlintCallback(module='net')" in noted[0]
    assert ("TL201" in {f.code for f in report.findings}) != bypass
    # The loss was cross-entropy all along: the rules that need its kind say why they lack it.
    unknown = [n for n in report.notes if "TL302" in n and "not checked" in n]
    assert bool(unknown) == bypass
    if bypass:
        assert "the model's own forward did not run" in unknown[0]
        assert "no torch loss seen" not in unknown[0]


@pytest.mark.parametrize("per_batch_decay", [True, False])
def test_a_learning_rate_that_decays_to_zero_partway_is_reported(per_batch_decay: bool) -> None:
    """StepLR(step_size=1, gamma=0.9) stepped every batch takes the rate to ~0 within 100
    steps; cosine annealing over the run reaches 0 only at its end."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 300
    schedule = (torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9) if per_batch_decay
                else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps))
    with trainlint.Monitor(model, optimizer=opt, every=10) as monitor:
        for _ in range(steps):
            y = torch.randint(0, 4, (32,), generator=g)
            loss = F.cross_entropy(model(centres[y] + torch.randn(32, 8, generator=g)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            monitor.step(loss)
        found = [f for f in monitor.report().findings if f.code == "TL503"]
    assert [f.evidence["direction"] for f in found] == (["stalled"] if per_batch_decay else [])


class TwoTasks(nn.Module):
    """A shared trunk with one head per task; ``spare`` is built and never used."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(32, 2), nn.Linear(32, 1)
        self.spare = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        h = self.trunk(x)
        return self.head_a(h) if task == "a" else self.head_b(h)


@pytest.mark.parametrize("every", [1, 10])
def test_round_robin_tasks_observed_on_one_tasks_steps_only_are_not_unused(every: int) -> None:
    """Task a trains at even steps, task b at odd ones: with every=10 no observed step gives
    head_b a gradient, yet it trains; the spare head never does and is reported either way."""
    torch.manual_seed(0)
    model = TwoTasks()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with trainlint.Monitor(model, opt, every=every) as monitor:
        for i in range(60):
            x = torch.randn(32, 16)
            if i % 2 == 0:
                loss = F.cross_entropy(model(x, "a"), (x[:, 0] > 0).long())
            else:
                loss = F.mse_loss(model(x, "b"), x[:, 1:2])
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
    unused = [f.module for f in monitor.report().findings if f.code == "TL505"]
    assert unused == ["spare"]


@pytest.mark.parametrize("lr, stuck", [(2e-4, True), (0.05, False)])
def test_a_learning_rate_too_low_to_leave_chance_is_reported(lr: float, stuck: bool) -> None:
    """Plain SGD at lr 2e-4 moves an MLP's weights ~1e-5 of their norm a step (inside TL503's
    band): over 400 steps the loss stays at ln(10). At lr 0.05 it learns."""
    torch.manual_seed(0)
    teacher = torch.randn(32, 10)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with trainlint.Monitor(model, opt, every=10) as monitor:
        for _ in range(400):
            x = torch.randn(32, 32)
            loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
    found = [f for f in monitor.report().findings if f.code in ("TL603", "TL503")]
    if not stuck:
        assert found == []
        return
    [tl603] = found
    assert tl603.code == "TL603" and "ln(10) = 2.303" in tl603.message
    band = RULES["TL603"].defaults
    assert band["stuck_floor"] <= tl603.evidence["update_rate"] < band["stuck_rate"]
