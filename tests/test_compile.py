"""Monitor on a torch.compile'd model: observed steps run eagerly under the hooks, the others
run the compiled graph.

The tests compile with a counting backend (Dynamo's graph capture, then the captured FX graph
run as is, like ``backend="eager"``): hooks are a Dynamo matter, and Inductor's C++ build
takes about a minute on a CPU runner.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint

STEPS = 4
EVERY = 2


class Counting:
    """A compile backend that counts compilations and runs of the compiled graph."""

    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        self.compiles += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4))


def train(model: nn.Module, watched: nn.Module, steps: int = STEPS) -> trainlint.Report:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    with trainlint.Monitor(watched, opt, every=EVERY) as monitor:
        for _ in range(steps):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        return monitor.report()


def summary(report: trainlint.Report) -> dict:
    return {(lt.module, lt.op): (lt.activation.mean, lt.activation.std, lt.activation.max,
                                 lt.grad_norm) for lt in report.trace.layers}


@pytest.fixture
def eager() -> dict:
    """The statistics of the same training run without torch.compile."""
    model = net()
    return summary(train(model, model))


def assert_same(report: trainlint.Report, reference: dict) -> None:
    got = {(module.replace("._orig_mod", ""), op): values
           for (module, op), values in summary(report).items()}
    assert got.keys() == reference.keys() and len(got) == 5
    for key, values in reference.items():
        assert got[key][:3] == pytest.approx(values[:3], rel=1e-5), key
        assert (got[key][3] is None) is (values[3] is None), key  # an activation's: not read
        if values[3] is not None:
            assert got[key][3] == pytest.approx(values[3], rel=1e-5), key


def test_compiled_model_is_observed_eagerly(eager):
    backend = Counting()
    model = net()
    compiled = torch.compile(model, backend=backend)
    report = train(compiled, compiled)
    assert report.trace.observed_steps == STEPS // EVERY
    assert_same(report, eager)
    assert backend.compiles == 1  # observing never forced a recompilation
    assert backend.runs == STEPS - STEPS // EVERY  # the other steps ran compiled
    assert any("torch.compile" in note for note in report.notes)
    runs = backend.runs
    compiled(torch.randn(2, 8))
    assert backend.runs == runs + 1  # closing the monitor restored compiled execution


def test_compiled_before_the_monitor_was_attached(eager):
    backend = Counting()
    model = net()
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(16, 8))  # compiled before any hook existed
    assert_same(train(compiled, compiled), eager)


def test_monitor_on_the_original_module_of_a_compiled_one(eager):
    model = net()
    compiled = torch.compile(model, backend=Counting())
    assert_same(train(compiled, model), eager)


def test_compiled_submodule(eager):
    model = net()
    model[2] = torch.compile(model[2], backend=Counting())
    report = train(model, model)
    assert report.trace.observed_steps == STEPS // EVERY
    assert_same(report, eager)


def test_check_runs_a_compiled_submodule_eagerly() -> None:
    """trainlint.check with one block compiled: before, dynamo traced the probe's hooks and
    the failure was blamed on the user's forward."""
    def batch() -> tuple:
        g = torch.Generator().manual_seed(1)
        return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)

    reference = summary(trainlint.check(net(), batch(), loss_fn=nn.MSELoss()))
    model = net()
    backend = Counting()
    model[2] = torch.compile(model[2], backend=backend)
    report = trainlint.check(model, batch(), loss_fn=nn.MSELoss())
    assert_same(report, reference)
    assert any("ran eagerly" in note for note in report.notes)
    assert backend.runs == 0  # every step of the check ran eagerly
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
