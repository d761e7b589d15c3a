"""An input's channels are the dim its first layer reads as channels, also when forward permutes
it first (NHWC images for a Conv2d, (N, L, C) sequences for a Conv1d)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import trainlint


class ChannelsLast(nn.Module):
    """Takes (N, H, W, C) images and permutes them for its Conv2d."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.permute(0, 3, 1, 2)))
        return self.head(h.mean((2, 3)))


def _check(images: torch.Tensor) -> trainlint.Report:
    torch.manual_seed(0)
    model = ChannelsLast(images.shape[-1])
    return trainlint.check(model, (images, torch.randint(0, 3, (len(images),))), steps=1)


def test_nhwc_pixels_are_measured_per_colour_channel() -> None:
    torch.manual_seed(0)
    images = torch.rand(16, 12, 12, 3) * torch.tensor([255.0, 128.0, 64.0])
    report = _check(images)
    [inp] = report.trace.inputs
    assert inp.shape[inp.channel_dim] == 3
    assert list(inp.mean) == pytest.approx(images.double().mean((0, 1, 2)).tolist())
    assert "TL201" in {f.code for f in report.findings}


def test_a_constant_alpha_channel_last_is_a_constant_channel() -> None:
    torch.manual_seed(0)
    images = torch.cat([torch.randn(16, 12, 12, 3), torch.ones(16, 12, 12, 1)], dim=-1)
    found = [f for f in _check(images).findings if f.code == "TL202"]
    assert found and found[0].evidence["constant"] == [3]


class Signals(nn.Module):
    """Takes (N, L, C) sequences and transposes them for its Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.transpose(1, 2))).mean(2))


def test_sequences_transposed_for_a_conv1d_have_their_channels_last() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 20, 4) + torch.tensor([0.0, 0.0, 0.0, 50.0])
    report = trainlint.check(Signals(), (x, torch.randint(0, 3, (16,))), steps=1)
    [inp] = report.trace.inputs
    assert inp.channel_dim in (-1, 2)
    assert list(inp.mean) == pytest.approx(x.double().mean((0, 1)).tolist())


class Standardizes(nn.Module):
    """Standardizes its raw features itself before the first layer: out of place, in place on
    a copy, or (``how=None``) not at all."""

    def __init__(self, how) -> None:
        super().__init__()
        self.how = how
        self.f, self.head = nn.Linear(12, 32), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "out of place":
            x = (x - x.mean(0)) / (x.std(0) + 1e-5)
        elif self.how == "in place":
            x = x.clone()
            x.sub_(x.mean(0)).div_(x.std(0) + 1e-5)
        return self.head(torch.relu(self.f(x)))


@pytest.mark.parametrize("how,unnormalized", [("out of place", False), ("in place", False),
                                              (None, True)])
def test_raw_features_standardized_in_forward_are_not_unnormalized(how, unnormalized) -> None:
    """In place or not, the first layer sees standardized values: no TL201; fed as they are,
    the same raw features get it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = 100 * torch.randn(64, 12, generator=g) + 50, torch.randint(0, 3, (64,), generator=g)
    report = trainlint.check(Standardizes(how), (x, y), steps=2)
    assert any(f.code == "TL201" for f in report.findings) == unnormalized


class FlatMLP(nn.Module):
    """An MLP on 28x28 one-channel images: flattened in forward, or by nn.Flatten."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.flatten = nn.Flatten() if how == "module" else None
        self.fc, self.head = nn.Linear(784, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x) if self.flatten is not None else x.view(len(x), -1)
        return self.head(torch.relu(self.fc(x)))


def _digits(layout: str, raw: bool) -> torch.Tensor:
    """MNIST-like images: black 4-pixel borders, sparse strokes in the middle; raw 0..255 or
    standardized over the batch (the borders become one constant value)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(32, 1, 28, 28)
    middle = torch.rand(32, 1, 20, 20, generator=g)
    x[:, :, 4:24, 4:24] = middle * (middle > 0.7)
    x = x * 255 if raw else (x - x.mean()) / x.std()
    return x.permute(0, 2, 3, 1) if layout == "NHWC" else x


@pytest.mark.parametrize("how", ["view", "module"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_images_an_mlp_takes_flattened_are_measured_per_channel(how, layout) -> None:
    """Flattened into a Linear, every pixel is a feature: the image's one channel is measured,
    not its 28 columns (whose black borders would read as constant or not normalized)."""
    torch.manual_seed(0)
    codes = {}
    for raw in (False, True):
        x = _digits(layout, raw)
        report = trainlint.check(FlatMLP(how), (x, torch.randint(0, 10, (32,))), steps=1)
        [inp] = report.trace.inputs
        assert inp.shape[inp.channel_dim] == 1
        assert list(inp.mean) == pytest.approx([x.double().mean().item()])
        codes[raw] = {f.code for f in report.findings}
    assert not codes[False] & {"TL201", "TL202"}
    assert "TL201" in codes[True]


class WordLM(nn.Module):
    """PyTorch's word-language-model example: ``model(data, hidden)``, the LSTM's state carried
    over from the last batch (zeros from ``init_hidden`` at the first)."""

    def __init__(self, tokens: int = 50, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Embedding(tokens, width)
        self.rnn = nn.LSTM(width, width, 2)
        self.decoder = nn.Linear(width, tokens)

    def forward(self, x: torch.Tensor, hidden: tuple) -> tuple:
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


@pytest.mark.parametrize("scale", [0.0, 0.005, 50.0])
def test_an_rnn_state_passed_into_the_model_is_not_an_input_to_normalize(scale: float) -> None:
    """Zeros (TL202's constant features), a carried state of tiny features or of huge ones
    (TL201's std bounds): none is data. The same tensor fed as the LSTM's data is."""
    torch.manual_seed(0)
    model = WordLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 50, (35, 20)), torch.randint(0, 50, (35, 20))
    hidden = tuple(scale * torch.randn(2, 20, 32) for _ in range(2))
    with trainlint.Monitor(model, optimizer=opt, every=1) as monitor:
        for _ in range(2):
            opt.zero_grad()
            out, _ = model(x, hidden)
            loss = nn.functional.cross_entropy(out.reshape(-1, 50), y.reshape(-1))
            loss.backward()
            opt.step()
            monitor.step(loss)
        report = monitor.report()
    assert not {f.code for f in report.findings} & {"TL201", "TL202"}, report
    assert [inp.name for inp in report.trace.inputs] == ["input1", "input2"]  # h and c, read

    class StateAsData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(32, 32)
            self.head = nn.Linear(32, 50)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(h)[0])

    if scale:
        data = (scale * torch.randn(35, 20, 32), torch.randint(0, 50, (35, 20)))
        report = trainlint.check(StateAsData(), data, loss_fn=lambda o, t: nn.functional
                                 .cross_entropy(o.reshape(-1, 50), t.reshape(-1)), steps=2)
        assert "TL201" in {f.code for f in report.findings}


class OnePrice(nn.Module):
    """Regresses from one number per sample, taken as a (B,) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.unsqueeze(1)).squeeze(1)


def _one_feature_report(x: torch.Tensor) -> trainlint.Report:
    torch.manual_seed(0)
    return trainlint.check(OnePrice(), (x, torch.randn(len(x))), steps=1)


def test_a_one_dim_input_is_one_feature_over_the_batch() -> None:
    torch.manual_seed(1)
    prices = 300.0 + 80.0 * torch.randn(64)
    report = _one_feature_report(prices)
    [inp] = report.trace.inputs
    assert len(inp.mean) == 1
    assert inp.mean[0] == pytest.approx(prices.double().mean().item())
    assert inp.std[0] == pytest.approx(prices.double().std(unbiased=False).item())
    found = [f for f in report.findings if f.code == "TL201"]
    assert found and found[0].evidence["channels"] == 1


@pytest.mark.parametrize("values", [
    lambda g: torch.randn(64, generator=g),                        # standardized
    lambda g: torch.rand(64, generator=g),                         # a time in [0, 1]
    lambda g: (torch.randn(64, generator=g) * 1.2 - 1.2).exp(),    # EDM's noise levels
    lambda g: torch.rand(64, generator=g) * 20 - 10,               # a log-SNR in [-10, 10]
])
def test_a_one_dim_input_of_sound_scale_passes(values) -> None:
    report = _one_feature_report(values(torch.Generator().manual_seed(2)))
    assert "TL201" not in {f.code for f in report.findings}


def test_a_one_dim_input_spread_far_beyond_unit_scale_is_reported() -> None:
    """A centred scalar of std 185 into Linear(1, 64): Adam ended at 0.20 raw against 0.003
    standardized (the review). Its spread is held to SCALAR_SPREAD x max_std."""
    from trainlint.rules.data import SCALAR_SPREAD

    from trainlint.engine import RULES

    widest = SCALAR_SPREAD * RULES["TL201"].defaults["max_std"]
    g = torch.Generator().manual_seed(3)
    wide = _one_feature_report(torch.randn(64, generator=g) * 185.0)
    found = [f for f in wide.findings if f.code == "TL201"]
    assert found and f"(threshold {widest:g})" in found[0].message
    within = _one_feature_report(torch.randn(64, generator=g) * widest * 0.5)
    assert "TL201" not in {f.code for f in within.findings}
