"""The data fed to the model: input scale and centring, and features that never vary."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterator, Optional

import numpy as np

from trainlint.engine import Hit, Thresholds, rule
from trainlint.trace import InputTrace, ModuleFacts, RunTrace

from ._graph import NORM_TYPES, WEIGHT_LAYERS, downstream, only_shape_ops

# Per-channel values printed in a fix or in evidence; beyond that, one summary value.
MAX_LISTED = 16


def direct_consumers(trace: RunTrace, inp: InputTrace) -> list[ModuleFacts]:
    """Leaf modules that take this input as it is (through reshapes, dropout and
    concatenations with other tensors only)."""
    found = []
    for dst, via in downstream(trace, ("input", inp.name)):
        if dst[0] != "module" or not only_shape_ops(via, joins=True):
            continue
        facts = trace.modules.get(dst[1])
        if facts is not None and facts.is_leaf and facts not in found:
            found.append(facts)
    return found


# Constructor facts that give how many values a weight layer takes at a time.
INPUT_WIDTHS = ("in_features", "in_channels", "input_size")
# Ops that give an input's values a new axis, and ops that cut some of them out.
NEW_AXIS_OPS = ("stack", "unsqueeze")
SLICING_OPS = ("__getitem__", "chunk", "split", "narrow")


def as_positions(trace: RunTrace, inp: InputTrace) -> Optional[InputTrace]:
    """A (B, L) input given a new axis on its way to each weight layer that takes it (stacked
    or unsqueezed, no value sliced out) whose layers take fewer than L values at a time
    between them (an FNO's function on a grid, stacked with the coordinates into
    ``Linear(2, w)``; a raw signal unsqueezed into ``Conv1d(1, ...)``): its L values per
    sample are positions of one signal, not L features. Returns it as one feature over all
    its values (its mean, std and range pooled), else None."""
    if len(inp.shape) != 2:
        return None
    widths = []
    for dst, via in downstream(trace, ("input", inp.name)):
        facts = trace.modules.get(dst[1]) if dst[0] == "module" else None
        if facts is None or not facts.is_leaf or facts.base not in WEIGHT_LAYERS or \
                not only_shape_ops(via, joins=True):
            continue
        # A new axis for the values (stacked with coordinates, unsqueezed into channels),
        # none of them cut out: a slice of columns into a Linear is a few of many features.
        if not any(op in NEW_AXIS_OPS for op in via) or any(op in SLICING_OPS for op in via):
            return None
        widths.append(next((facts.attrs[k] for k in INPUT_WIDTHS
                            if isinstance(facts.attrs.get(k), int)), None))
    if not widths or None in widths or sum(widths) >= inp.shape[-1]:
        return None
    mean, std = np.asarray(inp.mean, float), np.asarray(inp.std, float)
    centre = float(mean.mean())
    spread = math.sqrt(max(float(np.mean(std ** 2 + (mean - centre) ** 2)), 0.0))
    low, high = float(np.min(inp.min)), float(np.max(inp.max))
    return replace(inp, mean=np.array([centre]), std=np.array([spread]), min=np.array([low]),
                   max=np.array([high]), last_mean=None, last_std=None,
                   range_values=None if inp.range_values is None
                   else np.array([np.sum(inp.range_values)]))


def values_per_channel(inp: InputTrace) -> int:
    """How many values each channel's statistics are computed over (a (B,) input: one
    feature, B values)."""
    if len(inp.shape) == 1:
        return inp.shape[0]
    return math.prod(inp.shape) // max(inp.shape[inp.channel_dim], 1)


def is_image(inp: InputTrace) -> bool:
    """An image (or volume) batch, channels first (N, C, H, W) or last (N, H, W, C), or a
    channel-first signal (N, C, L)."""
    return len(inp.shape) >= 4 or (len(inp.shape) == 3 and inp.channel_dim == 1)


def _precise(x: float, spread: float) -> str:
    """``x`` with enough significant digits that its rounding stays within 1% of ``spread``
    (a timestamp's mean of 1.7013e9 over a std of 3.6e4 needs 8)."""
    digits = 4
    if spread > 0 and abs(x) > spread:
        digits = min(17, max(4, math.ceil(math.log10(abs(x) / spread)) + 3))
    return f"{x:.{digits}g}"


def _values(xs: np.ndarray, spreads: Optional[np.ndarray] = None) -> str:
    spreads = np.zeros(len(xs)) if spreads is None else spreads
    return "[" + ", ".join(_precise(float(x), float(s)) for x, s in zip(xs, spreads)) + "]"


def _minus(value: str) -> str:
    """``- value`` written as a subtraction or an addition."""
    return f"+ {value[1:]}" if value.startswith("-") else f"- {value}"


def normalize_fix(inp: InputTrace, counts: bool = False) -> str:
    """A ready line that normalizes this input with the measured statistics (``counts``:
    non-negative, some features mostly zeros, as counts are: log1p first)."""
    first = ("the values look like counts (never negative, some features mostly 0): "
             "compress them first with torch.log1p(x) (or TF-IDF, or dividing each row by its "
             "total), which keeps the zeros at 0; then " if counts else "")
    return first + _standardize(inp)


def _standardize(inp: InputTrace) -> str:
    mean, std = np.asarray(inp.mean, float), np.asarray(inp.std, float)
    safe = np.where(std > 0, std, 1.0)
    where = "on the training set (these values come from one batch)"
    if len(mean) <= MAX_LISTED and is_image(inp):
        # The statistics broadcast over the dims after the channel's (none when it is last).
        after = len(inp.shape) - 1 - inp.channel_dim % len(inp.shape)
        index = "[:" + ", None" * after + "]" if after else ""
        values = (f"mean = torch.tensor({_values(mean, safe)}), "
                  f"std = torch.tensor({_values(safe)})")
        torchvision = (f"transforms.Normalize(mean={_values(mean, safe)}, std={_values(safe)}) "
                       f"(torchvision, on (C, H, W) images), or "
                       if len(inp.shape) == 4 and inp.channel_dim == 1 else "")
        return (f"normalize each channel: {torchvision}x = (x - mean{index}) / std{index} "
                f"with {values} in get_batch/the data pipeline; compute the statistics "
                f"{where}")
    if len(mean) <= MAX_LISTED:
        return (f"standardize each feature: x = (x - mean) / std with "
                f"mean = torch.tensor({_values(mean, safe)}), std = torch.tensor("
                f"{_values(safe)}) (or sklearn's StandardScaler); compute the statistics "
                f"{where}")
    overall_mean = float(mean.mean())
    overall_std = float(math.sqrt(max(np.mean(std ** 2 + (mean - overall_mean) ** 2), 0.0)))
    centre = _precise(overall_mean, overall_std)
    what = "channel" if is_image(inp) else "feature"
    return (f"standardize the input per {what} (dim {inp.channel_dim % len(inp.shape)}; "
            f"sklearn's StandardScaler, or x = (x - mean) / std with per-{what} statistics "
            f"computed {where}); overall it has mean {centre} and std {overall_std:.4g}, so "
            f"at least x = (x {_minus(centre)}) / {overall_std:.4g}")


def _describe(inp: InputTrace) -> str:
    what = "channel" if is_image(inp) else "feature"
    count = len(inp.mean)
    return f"input {inp.name!r} {tuple(inp.shape)} ({count} {what}{'s' if count != 1 else ''})"


def _sparse_features(inp: InputTrace, mean: np.ndarray, std: np.ndarray,
                     min_std: float) -> np.ndarray:
    """Per feature or channel: whether it is mostly exact zeros and otherwise positive (its
    minimum is 0 and its std exceeds its mean), as a bag-of-words column is. A channel of
    images or sequences also needs nonzero values of at least ``min_std`` (their typical size
    E[x^2]/E[x], x for a 0-or-x channel): the one-hot channel of a rare character, not a
    mostly black image scaled by 1/255 twice."""
    sparse = (np.asarray(inp.min, float) == 0) & (std > mean)
    if len(inp.shape) == 2:
        return sparse
    with np.errstate(invalid="ignore", divide="ignore"):
        nonzero = (mean * mean + std * std) / mean
    return sparse & (mean > 0) & (nonzero >= min_std)


@rule("TL201", "input-not-normalized", "warning", max_abs_mean=2.0, max_std=5.0, min_std=0.01,
      min_values=16)
def input_not_normalized(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Model inputs far from zero mean and unit scale.

    ## What it does
    For every floating-point input, and every uint8/int8/int16 one (raw pixel bytes cast with
    ``.float()`` in ``forward``, PCM audio), that reaches a weight layer (Linear, Conv, RNN) as
    it is (reshaped, or concatenated with other tensors: a tabular model's numeric columns
    beside its embeddings), it measures each channel's (images: dim 1) or feature's (last dim)
    mean and std over the batch. It fires when a channel's |mean| exceeds ``max_abs_mean`` and
    its std (an offset at least as large as the spread: a feature of mean 2.3 and std 3.2, as
    clustered synthetic data has, trains the same standardized), or its std exceeds
    ``max_std`` or is below ``min_std`` (constant features are TL202's), over
    at least ``min_values`` values per channel (an input of one number per sample, (B,), is
    one feature over the batch, its std held to ``SCALAR_SPREAD`` (10) x ``max_std`` and not
    to ``min_std``: a conditioning scalar such as a diffusion model's log-SNR, uniform in
    [-10, 10], trained the same raw and standardized; raw prices of mean 300, or a centred
    scalar of std 185, did not). A (B, L) input whose consumers take fewer than L values at a
    time between them (``in_features``, ``in_channels``, ``input_size``: an FNO's function on
    a 64-point grid stacked with its coordinates into ``Linear(2, w)``, a signal unsqueezed
    into ``Conv1d(1, ...)``) is one feature over its positions, its statistics pooled (an FNO
    with its grid's boundary at 0 was told 1 of 64 features had std 2.7e-7; standardized per
    position it trained no better, 0.0055 against 0.0043). Token ids (int64), inputs the
    model transforms before its first layer (``x / 255`` in ``forward``), inputs that go into a
    normalization layer first, and a recurrent state the model takes as an argument and hands
    to an RNN as its ``hx`` (``model(data, hidden)``, the state carried over from the last
    batch) are not checked. Images scaled to [0, 1] pass; images that an
    MLP takes flattened are measured per channel (dim 1 of NCHW), not per column. A sparse
    feature or channel (its minimum exactly 0 and its std above its mean, as a 0-or-x
    feature's is when fewer than half its values are x: bag-of-words, TF-IDF, multi-hot; for
    images and sequences also its nonzero values of at least ``min_std``: the one-hot
    channel of a rare character) is not held to ``min_std``: its std is small because it is
    mostly zeros, and standardizing it would make it dense.

    The first observed batch is read whole; a Monitor reads about 8 samples, spread over the
    batch, of each later one. Where the first was inside the band and every observed step
    from some step to the last had a feature whose |mean| or std is beyond it (two at least:
    a normalization switched off at some epoch), it fires on the last batch read, from that
    step, its fix with that batch's statistics. A step's |mean| and std are taken less three
    standard errors of their estimate from the values read (``SCALE_SIGMAS``): one rare
    standardized value of 18 (a one-hot column of a 0.3% category) in 8 samples reads a
    mean of 2.3 and a std of 6.4, the whole batch's 0.2 and 2.3.

    ## Why is this bad?
    The first layer's init assumes inputs of unit scale around zero: raw values (0..255
    pixels, ages, prices) make its outputs huge or offset, saturate the next nonlinearity,
    and make the loss surface badly conditioned (features on very different scales need very
    different learning rates). Raw pixels into a network are a classic mistake.

    ## Example
    ``get_batch`` returning ``torch.randint(0, 256, (32, 3, 32, 32)).float()``.

    ## Fix
    Subtract the per-channel mean and divide by the per-channel std, computed on the training
    set only and applied to validation and test data too: ``transforms.Normalize(mean, std)``
    for images, ``StandardScaler`` for tabular features. The finding prints the measured values
    (a mean far larger than its std, a timestamp's, with the digits it needs to apply). Counts
    (never negative, some features mostly 0: bag-of-words) are compressed first:
    ``torch.log1p(x)``, TF-IDF or dividing each row by its total keep the zeros at 0.
    """
    for inp in trace.inputs:
        consumers = direct_consumers(trace, inp)
        if not any(f.base in WEIGHT_LAYERS for f in consumers):
            continue
        if any(f.base in NORM_TYPES for f in consumers) or values_per_channel(inp) < t.min_values:
            continue
        inp = as_positions(trace, inp) or inp
        # One number per sample (B,), a conditioning scalar (a diffusion model's log-SNR in
        # [-10, 10], std 5.8, trained the same standardized): its spread is judged against
        # SCALAR_SPREAD x max_std (a centred scalar of std 185 did not train raw).
        scalar = len(inp.shape) == 1
        mean, std = np.asarray(inp.mean, float), np.asarray(inp.std, float)
        off = _off_centre(mean, std, t)
        widest = t.max_std * (SCALAR_SPREAD if scalar else 1.0)
        wide = std > widest
        narrow = (std > 0) & (std < t.min_std) & ~_sparse_features(
            inp, mean, std, t.min_std) & (not scalar)
        bad = off | wide | narrow
        since = ""
        if not bad.any():
            changed = _changed_later(trace, inp, t)
            if changed is None:
                continue
            start, steps = changed
            mean, std = np.asarray(inp.last_mean, float), np.asarray(inp.last_std, float)
            off = _off_centre(mean, std, t)
            wide = std > widest
            narrow = np.zeros_like(off)
            bad = off | wide
            if not bad.any():
                continue
            since = (f" from step {start} on (at each of the {steps} observed steps since; "
                     f"the first observed batch was normalized), as of step {inp.last_step}")
        worst_mean = float(np.abs(mean).max())
        reasons = []
        if off.any():
            reasons.append(f"|mean| up to {worst_mean:.4g} (threshold {t.max_abs_mean:g})")
        if wide.any():
            reasons.append(f"std up to {float(std.max()):.4g} (threshold {widest:g})")
        if narrow.any():
            reasons.append(f"std down to {float(std[std > 0].min()):.4g} "
                           f"(threshold {t.min_std:g})")
        count = int(bad.sum())
        yield Hit(
            module="",
            message=(f"{_describe(inp)} is not normalized{since}: {count} of {len(mean)} have "
                     f"{'; '.join(reasons)}; it goes straight into "
                     f"{', '.join(repr(f.name) for f in consumers[:3])}"),
            fix=normalize_fix(replace(inp, mean=mean, std=std),  # (the batch judged)
                              counts=bool(np.all(np.asarray(inp.min, float) >= 0))
                              and bool(_sparse_features(inp, mean, std, t.min_std).any())),
            evidence={"input": inp.name, "channels": len(mean), "not_normalized": count,
                      "mean": [float(x) for x in mean[:MAX_LISTED]],
                      "std": [float(x) for x in std[:MAX_LISTED]],
                      "max_abs_mean": worst_mean, "max_std": float(std.max()),
                      "thresholds": t.as_dict()},
        )


# A (B,) input, one conditioning number per sample, may spread this many times ``max_std``
# (uniform in [-40, 40], std 23, trained the same raw; a centred std of 185 did not).
SCALAR_SPREAD = 10.0


def _off_centre(mean: np.ndarray, std: np.ndarray, t: Thresholds) -> np.ndarray:
    """Channels whose |mean| is above ``max_abs_mean`` and above their std (a constant one,
    std 0, is TL202's)."""
    return (np.abs(mean) > t.max_abs_mean) & (np.abs(mean) > std) & (std > 0)


def _changed_later(trace: RunTrace, inp: InputTrace, t: Thresholds) -> Optional[tuple]:
    """(the first observed step, how many observed steps) of the run's last stretch in
    which ``inp`` had a channel with |mean| above ``max_abs_mean`` (varying) or std above
    ``max_std`` at every observed step, up to the last one, where that stretch holds at least
    two observed steps after a first batch inside the band; None otherwise."""
    key = (inp.name, inp.channel_dim)
    scales = [(s["step"], s["input_scale"][key]) for s in trace.per_step
              if key in s.get("input_scale", {})]
    stretch = []
    for step, (mean, std) in reversed(scales):
        if not (mean > t.max_abs_mean or std > t.max_std):
            break
        stretch.append(step)
    if len(stretch) < 2 or len(stretch) == len(scales) or inp.last_mean is None:
        return None
    return stretch[-1], len(stretch)


# How far (relative) a 0/1 column's variance may sit from p(1 - p): a sample's n/(n - 1).
BERNOULLI_SLACK = 0.1


def _has_indicators(inp: InputTrace) -> bool:
    """Whether some feature of ``inp`` varies between 0 and 1 and nothing else (a one-hot or
    multi-hot column: min 0, max 1, and the variance of 0/1 values, p(1 - p) for a mean p,
    within 10% for a sample's n/(n - 1)): beside such columns, one stuck at 0 or 1 is an
    indicator a batch may never vary; among continuous features it is a constant."""
    mean, std = np.asarray(inp.mean, float), np.asarray(inp.std, float)
    lo, hi = np.asarray(inp.min, float), np.asarray(inp.max, float)
    bernoulli = mean * (1 - mean)
    binary = (lo == 0) & (hi == 1) & (np.abs(std ** 2 - bernoulli) <= BERNOULLI_SLACK * bernoulli)
    return bool(binary.any())


# Below this chance (over all the input's features) a standardized feature's usual value
# held by every sample read is no rare category's luck (TL202).
RARE_CHANCE = 0.01
# A rare value's standardized column reaches this when the value is set (a category in 10%
# of the rows: sqrt(0.9 / 0.1) = 3): what a column of continuous values seldom does.
RARE_VALUE = 3.0


def _rare_standardized(inp: InputTrace, values: int) -> Optional[Callable[[float], bool]]:
    """For an input whose varying features are standardized (median |mean| <= 0.5, median
    std within [0.5, 2]) and hold columns of rare values, standardized (a one-hot category
    or a pixel that is seldom set: its usual value a little below 0, above -1, and the rare
    one ``RARE_VALUE`` or more), whether a feature constant at ``v`` over ``values`` samples
    may be one more such column. Its usual value is ``-p / std``, below 0; a column set in a
    share p of the data has v**2 <= p / (1 - p), so every sample read holds its usual value
    with a chance of at most (1 + v**2) ** -values: kept while that is at least
    ``RARE_CHANCE`` over the number of features. None where the input is not standardized or
    holds no such column (continuous features: a sensor stuck at 0.2 std is a constant). A
    column at 0 or above (a constant one, standardized, is at exactly 0) is never excused."""
    lo, hi = np.asarray(inp.min, float), np.asarray(inp.max, float)
    varying = lo < hi
    if not varying.any():
        return None
    mean, std = np.asarray(inp.mean, float)[varying], np.asarray(inp.std, float)[varying]
    if not (np.median(np.abs(mean)) <= 0.5 and 0.5 <= np.median(std) <= 2.0):
        return None
    if not ((lo[varying] > -1.0) & (lo[varying] < 0.0) & (hi[varying] >= RARE_VALUE)).any():
        return None
    floor = RARE_CHANCE / len(lo)
    return lambda v: -1.0 < v < 0.0 and -values * math.log1p(v * v) >= math.log(floor)


@rule("TL202", "constant-input-features", "warning", min_values=16)
def constant_input_features(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Input features or channels that do not vary over the batch.

    ## What it does
    For every floating-point input that reaches a layer as it is, or concatenated with other
    tensors (uint8/int8/int16 ones: a weight layer, not an embedding), it lists the channels
    (images: dim 1) or features (last dim) whose minimum equals their maximum over the whole
    batch (at least ``min_values`` values per channel; in a ``trainlint check``, over every
    batch it reads: a rare 0/1 flag one batch never sets varies in the next). Left out, because
    a small batch legitimately never varies them: a feature stuck at the overall minimum that
    the input's other features go above (an absent category of a one-hot/multi-hot encoding,
    padding, an image border), and a non-image feature stuck at exactly 0 or 1 beside features
    that vary between 0 and 1 only (an indicator that is rare or common; among continuous
    features, a column stuck at 0 or 1 is a constant), and, in an input whose varying features
    are standardized and hold other rare values' columns, a column stuck a little below 0,
    where a rare category's column sits when the category is absent, as likely as
    ``RARE_CHANCE`` over the features to be all a batch shows (StandardScaler on one-hot
    columns or seldom inked pixels). An input constant all over is flagged
    unless it is all 0 (an empty placeholder) or, but for images, all 1 (a float mask with
    nothing masked: a time-series transformer's ``past_observed_mask`` where no value is
    missing, a required argument of its forward). Inputs of one value per sample (timesteps,
    scalars) are not checked, nor the positions of a (B, L) signal (see TL201: a grid's
    boundary held at 0).

    ## Why is this bad?
    A feature that never varies carries no information: it wastes a channel of the first
    layer, and after standardization it divides by a zero std. It usually means a data bug:
    an alpha channel, a column the loader failed to fill, a default value everywhere.

    ## Example
    RGBA images whose alpha channel is 1.0 everywhere, fed to ``nn.Conv2d(4, ...)``.

    ## Fix
    Drop the constant channels/features from the input (and shrink the first layer), or fix the
    data pipeline that leaves them constant.
    """
    for inp in trace.inputs:
        consumers = direct_consumers(trace, inp)
        if len(inp.shape) < 2 or math.prod(inp.shape[1:]) == 1 or not consumers:
            continue  # (one value per sample: a timestep, a conditioning scalar)
        if inp.dtype.startswith(("uint", "int")) and not any(
                f.base in WEIGHT_LAYERS for f in consumers):
            continue  # integer codes into an embedding or a lookup, not measurements
        per_channel = values_per_channel(inp)
        if per_channel < t.min_values:
            continue
        # A signal's positions (a grid's boundary held at 0) are no features to drop.
        inp = as_positions(trace, inp) or inp
        lo, hi = np.asarray(inp.min, float), np.asarray(inp.max, float)
        if not is_image(inp) and bool((lo == 1).all() and (hi == 1).all()):
            continue  # a float mask with nothing masked (past_observed_mask with no gap)
        # Stuck at the floor that other features reach; an input constant all over has none
        # (a dead sensor, a modality the loader never filled), but an all-0 one may be an
        # empty placeholder.
        floor = float(lo.min()) if bool((lo < hi).any()) else 0.0
        indicators = (0.0, 1.0) if not is_image(inp) and _has_indicators(inp) else ()
        spanned = per_channel if inp.range_values is None else max(
            per_channel, int(np.min(inp.range_values)))
        rare = _rare_standardized(inp, spanned) if not is_image(inp) else None
        constant = [i for i in range(len(lo))
                    if lo[i] == hi[i] and lo[i] != floor and lo[i] not in indicators
                    and not (rare is not None and rare(lo[i]))]
        if not constant:
            continue
        what = "channel" if is_image(inp) else "feature"
        listed = ", ".join(f"{i} (= {lo[i]:.4g})" for i in constant[:MAX_LISTED])
        more = "" if len(constant) <= MAX_LISTED else f" and {len(constant) - MAX_LISTED} more"
        yield Hit(
            module="",
            message=(f"{len(constant)} of the {len(lo)} {what}s of {_describe(inp)} are "
                     f"constant over the batch ({per_channel} values each): "
                     f"{what}s {listed}{more}"),
            fix=(f"drop {what}s {[i for i in constant[:MAX_LISTED]]}{more} from the input and "
                 f"shrink the first layer to match, or fix the data pipeline that leaves them "
                 f"constant"),
            evidence={"input": inp.name, "constant": constant, "channels": len(lo),
                      "values": [float(lo[i]) for i in constant[:MAX_LISTED]],
                      "values_per_channel": per_channel, "threshold": t.min_values},
        )
