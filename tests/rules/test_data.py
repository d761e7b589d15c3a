"""TL201 input-not-normalized and TL202 constant-input-features on hand-built traces."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from trainlint.rules.data import BERNOULLI_SLACK

from tests.rules.tracekit import defaults, edge, hits, inputs, module, point, trace

INPUT = ("input", "input0")


def _fed_to(inp, consumer: str = "fc", type_: str = "Linear", via: tuple = ()):
    layer = point(consumer, type_)
    return trace([layer], inputs=[inp], edges=[edge(INPUT, ("module", consumer), via)])


def _tabular(mean, std, rows=64, **kw):
    return inputs("input0", (rows, len(mean)), mean, std, **kw)


@pytest.mark.parametrize("scale, fires", [(0.99, False), (1.01, True)])
def test_tl201_mean_threshold_edge(scale, fires):
    limit = defaults("TL201")["max_abs_mean"]
    t = _fed_to(_tabular([0.0, -scale * limit, 0.1], [1.0, 1.0, 1.0]))
    found = hits("TL201", t)
    assert bool(found) is fires
    if fires:
        assert found[0].module == ""
        assert found[0].evidence["not_normalized"] == 1


@pytest.mark.parametrize("spread, fires", [(0.99, True), (1.01, False)])
def test_tl201_an_offset_counts_where_it_reaches_the_spread(spread, fires):
    """A feature of mean 3 and std 3.2 (clustered synthetic data) trains the same
    standardized: its offset is within its spread."""
    mean = 1.5 * defaults("TL201")["max_abs_mean"]
    found = hits("TL201", _fed_to(_tabular([0.0, mean, 0.1], [1.0, spread * mean, 1.0])))
    assert bool(found) is fires


def _switched(scales: list, last_mean: float = 25.0, last_std: float = 10.0):
    """A Monitor run of a normalized first batch whose later observed steps (every 10th) had
    the ``scales`` given: (largest |mean| of a varying feature, largest std) per step; the
    last batch's moments ``last_mean`` +- ``last_std`` in each of its 3 features."""
    inp = _tabular([0.0, 0.1, -0.1], [1.0, 1.0, 1.0])
    inp.last_mean, inp.last_std = [last_mean] * 3, [last_std] * 3
    inp.last_step = 10 * (len(scales) - 1)
    t = _fed_to(inp)
    t.mode = "monitor"
    t.per_step = [{"step": 10 * i, "input_scale": {("input0", 1): scale}}
                  for i, scale in enumerate(scales)]
    return t


def test_tl201_inputs_whose_scale_changed_mid_run_from_a_step_on():
    """A normalization switched off at some epoch (an MLP's x * 8 + 20 from step 300: the
    loss went from 0.36 to 1e15 and stayed at chance): judged on the last batch, where every
    observed step from some step to the last was out of the band, two at least."""
    d = defaults("TL201")
    ok, off = (0.1, 1.0), (np.nextafter(d["max_abs_mean"], 3), 1.0)
    wide = (0.1, np.nextafter(d["max_std"], 6))
    [found] = hits("TL201", _switched([ok, ok, off, off]))
    assert "from step 20 on (at each of the 2 observed steps since; the first observed batch " \
        "was normalized), as of step 30" in found.message
    assert found.evidence["max_abs_mean"] == 25.0 and found.evidence["not_normalized"] == 3
    assert len(hits("TL201", _switched([ok, ok, wide, off]))) == 1
    assert hits("TL201", _switched([ok, ok, ok, off])) == []  # one observed step
    assert hits("TL201", _switched([ok, off, off, ok])) == []  # back in the band
    at_edge = (d["max_abs_mean"], d["max_std"])
    assert hits("TL201", _switched([ok, at_edge, at_edge, at_edge])) == []


@pytest.mark.parametrize("scale, fires", [(0.99, False), (1.01, True)])
def test_tl201_std_upper_edge(scale, fires):
    limit = defaults("TL201")["max_std"]
    assert bool(hits("TL201", _fed_to(_tabular([0.0, 0.0], [1.0, scale * limit])))) is fires


@pytest.mark.parametrize("scale, fires", [(1.01, False), (0.99, True)])
def test_tl201_std_lower_edge(scale, fires):
    limit = defaults("TL201")["min_std"]
    assert bool(hits("TL201", _fed_to(_tabular([0.0, 0.0], [1.0, scale * limit])))) is fires


@pytest.mark.parametrize("spread, fires", [(1.01, False), (0.99, True)])
def test_tl201_a_sparse_feature_is_not_held_to_min_std(spread, fires):
    """A bag-of-words/TF-IDF feature (minimum exactly 0, std above its mean: mostly zeros)
    has a small std because it is sparse; one whose std is below its mean is a dense feature
    of a small scale."""
    small = 0.5 * defaults("TL201")["min_std"]
    mean = small / spread
    sparse = _tabular([0.0, mean], [1.0, small], lo=[-3.0, 0.0], hi=[3.0, 40 * small])
    assert bool(hits("TL201", _fed_to(sparse))) is fires


def test_tl201_a_sparse_feature_needs_an_exact_zero_minimum():
    small = 0.5 * defaults("TL201")["min_std"]
    above_zero = _tabular([0.0, small / 2], [1.0, small], lo=[-3.0, 1e-9], hi=[3.0, 40 * small])
    assert hits("TL201", _fed_to(above_zero))


@pytest.mark.parametrize("shape, channel_dim, consumer",
                         [((64, 2, 8, 8), 1, "Conv2d"), ((64, 2, 500), 1, "Conv1d"),
                          ((64, 10, 2), -1, "Linear")])
@pytest.mark.parametrize("scale, fires", [(1.01, False), (0.99, True)])
def test_tl201_a_sparse_channel_of_images_or_sequences_needs_nonzero_values_of_min_std(
        shape, channel_dim, consumer, scale, fires):
    """The one-hot channel of a rare character (values 0 or x, x at least min_std) is sparse;
    the same channel at x below min_std (a mostly black image scaled by 1/255 twice) is an
    input of a tiny scale."""
    limit = defaults("TL201")["min_std"]
    p, x = 1e-5, scale * limit  # share of nonzero values, their value
    mean, std = p * x, x * (p * (1 - p)) ** 0.5
    assert std < limit
    grid = inputs("input0", shape, [0.0, mean], [1.0, std], channel_dim=channel_dim,
                  lo=[-3.0, 0.0], hi=[3.0, x])
    assert bool(hits("TL201", _fed_to(grid, "layer", consumer))) is fires


def test_tl201_counts_the_dense_narrow_features_beside_sparse_ones():
    small = 0.5 * defaults("TL201")["min_std"]
    mixed = _tabular([0.0, small / 2, small * 2, 0.0], [1.0, small, small, small],
                     lo=[-3.0, 0.0, 0.0, -3 * small], hi=[3.0, 1.0, 1.0, 3 * small])
    found = hits("TL201", _fed_to(mixed))
    assert [h.evidence["not_normalized"] for h in found] == [2]


def test_tl201_leaves_constant_features_to_tl202():
    assert hits("TL201", _fed_to(_tabular([0.0, 0.5], [1.0, 0.0]))) == []
    far = 2 * defaults("TL201")["max_abs_mean"]  # a constant 7: TL202's, even far from 0
    assert hits("TL201", _fed_to(_tabular([0.0, far], [1.0, 0.0]))) == []
    assert hits("TL201", _fed_to(_tabular([0.0, far], [1.0, 0.5])))


def test_tl201_needs_enough_values_per_channel():
    rows = defaults("TL201")["min_values"]
    raw = ([100.0], [50.0])
    assert hits("TL201", _fed_to(_tabular(*raw, rows=rows - 1))) == []
    assert hits("TL201", _fed_to(_tabular(*raw, rows=rows)))


def test_tl201_image_fix_prints_a_normalize_line_with_the_measured_values():
    raw = inputs("input0", (8, 3, 16, 16), [125.3, 123.0, 113.9], [63.0, 62.1, 66.7],
                 channel_dim=1)
    found = hits("TL201", _fed_to(raw, "conv", "Conv2d"))
    assert len(found) == 1
    assert "transforms.Normalize(mean=[125.3, 123, 113.9], std=[63, 62.1, 66.7])" in found[0].fix
    assert found[0].evidence["mean"] == pytest.approx([125.3, 123.0, 113.9])


@pytest.mark.parametrize("shape, channel_dim, consumer", [
    ((8, 3, 16, 16), 1, "Conv2d"), ((8, 3, 40), 1, "Conv1d"), ((8, 3, 4, 8, 8), 1, "Conv3d"),
    ((8, 16, 16, 3), -1, "Linear"),
])
def test_tl201_the_channel_fix_runs_on_the_inputs_layout(shape, channel_dim, consumer):
    """The suggested line, run as written on a batch of this layout, standardizes each
    channel (a (N, C, L) signal or a volume broadcasts over its own trailing dims)."""
    means, stds = [125.0, 60.0, 30.0], [60.0, 20.0, 10.0]
    found = hits("TL201", _fed_to(inputs("input0", shape, means, stds,
                                         channel_dim=channel_dim), "layer", consumer))
    line = re.search(r"x = \(x - mean[^)]*\) / std(\[[^\]]*\])?", found[0].fix).group(0)
    values = re.search(r"mean = torch.tensor\([^)]*\), std = torch.tensor\([^)]*\)",
                       found[0].fix).group(0)
    view = [1] * len(shape)
    view[channel_dim] = 3
    x = torch.randn(shape) * torch.tensor(stds).view(view) + torch.tensor(means).view(view)
    scope = {"torch": torch, "x": x}
    exec(values.replace(", std =", "; std =") + "\n" + line, scope)
    dims = [d for d in range(len(shape)) if d != channel_dim % len(shape)]
    assert scope["x"].mean(dims).abs().max() < 0.2
    assert (scope["x"].std(dims) - 1).abs().max() < 0.2
    assert ("transforms.Normalize" in found[0].fix) is (len(shape) == 4 and channel_dim == 1)


def test_tl201_many_features_get_one_overall_scale():
    mean = [50.0] * 40
    found = hits("TL201", _fed_to(_tabular(mean, [10.0] * 40)))
    assert "x = (x - 50) / 10" in found[0].fix


def test_tl201_a_large_mean_is_printed_precisely_enough_to_apply():
    """Timestamps at mean 1.7013061e9, std 3.6e4: applying the printed mean leaves the feature
    centred (within 1% of its std), which 4 significant digits would not (off by 8 std)."""
    mean, std = [0.0, 1.7013061e9], [1.0, 3.6e4]
    [found] = hits("TL201", _fed_to(_tabular(mean, std)))
    printed = float(re.search(r"mean = torch.tensor\(\[[^,]+, ([^\]]+)\]", found.fix).group(1))
    assert abs(printed - mean[1]) <= 0.01 * std[1]
    assert "1.701e+09" not in found.fix


def test_tl201_a_negative_overall_mean_is_added():
    found = hits("TL201", _fed_to(_tabular([-50.0] * 40, [10.0] * 40)))
    assert "x = (x + 50) / 10" in found[0].fix and "- -" not in found[0].fix


@pytest.mark.parametrize("low, counts", [(0.0, True), (-1.0, False)])
def test_tl201_counts_are_compressed_before_they_are_standardized(low, counts):
    """Bag-of-words counts: never negative, rare words mostly 0 (std above mean), frequent
    ones at means up to 17. log1p keeps the zeros at 0; shifting by the mean makes them
    dense. With negative values present they are no counts."""
    mean = [17.0, 6.0] + [0.1] * 38
    std = [3.6, 2.0] + [0.4] * 38
    inp = _tabular(mean, std, lo=[low] * 40, hi=[30.0] * 40)
    [found] = hits("TL201", _fed_to(inp))
    assert ("torch.log1p(x)" in found.fix) is counts
    assert "x = (x - mean) / std" in found.fix


@pytest.mark.parametrize("consumer, type_, via", [
    ("bn", "BatchNorm1d", ()),          # the model normalizes its input itself
    ("fc", "Linear", ("div",)),          # forward computes x / 255 first
    ("act", "ReLU", ()),                 # not a weight layer
])
def test_tl201_inputs_normalized_or_transformed_inside_the_model_are_skipped(consumer, type_,
                                                                               via):
    raw = _tabular([120.0, 130.0], [60.0, 60.0])
    assert hits("TL201", _fed_to(raw, consumer, type_, via)) == []


def test_tl201_looks_through_dropout_to_the_first_layer():
    raw = _tabular([120.0, 130.0], [60.0, 60.0])
    drop, fc = point("drop", "Dropout"), point("fc", "Linear")
    t = trace([drop, fc], inputs=[raw],
              edges=[edge(INPUT, ("module", "drop")), edge(drop.node, ("module", "fc"))])
    assert len(hits("TL201", t)) == 1


def _constant(lo, hi, shape=(64, 3), channel_dim=-1):
    mean = [(a + b) / 2 for a, b in zip(lo, hi)]
    return inputs("input0", shape, mean, [0.0 if a == b else 1.0 for a, b in zip(lo, hi)],
                  lo=lo, hi=hi, channel_dim=channel_dim)


def test_tl202_lists_constant_features_by_index():
    found = hits("TL202", _fed_to(_constant([-2.0, 0.5, -1.5, 3.7], [2.0, 0.5, 1.5, 3.7],
                                            shape=(64, 4))))
    assert len(found) == 1
    assert found[0].evidence["constant"] == [1, 3]
    assert found[0].evidence["values"] == [0.5, 3.7]


def test_tl202_constant_image_channel_fires():
    rgba = _constant([-2.0, -2.1, -1.9, 1.0], [2.0, 2.1, 1.9, 1.0], shape=(2, 4, 8, 8),
                     channel_dim=1)
    found = hits("TL202", _fed_to(rgba, "conv", "Conv2d"))
    assert found and found[0].evidence["constant"] == [3]
    assert "channels 3" in found[0].message


def test_tl202_features_stuck_at_the_input_floor_are_absent_categories():
    one_hot = _constant([0.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    assert hits("TL202", _fed_to(one_hot)) == []


def test_tl202_an_input_constant_all_over_has_no_floor_to_be_stuck_at():
    depth = _constant([0.5], [0.5], shape=(4, 1, 32, 32), channel_dim=1)  # a dead sensor
    found = hits("TL202", _fed_to(depth, "conv", "Conv2d"))
    assert found and found[0].evidence["constant"] == [0]
    solid = _constant([0.2, 0.0, 0.7], [0.2, 0.0, 0.7], shape=(4, 3, 8, 8), channel_dim=1)
    assert hits("TL202", _fed_to(solid, "conv", "Conv2d"))[0].evidence["constant"] == [0, 2]
    tabular = _constant([3.0, 3.0], [3.0, 3.0])
    assert hits("TL202", _fed_to(tabular))[0].evidence["constant"] == [0, 1]


def test_tl202_an_input_of_one_value_per_sample_is_not_checked():
    scalar = _constant([0.7], [0.7], shape=(64, 1))  # a conditioning scalar, the same for all
    assert hits("TL202", _fed_to(scalar)) == []
    assert hits("TL202", _fed_to(_constant([0.7, 0.7], [0.7, 0.7], shape=(64, 2))))


def test_tl202_an_all_zero_input_is_a_placeholder():
    blank = _constant([0.0, 0.0], [0.0, 0.0], shape=(4, 2, 8, 8), channel_dim=1)
    assert hits("TL202", _fed_to(blank, "conv", "Conv2d")) == []


def test_tl202_an_all_one_float_mask_with_nothing_masked_is_not_constant_data():
    """TimeSeriesTransformer's past_observed_mask, float ones where no value is missing (a
    required argument of its forward): 'drop features 0..15' could not be applied, and the
    run trained (loss 3.82 -> 2.25). Ones beside a feature that varies, or an image that is
    all 1, are still reported."""
    mask = _constant([1.0] * 31, [1.0] * 31, shape=(16, 31))
    assert hits("TL202", _fed_to(mask)) == []
    beside = _constant([1.0, 1.0, -2.0], [1.0, 1.0, 2.0])
    assert hits("TL202", _fed_to(beside))[0].evidence["constant"] == [0, 1]
    white = _constant([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], shape=(4, 3, 8, 8), channel_dim=1)
    assert hits("TL202", _fed_to(white, "conv", "Conv2d"))[0].evidence["constant"] == [0, 1, 2]


@pytest.mark.parametrize("spread, exempt", [
    (0.5, True), (0.5 * math.sqrt(1 + 0.99 * BERNOULLI_SLACK), True),
    (0.5 * math.sqrt(1 + 1.01 * BERNOULLI_SLACK), False), (1.0, False)])
def test_tl202_tabular_indicators_at_0_or_1_may_be_constant_in_a_batch(spread, exempt):
    """Beside a one-hot/multi-hot column (values 0 and 1 only: min 0, max 1, variance p(1-p)),
    a column stuck at 0 or 1 is an indicator a batch may never vary. Among continuous
    features (a column that varies between 0 and 1 with another spread is no indicator), a
    column a StandardScaler left at 0 is a constant: reported."""
    lo, hi = [-2.0, 1.0, 0.0, -1.0, 0.0], [2.0, 1.0, 0.0, 1.0, 1.0]
    tabular = _constant(lo, hi, shape=(64, 5))
    tabular.std[4] = spread  # the 0..1 column, mean 0.5: a 0/1 column's std is 0.5
    found = hits("TL202", _fed_to(tabular))
    assert (found == []) is exempt
    if not exempt:
        assert found[0].evidence["constant"] == [1, 2]
    image = _constant([-2.0, 1.0, -1.5], [2.0, 1.0, 1.5], shape=(4, 3, 8, 8), channel_dim=1)
    assert hits("TL202", _fed_to(image, "conv", "Conv2d"))[0].evidence["constant"] == [1]


def test_tl202_needs_enough_values_per_feature():
    rows = defaults("TL202")["min_values"]
    lo, hi = [-1.0, 5.0], [1.0, 5.0]
    assert hits("TL202", _fed_to(_constant(lo, hi, shape=(rows - 1, 2)))) == []
    assert hits("TL202", _fed_to(_constant(lo, hi, shape=(rows, 2))))


def test_tl202_skips_inputs_the_model_does_not_feed_to_a_layer_as_they_are():
    mask = _constant([-1.0, 5.0], [1.0, 5.0])
    assert hits("TL202", _fed_to(mask, via=("mul",))) == []
    assert hits("TL202", trace([], inputs=[mask], modules=[module("fc", "Linear")])) == []


def _rare_at_edge(factor: float, rows: int = 64, features: int = 8) -> tuple:
    """A standardized input of ``features`` columns, one of them a rare category's (-0.2 when
    absent, 4.9 when set); the last constant at the value ``v`` below 0 whose chance
    (1 + v**2) ** -rows is ``factor`` x RARE_CHANCE / features (one more such column, its
    category absent from the batch)."""
    from trainlint.rules.data import RARE_CHANCE

    floor = RARE_CHANCE / features
    v = -math.sqrt(math.expm1(-math.log(floor * factor) / rows))
    lo = [-0.2] + [-2.0] * (features - 2) + [v]
    hi = [4.9] + [2.0] * (features - 2) + [v]
    return _constant(lo, hi, shape=(rows, features)), v


@pytest.mark.parametrize("factor, exempt", [(1.01, True), (0.99, False)])
def test_tl202_a_standardized_rare_category_may_hold_its_usual_value(factor, exempt):
    """StandardScaler on one-hot columns or rarely inked pixels: a column set in a share p of
    the data holds -p/std (|v| <= sqrt(p / (1 - p))) when absent, and every sample read holds
    it with a chance of at most (1 + v**2) ** -n: excused while that is at least RARE_CHANCE
    over the features (measured: 8 of 64 digits pixels, inked in 0.1-4% of the data, read as
    constant on 40 of 40 seeds; dropping them did not help)."""
    rare, v = _rare_at_edge(factor)
    found = hits("TL202", _fed_to(rare))
    assert (found == []) is exempt
    if not exempt:
        assert found[0].evidence["values"] == [v]


def test_tl202_a_stuck_value_among_continuous_features_is_still_reported():
    """A sensor stuck at 0.2 or -0.28 std among continuous features (no column of a rare
    value beside it: measured, accuracy 0.665 against 0.979), one stuck above 0 beside rare
    columns, and a column at exactly 0 (StandardScaler on a constant) are constants."""
    rare, v = _rare_at_edge(10.0)
    continuous = _constant([-2.0] * 7 + [v], [2.0] * 7 + [v])
    assert hits("TL202", _fed_to(continuous))[0].evidence["constant"] == [7]
    rare.min[-1] = rare.max[-1] = -v  # above 0: no category's absent value
    assert hits("TL202", _fed_to(rare))[0].evidence["constant"] == [7]
    lo, hi = [-0.2, -2.0, 0.0], [4.9, 2.0, 0.0]
    assert hits("TL202", _fed_to(_constant(lo, hi)))[0].evidence["constant"] == [2]
    raw, _ = _rare_at_edge(10.0)
    raw.std[:-1] = 40.0  # the other columns in raw units: not standardized
    assert hits("TL202", _fed_to(raw))


def test_tl202_a_monitor_counts_the_values_of_every_batch_its_range_spans():
    """A column held at -0.28 std (a median imputed before scaling, beside lognormal sensors
    that look like rare values' columns) over one batch of 64 may be a rare category; over the
    eight batches a Monitor read it is not (measured: accuracy 0.49 against 0.72)."""
    rare, _ = _rare_at_edge(10.0, rows=64, features=16)
    rare.min[-1] = rare.max[-1] = -0.28
    assert hits("TL202", _fed_to(rare)) == []
    rare.range_values = np.full(16, 64.0 + 7 * 8)  # a Monitor: the first batch, then 8 rows
    assert hits("TL202", _fed_to(rare))[0].evidence["constant"] == [15]


def _grid_signal(mean, std, width: int, type_: str = "Linear", attr: str = "in_features",
                 via: tuple = ("stack",)):
    """A (32, 64) input whose consumer takes ``width`` values at a time (an FNO's function
    on a 64-point grid, stacked with its coordinates into Linear(2, w))."""
    inp = inputs("input0", (32, 64), mean, std)
    layer = point("lift", type_)
    return trace([layer], modules=[module("lift", type_, **{attr: width})], inputs=[inp],
                 edges=[edge(INPUT, ("module", "lift"), via)])


@pytest.mark.parametrize("width, type_, attr, via, fires", [
    (2, "Linear", "in_features", ("stack",), False),  # positions of one signal: pooled
    (1, "Conv1d", "in_channels", ("unsqueeze",), False),
    (63, "Linear", "in_features", ("stack",), False),
    (64, "Linear", "in_features", ("stack",), True),  # 64 features
    (16, "Linear", "in_features", ("__getitem__",), True),  # 16 numeric columns sliced out
    (2, "Linear", "in_features", ("unsqueeze", "__getitem__"), True),
    (2, "Linear", "in_features", (), True),  # no new axis: features
])
def test_a_signals_positions_are_one_feature(width, type_, attr, via, fires):
    """A grid whose boundary is held at 0: two positions of std 2.7e-7 and 0 among others of
    std 0.7 (measured on an FNO that trained the same standardized per position or not). A
    tabular input whose 16 numeric columns are sliced into Linear(16) (the other 48 are codes
    for an embedding) stays 64 features: standardized per column it reached accuracy 0.642,
    with one pooled mean and std 0.549 (measured)."""
    std = [2.7e-7, 0.0] + [0.7] * 62
    t = _grid_signal([0.0] * 64, std, width, type_, attr, via)
    assert bool(hits("TL201", t)) is fires
    assert bool(hits("TL202", t)) is fires


@pytest.mark.parametrize("centre, fires", [(0.99, False), (1.01, True)])
def test_a_signals_positions_are_judged_pooled(centre, fires):
    """Positions of one raw signal offset past ``max_abs_mean`` (and its spread) all along."""
    offset = centre * max(defaults("TL201")["max_abs_mean"], 0.7)
    found = hits("TL201", _grid_signal([offset] * 64, [0.7] * 64, 2))
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["channels"] == 1
