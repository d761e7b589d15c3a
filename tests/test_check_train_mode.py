"""`trainlint check` trains in train mode, but leaves a submodule frozen on purpose in eval."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batch() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 4, (2,), generator=gen)


def _note(seen: dict, name: str, module: nn.Module) -> None:
    seen.setdefault(name, module.training)


def _modes_seen(model: nn.Module) -> dict:
    """Each BatchNorm's mode during the check's forwards, read by a hook of the test's own."""
    seen: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, a, o, name=name: _note(seen, name, mod))
    return seen


def test_batchnorm_frozen_on_purpose_stays_in_eval_and_is_not_linted_as_training() -> None:
    torch.manual_seed(0)
    model = _net()
    frozen = model[1]
    frozen.eval()
    frozen.requires_grad_(False)
    seen = _modes_seen(model)
    report = trainlint.check(model, _batch(), steps=2)
    assert seen == {"1": False, "4": True}
    small = {f.module for f in report.findings if f.code == "TL401"}
    assert small == {"4"}  # the trained BatchNorm at batch 2 is still reported
    assert [m.training for m in model] == [True, False] + [True] * 7  # the user's flags
    # A loop that calls model.train() every epoch would switch it back on: the report says so.
    [note] = [n for n in report.notes if "frozen submodules" in n]
    assert "'1'" in note and "after each model.train()" in note


def test_batchnorm_in_eval_but_trainable_is_put_in_train_mode() -> None:
    torch.manual_seed(0)
    model = _net()
    model[1].eval()  # parameters still trainable: not frozen on purpose
    seen = _modes_seen(model)
    report = trainlint.check(model, _batch(), steps=2)
    assert seen == {"1": True, "4": True}
    assert {f.module for f in report.findings if f.code == "TL401"} == {"1", "4"}
    assert not model[1].training
    assert not [n for n in report.notes if "frozen submodules" in n]


def test_frozen_submodule_keeps_each_of_its_members_modes() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    model = nn.Sequential(inner, nn.Linear(4, 4))
    inner.eval()
    inner[1].train()  # a mixed subtree: each member keeps its own flag
    inner.requires_grad_(False)
    seen: dict = {}
    inner[1].register_forward_hook(lambda m, a, o: _note(seen, "dropout", m))
    inner[0].register_forward_hook(lambda m, a, o: _note(seen, "linear", m))
    trainlint.check(model, (torch.randn(4, 8), torch.randint(0, 4, (4,))), steps=1)
    assert seen == {"dropout": True, "linear": False}


def _codes(model: nn.Module) -> dict:
    report = trainlint.check(model, _batch())
    return {f.code: f for f in report.findings}


def test_a_model_given_in_eval_mode_is_reported() -> None:
    """build_model() returning model.eval(): the check trained it in train mode and said only
    'TL602 not checked'; a loop that never calls model.train() trains it as at inference."""
    torch.manual_seed(0)
    model = _net().eval()
    found = _codes(model).get("TL602")
    assert found is not None and found.severity == "warning" and found.module == ""
    assert "given in eval mode" in found.message and "model.train()" in found.fix
    assert not model.training  # left as it was given
    assert "TL602" not in _codes(_net())  # given in train mode


def test_a_model_in_eval_that_its_library_trains_is_not_reported() -> None:
    """transformers' from_pretrained returns its model in eval mode; its Trainer (and
    Lightning's) calls model.train() itself."""
    class PreTrainedModel(nn.Module):  # stands in for transformers' base class by its name
        pass

    class Tiny(PreTrainedModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    torch.manual_seed(0)
    assert "TL602" not in _codes(Tiny().eval())


def test_a_model_in_eval_with_nothing_that_depends_on_the_mode_is_not_reported() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    assert "TL602" not in _codes(plain)


class _EvalInForward(nn.Module):
    """Calls self.bn.eval() in its own forward: every training step after the first
    normalizes with the running statistics at their init."""

    def __init__(self, freeze: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64, bias=False)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, 5)
        self.freeze = freeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            self.bn.eval()
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("freeze", [True, False])
def test_a_forward_that_puts_a_batchnorm_in_eval_is_reported(freeze: bool) -> None:
    """A check trains in train mode, so it said 'TL602 not checked'; the modes the user's own
    code sets after that are read at each training forward, as in a Monitor run."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    report = trainlint.check(_EvalInForward(freeze), (x, x[:, :5].argmax(1)))
    found = [f for f in report.findings if f.code == "TL602"]
    assert bool(found) is freeze
    if freeze:
        assert found[0].module == "bn" and found[0].severity == "error"


class _Teacher(nn.Module):
    """A student and its EMA teacher, run in eval under no_grad in the forward; the teacher's
    parameters still require grad (PyTorch's DQN target net is written so)."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                     nn.Dropout(0.1), nn.Linear(64, 5))
        self.teacher = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                     nn.Dropout(0.1), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(x)
        return self.student(x) + 0.0 * target


def test_an_ema_teacher_put_in_eval_by_the_forward_is_not_reported() -> None:
    """It trained (loss 1.56 -> 0.002, both at 100% accuracy): TL602 said error in a check
    and in a Monitor run."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    report = trainlint.check(_Teacher(), (x, x[:, :5].argmax(1)))
    assert "TL602" not in {f.code for f in report.findings}


@pytest.mark.parametrize("layer, counts", [
    (lambda: nn.Dropout(0.0), False),
    (lambda: nn.BatchNorm1d(16, track_running_stats=False), False),
    (lambda: nn.Dropout(0.1), True),
])
def test_layers_that_behave_alike_in_both_modes_do_not_count(layer, counts: bool) -> None:
    """nanoGPT at dropout=0.0, given after .eval(): bit-identical losses in either mode, yet
    'its 3 BatchNorm/Dropout layer(s) behave as at inference'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), layer(), nn.ReLU(), nn.Linear(16, 3)).eval()
    report = trainlint.check(model, (torch.randn(16, 8), torch.randint(0, 3, (16,))))
    assert ("TL602" in {f.code for f in report.findings}) is counts
