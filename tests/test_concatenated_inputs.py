"""Model inputs that reach a layer concatenated with other tensors (a tabular model's numeric
columns beside its categorical embeddings) are data the layer takes as it is: TL201/TL202 read
them, whichever operand of the concatenation they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint

MEAN = torch.tensor([38.6, 40.4, 1079.0])
STD = torch.tensor([13.6, 12.3, 7452.0])


class Tabular(nn.Module):
    """Embeddings of a categorical column and numeric columns into one MLP; ``order`` says
    where the numeric columns go and how they are joined."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.embed = nn.Embedding(12, 8)
        self.mlp = nn.Sequential(nn.Linear(8 + 3, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, category: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        e = self.embed(category)
        if self.order == "after":
            joined = torch.cat([e, numbers], dim=1)
        elif self.order == "first":
            joined = torch.cat((numbers, e), -1)
        elif self.order == "hstack":
            joined = torch.hstack([e, numbers])
        elif self.order == "stacked":  # (N, 11, 1) stacked, then flattened
            joined = torch.cat([e.unsqueeze(-1), numbers.unsqueeze(-1)], 1).flatten(1)
        else:  # "scaled": the model standardizes them itself before the join
            joined = torch.cat([e, (numbers - MEAN) / STD], dim=1)
        return self.mlp(joined)


def batch(n: int = 64, standardize: bool = False, constant: bool = False) -> tuple:
    g = torch.Generator().manual_seed(0)
    numbers = MEAN + STD * torch.randn(n, 3, generator=g)
    if standardize:
        numbers = (numbers - MEAN) / STD
    if constant:
        numbers[:, 1] = -0.0325  # a column imputed with one value
    return (torch.randint(0, 12, (n,), generator=g), numbers), torch.randint(0, 2, (n,),
                                                                              generator=g)


def codes(report: trainlint.Report) -> set:
    return {f.code for f in report.findings if f.severity != "info"}


@pytest.mark.parametrize("order", ["after", "first", "hstack", "stacked"])
def test_raw_numeric_columns_joined_to_embeddings_are_unnormalized(order: str) -> None:
    report = trainlint.check(Tabular(order), batch(), steps=1)
    hit = next(f for f in report.findings if f.code == "TL201")
    assert hit.evidence["input"] == "input1"
    assert hit.evidence["max_abs_mean"] == pytest.approx(float(batch()[0][1].mean(0).abs().max()),
                                                         rel=1e-6)
    assert "'mlp.0'" in hit.message


def test_standardized_columns_joined_to_embeddings_are_clean() -> None:
    assert codes(trainlint.check(Tabular("after"), batch(standardize=True), steps=2)) == set()


def test_columns_the_model_standardizes_before_the_join_are_not_judged() -> None:
    report = trainlint.check(Tabular("scaled"), batch(), steps=2)
    assert "TL201" not in codes(report)


def test_a_constant_column_joined_to_embeddings_is_a_constant_feature() -> None:
    report = trainlint.check(Tabular("after"), batch(standardize=True, constant=True), steps=1)
    hit = next(f for f in report.findings if f.code == "TL202")
    assert hit.evidence["constant"] == [1]
    assert hit.evidence["values"] == [pytest.approx(-0.0325)]


def test_the_join_is_an_edge_from_the_input_to_the_layer() -> None:
    report = trainlint.check(Tabular("stacked"), batch(standardize=True), steps=1)
    edges = {(e.src, e.dst, e.via) for e in report.trace.edges}
    assert (("input", "input1"), ("module", "mlp.0"), ("unsqueeze", "cat", "flatten")) in edges


class ImageAndMeta(nn.Module):
    """Pooled conv features and a raw metadata vector, concatenated into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())
        self.head = nn.Linear(8 + 3, 5)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.cnn(image), meta], 1))


def test_a_raw_input_joined_into_the_head_is_what_tl302s_fix_names() -> None:
    """The first loss is thousands of nats above ln(5) because the head takes the raw
    metadata (RMS ~ the mean of 45, 60000 and 170): the fix points at that input, not at the
    head's init (PyTorch's default)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    meta = torch.randn(32, 3, generator=g) * torch.tensor([15.0, 2e4, 10.0]) + \
        torch.tensor([45.0, 6e4, 170.0])
    batch = (torch.randn(32, 3, 16, 16, generator=g), meta), torch.randint(0, 5, (32,),
                                                                           generator=g)
    report = trainlint.check(ImageAndMeta(), batch, steps=1)
    found = next(f for f in report.findings if f.code == "TL302")
    rms = float(meta.double().pow(2).mean(0).mean().sqrt())
    assert f"the model's input 'input1' has RMS {rms:.3g}" in found.fix
    assert "scale down the last layer's init" not in found.fix
