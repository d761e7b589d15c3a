"""Normalization layers: BatchNorm fed too few samples, and BatchNorm that cannot run."""

from __future__ import annotations

from typing import Iterator

from trainlint.engine import Hit, Thresholds, rule
from trainlint.trace import ModuleFacts, RunTrace

BATCHNORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
                   "LazyBatchNorm2d", "LazyBatchNorm3d")


def batchnorms(trace: RunTrace) -> Iterator[ModuleFacts]:
    for facts in trace.modules.values():
        if facts.type in BATCHNORM_TYPES:
            yield facts


def group_count(channels: int, preferred: int = 32) -> int:
    """The largest number of groups <= ``preferred`` that divides ``channels`` with at least 2
    channels per group (one channel per group would be InstanceNorm)."""
    for groups in range(min(preferred, max(channels // 2, 1)), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def replacement(facts: ModuleFacts) -> str:
    """The batch-independent layer that replaces this BatchNorm."""
    channels = int(facts.attrs.get("num_features", 0) or 0)
    if facts.type.endswith("1d") and all(len(s) == 2 for s in facts.input_shapes):
        return f"nn.LayerNorm({channels})"
    return f"nn.GroupNorm({group_count(channels)}, {channels})"


@rule("TL401", "batchnorm-small-batch", "warning", min_batch=16)
def batchnorm_small_batch(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """BatchNorm in training mode normalizes over too few samples per device.

    ## What it does
    Records the batch size each BatchNorm layer sees in training mode (per device, i.e. per
    process). It fires when that batch is below ``min_batch`` samples.

    ## Why is this bad?
    BatchNorm's mean and variance are estimated from the batch: with few samples they are
    noisy, and train and eval statistics drift apart. The Group Normalization paper measured
    ResNet-50 on ImageNet: BatchNorm's error grows quickly below ~16 images per device, while
    GroupNorm's stays flat.

    ## Example
    A ResNet trained with 2 images per GPU (detection, segmentation, video).

    ## Fix
    Replace the layer with a batch-independent one (``nn.GroupNorm(32, C)`` for conv maps,
    ``nn.LayerNorm(C)`` for features); when training is distributed and the global batch is
    large enough, ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` instead.
    """
    for facts in batchnorms(trace):
        if not facts.batch_sizes:
            continue
        batch = min(facts.batch_sizes)
        if batch >= t.min_batch or min(facts.values_per_channel) <= 1:
            continue
        global_batch = batch * max(trace.world_size, 1)
        if trace.world_size > 1 and global_batch >= t.min_batch:
            fix = (f"the global batch is {global_batch} over {trace.world_size} processes: "
                   "synchronize the statistics with "
                   "model = nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping it in "
                   f"DistributedDataParallel, or use {replacement(facts)}")
        else:
            fix = (f"replace {facts.type}({facts.attrs.get('num_features')}) with "
                   f"{replacement(facts)}, which does not depend on the batch; or raise the "
                   f"batch to >= {t.min_batch} per device")
        yield Hit(
            module=facts.name,
            message=(f"{facts.type} {facts.name!r} normalizes over batches of {batch} sample(s) "
                     f"per device in training mode (threshold {t.min_batch}): its statistics "
                     "are noisy and drift from the running estimates used at eval"),
            fix=fix,
            evidence={"batch_size": batch, "threshold": t.min_batch,
                      "world_size": trace.world_size, "global_batch": global_batch},
        )


@rule("TL404", "batchnorm-single-value", "error")
def batchnorm_single_value(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """A BatchNorm in training mode sees one value per channel.

    ## What it does
    Fires when a BatchNorm layer in training mode receives a single value per channel
    (e.g. batch size 1 into ``BatchNorm1d`` on features, or a 1×1 map at batch 1), which
    PyTorch rejects with "Expected more than 1 value per channel when training".

    ## Why is this bad?
    The variance of one value is zero: the layer cannot normalize, and training stops.

    ## Example
    ``nn.BatchNorm1d(64)`` fed a ``(1, 64)`` batch.

    ## Fix
    Use a batch of at least 2 per device (and drop_last=True in the DataLoader so the last
    batch is not a single sample), or replace the layer with ``nn.LayerNorm``/``nn.GroupNorm``.
    """
    reported = set()
    for error in trace.errors:
        if error.get("kind") == "batchnorm-single-value":
            reported.add(error.get("module", ""))
    for facts in batchnorms(trace):
        if facts.values_per_channel and min(facts.values_per_channel) <= 1:
            reported.add(facts.name)
    for name in sorted(reported):
        facts = trace.modules.get(name)
        kind = facts.type if facts else "BatchNorm"
        swap = replacement(facts) if facts else "nn.LayerNorm(C)"
        yield Hit(
            module=name,
            message=(f"{kind} {name!r} receives one value per channel in training mode; PyTorch "
                     "cannot compute a batch variance and raises \"Expected more than 1 value "
                     "per channel when training\""),
            fix=(f"feed at least 2 samples per device (DataLoader(drop_last=True) avoids a "
                 f"final batch of 1), or replace it with {swap}"),
            evidence={"values_per_channel": 1},
        )
