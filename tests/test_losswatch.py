"""The loss family, reduction and output a loss function reads, seen while it runs: a user's
``def loss_fn`` around ``F.cross_entropy`` is cross-entropy to TL302 and TL601 as
``nn.CrossEntropyLoss`` is, and the rules read the output the loss read."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.losswatch import output_index, watched


class Wrapped(nn.Module):
    """A project's loss module around nn.CrossEntropyLoss."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(reduction=reduction)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce(out, target)


def test_a_wrapped_cross_entropy_is_seen_with_its_classes_and_input() -> None:
    features, logits = torch.randn(4, 8), torch.randn(4, 7, 5)
    targets = torch.randint(0, 5, (4, 7))

    def lm_loss(out: dict, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out["logits"].reshape(-1, 5), t.reshape(-1))

    loss, call = watched(lm_loss, {"features": features, "logits": logits}, targets)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, 5),
                                                        targets.reshape(-1)).item())
    assert (call.kind, call.reduction, call.num_classes) == ("cross_entropy", "mean", 5)
    assert output_index(call, [features, logits]) == 1
    _, call = watched(Wrapped("sum"), torch.randn(4, 3), torch.randint(0, 3, (4,)))
    assert (call.kind, call.reduction) == ("cross_entropy", "sum")
    _, call = watched(lambda o, t: (o - t).abs().mean(), torch.randn(4), torch.randn(4))
    assert call is None


def _classifier(softmax: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers, *([nn.Softmax(dim=1)] if softmax else []))


@pytest.mark.parametrize("loss_fn", [lambda o, t: F.cross_entropy(o, t), Wrapped()],
                         ids=["function", "module"])
@pytest.mark.parametrize("softmax", [True, False])
def test_tl601_sees_cross_entropy_inside_a_users_loss(loss_fn, softmax: bool) -> None:
    batch = (torch.randn(16, 6), torch.randint(0, 4, (16,)))
    report = trainlint.check(_classifier(softmax), batch, loss_fn=loss_fn, steps=1)
    assert report.trace.loss_kind == "cross_entropy"
    found = [f.module for f in report.findings if f.code == "TL601"]
    assert found == (["3"] if softmax else [])


class DictHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.head = nn.Linear(16, 4)
        self.act = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> dict:
        h = torch.relu(self.body(x))
        return {"features": h, "logits": self.act(self.head(h))}


def test_tl601_reads_the_output_the_loss_read() -> None:
    torch.manual_seed(0)
    batch = (torch.randn(16, 6), torch.randint(0, 4, (16,)))
    report = trainlint.check(DictHead(), batch, steps=1)  # the default loss reads "logits"
    assert [f.module for f in report.findings if f.code == "TL601"] == ["act"]


@pytest.mark.parametrize("reduction, fires", [("mean", True), ("sum", False)])
def test_tl302_judges_only_a_mean_loss(reduction: str, fires: bool) -> None:
    model = _classifier(False)
    nn.init.normal_(model[2].weight, std=3.0)  # confident random predictions
    batch = (torch.randn(16, 6), torch.randint(0, 4, (16,)))
    report = trainlint.check(model, batch, loss_fn=Wrapped(reduction), steps=1)
    assert any(f.code == "TL302" for f in report.findings) is fires
    assert ("TL302" in report.skipped) is not fires


class AuxHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)
        self.main, self.aux = nn.Linear(16, 10), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> tuple:
        h = torch.relu(self.body(x))
        return self.main(h), self.aux(h)


def test_tl302_leaves_a_loss_of_several_terms_alone() -> None:
    """CE(main) + CE(aux) at init is ~2 ln(C): two uninformed classifiers, not a confident one."""
    torch.manual_seed(0)
    batch = (torch.randn(32, 6), torch.randint(0, 10, (32,)))

    def deep_supervision(out: tuple, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out[0], t) + F.cross_entropy(out[1], t)

    report = trainlint.check(AuxHeads(), batch, loss_fn=deep_supervision, steps=1)
    assert report.trace.loss_terms == 2
    assert "TL302" not in {f.code for f in report.findings} and "TL302" in report.skipped
