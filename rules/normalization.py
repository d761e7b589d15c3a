"""Normalization layers: BatchNorm fed too few samples, and BatchNorm that cannot run."""

from __future__ import annotations

import math
from typing import Iterator, Optional

from trainlint.engine import Hit, Thresholds, rule
from trainlint.trace import (
    CLASSIFICATION_LOSSES,
    ELEMENTWISE_OPS,
    REORDERING_OPS,
    ModuleFacts,
    RunTrace,
)

from ._graph import (
    DROPOUT_TYPES,
    EMBEDDING_TYPES,
    FUNCTIONAL_DROPOUT,
    INSTANCENORM_TYPES,
    PASS_THROUGH,
    RNN_TYPES,
    SHAPE_OPS,
    WEIGHT_LAYERS,
    attends,
    layer_at,
    module_expr,
    only_shape_ops,
    output_nodes,
    passed_on_by,
    predecessors,
    sources,
    successors,
    upstream,
)

BATCHNORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
                   "LazyBatchNorm2d", "LazyBatchNorm3d")


def batchnorms(trace: RunTrace) -> Iterator[ModuleFacts]:
    for facts in trace.modules.values():
        if facts.base in BATCHNORM_TYPES:
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
    if facts.base.endswith("1d") and all(len(s) == 2 for s in facts.input_shapes):
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
    large enough, ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` instead. A BatchNorm
    whose parameters are frozen (a fine-tuned backbone's) belongs in eval mode: the fix says
    so first.

    In a Monitor run a small batch that comes alone now and then, with full ones between
    (the last, incomplete batch of each epoch with ``DataLoader(drop_last=False)``), is left
    alone: a batch below ``min_batch`` is judged where it came at two observed steps in a row,
    at every one, or at two or more that are ``SMALL_SHARE`` (25%) of them or more (the
    message then says at how many).
    """
    for facts in batchnorms(trace):
        if not facts.batch_sizes or min(facts.values_per_channel) <= 1:
            continue
        small = _small_batches(facts, t.min_batch)
        if small is None:
            continue
        batch, count, total = small
        global_batch = batch * max(trace.world_size, 1)
        if trace.world_size > 1 and global_batch >= t.min_batch:
            fix = (f"the global batch is {global_batch} over {trace.world_size} processes: "
                   "synchronize the statistics with "
                   "model = nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping it in "
                   f"DistributedDataParallel, or use {replacement(facts)}")
        else:
            fix = (f"raise the batch to >= {t.min_batch} per device (gradient accumulation "
                   f"does not widen what BatchNorm sees); or replace "
                   f"{facts.type}({facts.attrs.get('num_features')}) with {replacement(facts)}, "
                   f"which does not depend on the batch, and retune the learning rate (a "
                   f"ResNet at batch 8 stalled with GroupNorm at SGD 0.1 and trained at 0.02)")
        own = [p for p in trace.params if p.module == facts.name]
        if own and not any(p.requires_grad for p in own):
            # Frozen (a fine-tuned backbone's) yet in training mode: it still normalizes with
            # the batch and rewrites its running statistics; eval mode is what freezing meant.
            fix = (f"its parameters are frozen, yet it runs in training mode: put it in eval "
                   f"({module_expr(facts.name)}.eval(), again after every model.train()) so it "
                   f"normalizes with its running statistics and keeps them; or " + fix)
        yield Hit(
            module=facts.name,
            message=(f"{facts.type} {facts.name!r} normalizes over batches of {batch} sample(s) "
                     f"per device in training mode (threshold {t.min_batch})"
                     + ("" if count == total else f" at {count} of {total} observed steps")
                     + ": its statistics are noisy and drift from the running estimates used "
                     "at eval"),
            fix=fix,
            evidence={"batch_size": batch, "threshold": t.min_batch,
                      "world_size": trace.world_size, "global_batch": global_batch,
                      "small_steps": count, "observed_steps": total},
        )


# Small batches that each come alone between full ones are judged where they are at least this
# share of the observed steps (and two at least): batch 2 at every second, third or fourth
# step left a BatchNorm MLP at accuracy 0.77-0.83 against 0.88-0.92; an epoch's last batch at
# one step in 6, 7 or 10 (MLPs and CNNs over 20-50 epochs, two seeds) did no measurable harm.
SMALL_SHARE = 0.25


def _small_batches(facts: ModuleFacts, min_batch: int) -> Optional[tuple[int, int, int]]:
    """(the smallest batch below ``min_batch``, the observed steps with one, the observed steps
    that ran the layer) where such batches came at two observed steps in a row, at every
    observed step, or at two or more that are ``SMALL_SHARE`` of them or more; None where
    none did, or each came alone now and then (a DataLoader's last incomplete batch of each
    epoch with drop_last=False)."""
    runs = facts.batch_runs or [[batch, 1] for batch in facts.batch_sizes]
    small = [(batch, steps) for batch, steps in runs if batch < min_batch]
    if not small:
        return None
    total, count = sum(steps for _, steps in runs), sum(steps for _, steps in small)
    in_a_row = any(steps >= 2 for _, steps in small) or any(
        a[0] < min_batch and b[0] < min_batch for a, b in zip(runs, runs[1:]))
    often = count >= 2 and count >= SMALL_SHARE * total
    if not (in_a_row or often or count == total):
        return None
    return min(batch for batch, _ in small), count, total


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


def _sequence_blocks(trace: RunTrace) -> list[str]:
    """Types of the RNN, attention and embedding layers in the model."""
    found = []
    for facts in trace.modules.values():
        if (facts.base in RNN_TYPES + EMBEDDING_TYPES or attends(facts)) \
                and facts.type not in found:
            found.append(facts.type)
    return found


def _fed_by_convolution(trace: RunTrace, name: str) -> bool:
    """Whether everything module ``name`` takes is a Conv layer's output maps (through
    reshapes, pass-through modules, and an activation after the conv: conv -> ReLU -> BN)."""
    return _conv_maps(trace, upstream(trace, name))


def _conv_maps(trace: RunTrace, fed: list, hops: int = 2) -> bool:
    """Whether every ``(src, via)`` of ``fed`` is a Conv layer's output through reshapes, or
    an activation (a module or a functional op) of such output, up to ``hops`` deep."""
    for src, via in fed:
        facts = trace.modules.get(src[1]) if src[0] == "point" else None
        if facts is None or not only_shape_ops(via):
            return False
        if facts.base.startswith("Conv"):
            continue
        act = layer_at(trace, src)
        if not hops or act is None or act.kind is None:
            return False
        behind = upstream(trace, src[1]) if act.op == "output" else predecessors(trace, src)
        if not _conv_maps(trace, behind, hops - 1):
            return False
    return bool(fed)


def _image_tokens(trace: RunTrace) -> bool:
    """Whether the model's sequences are patches of images: no RNN or embedding layer, and
    every model input is a float image or video (4-D or more; an integer input, such as
    token ids or a padding mask, is no image)."""
    if any(f.base in RNN_TYPES + EMBEDDING_TYPES for f in trace.modules.values()):
        return False
    images = {i.name for i in trace.inputs if len(i.shape) >= 4}
    fed = {e.src[1] for e in trace.edges if e.src[0] == "input"}
    return bool(images) and len(images) == len(trace.inputs) and fed <= images


@rule("TL402", "batchnorm-in-sequence-model", "warning")
def batchnorm_in_sequence_model(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """BatchNorm over token/time features in a sequence model.

    ## What it does
    In a model with RNN, attention (by class, or any module whose forward calls
    ``F.scaled_dot_product_attention``) or embedding layers, it finds BatchNorm layers that
    normalize over time or token positions: a ``BatchNorm1d`` fed ``(N, C, L)`` sequences, or
    fed ``(N * L, C)`` rows of flattened tokens (more rows than the batch has samples).
    BatchNorm over one feature vector per sample (tabular heads) is left alone, and so is a
    vision model whose tokens are an image's fixed grid of patches (attention layers only, no
    RNN or token embedding, every input an image or a video): no lengths or padding vary
    there, and LeViT normalizes its tokens with BatchNorm on purpose (it folds into the
    Linear before it for inference). So is a BatchNorm that normalizes a convolution's output
    maps (VDCNN's temporal conv blocks, a Conformer's convolution module, Informer's
    distilling layer), also after an activation (conv -> ReLU -> BatchNorm) or through a
    module of the user's that only slices or reshapes them (a causal TCN's ``Chomp1d``): over
    a conv's positions, BatchNorm is how convolutional networks normalize, by their papers'
    design.

    ## Why is this bad?
    BatchNorm's statistics mix positions, sequence lengths and padding across the batch; they
    change with the batch's composition and differ between training and inference (often
    one token at a time). RNNs and transformers use LayerNorm, which normalizes each token over
    its features, independently of the batch.

    ## Example
    ``nn.BatchNorm1d(d_model)`` applied to ``x.transpose(1, 2)`` between transformer blocks.

    ## Fix
    Use ``nn.LayerNorm(d_model)`` on the ``(N, L, C)`` tokens (no transpose needed). A
    ``BatchNorm1d(T)`` fed a batch-first RNN's ``(N, T, H)`` output as it is normalizes each
    position: its LayerNorm takes the H features (``nn.LayerNorm(H)``).
    """
    blocks = _sequence_blocks(trace)
    if not blocks or _image_tokens(trace):
        return
    for facts in batchnorms(trace):
        if not facts.input_shapes or not facts.base.endswith(("1d", "SyncBatchNorm")):
            continue
        if _fed_by_convolution(trace, facts.name):
            continue
        over_time = [s for s in facts.input_shapes if len(s) == 3 or (
            len(s) == 2 and trace.batch_size and s[0] > trace.batch_size)]
        if not over_time:
            continue
        channels = facts.attrs.get("num_features")
        fix = (f"replace it with nn.LayerNorm({channels}) applied to the (N, L, {channels}) "
               "tokens")
        features = _positions_first(trace, facts.name, over_time[0], channels)
        if features is not None:
            fix = (f"replace it with nn.LayerNorm({features}) over each position's {features} "
                   f"features: its input {tuple(over_time[0])} comes as the sequence layer "
                   f"made it, positions by features, so BatchNorm1d({channels}) takes the "
                   f"{channels} positions for channels")
        yield Hit(
            module=facts.name,
            message=(f"{facts.type} {facts.name!r} normalizes over token/time positions "
                     f"(input {tuple(over_time[0])}) in a sequence model "
                     f"({', '.join(blocks[:3])}): its statistics mix positions, lengths and "
                     "padding across the batch"),
            fix=fix,
            evidence={"input_shape": list(over_time[0]), "sequence_layers": blocks},
        )


def _positions_first(trace: RunTrace, name: str, shape: tuple,
                     channels: Optional[int]) -> Optional[int]:
    """The feature size of a BatchNorm1d's ``(N, T, H)`` input that reaches it with no
    reordering op from where it was made (a batch-first GRU's output as it is): BatchNorm1d(T)
    there normalizes each position, and the LayerNorm that replaces it takes H. None where the
    input was reordered (``x.transpose(1, 2)``: (N, C, L), LayerNorm(C) on the tokens) or the
    data-flow graph does not say."""
    into = [e for e in trace.edges if e.dst == ("module", name)]
    if len(shape) != 3 or shape[2] == channels or not into or any(
            REORDERING_OPS.intersection(e.via) for e in into):
        return None
    return shape[2]


def _cancels_bias(norm: ModuleFacts, biases: Optional[int]) -> bool:
    """Whether the norm subtracts a per-channel mean over ``biases`` channels, one per bias
    value (a Linear's 1024 biases viewed as 64 channels of 4x4 keep 15/16 of their spread)."""
    channels = norm.attrs.get("num_features", norm.attrs.get("num_channels"))
    if biases is not None and channels is not None and biases != channels:
        return False
    if norm.base in BATCHNORM_TYPES + INSTANCENORM_TYPES:
        return True
    return norm.base == "GroupNorm" and norm.attrs.get("num_groups") == norm.attrs.get(
        "num_channels")


def _sole_consumer(trace: RunTrace, node: tuple, hops: int = 3) -> Optional[ModuleFacts]:
    """The one leaf module that takes ``node``'s output through reshapes only, looking through
    a module that passes it on reshaped or sliced (a causal conv's ``Chomp1d``); None where the
    output also goes elsewhere: every consumer (containers aside, what they do with it has
    edges of its own) must be that module, so a bias that also reaches a residual add is not
    cancelled."""
    for _ in range(hops):
        consumers = [(dst, via) for dst, via in successors(trace, node)
                     if dst[0] != "module" or getattr(trace.modules.get(dst[1]), "is_leaf", True)]
        if len(consumers) != 1:
            return None
        (dst, via), = consumers
        facts = trace.modules.get(dst[1]) if dst[0] == "module" else None
        if facts is None or not set(via) <= SHAPE_OPS:
            return None
        if facts.base in PASS_THROUGH or passed_on_by(facts) is None:
            return facts
        nodes = output_nodes(trace, facts.name)
        if len(nodes) != 1:
            return None
        node = nodes[0]
    return None


@rule("TL403", "bias-before-norm", "info")
def bias_before_norm(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """A Conv/Linear bias that the next normalization layer cancels.

    ## What it does
    Finds Conv/Linear layers with a bias whose output goes straight (through reshapes, or a
    module of the user's without weights that only slices or reshapes it, such as a causal
    TCN's ``Chomp1d``) into a BatchNorm, an InstanceNorm, or a GroupNorm with one channel per
    group (layers that subtract a per-channel mean), one bias value per channel of the norm,
    and nowhere else: an output also used elsewhere (a residual add) keeps the bias there, and
    so does a Linear whose 1024 outputs are viewed as 64 channels of 4x4 (DCGAN's generator
    stem: the norm removes each channel's mean bias, not the 16 values' spread). Recurrent
    layers (LSTM, GRU, RNN) are left alone: their biases sit inside the gates, before the
    nonlinearities, where no later norm cancels them.

    ## Why is this bad?
    The mean subtraction removes any per-channel constant, so the bias has no effect on the
    output and gets no useful gradient; the norm's own shift (β, when affine) takes its role.
    It wastes parameters, memory and optimizer state.

    ## Example
    ``nn.Conv2d(64, 128, 3, padding=1)`` followed by ``nn.BatchNorm2d(128)``.

    ## Fix
    Build the layer with ``bias=False``.
    """
    for lt in trace.ordered_layers():
        facts = trace.modules.get(lt.module)
        if lt.op != "output" or facts is None or facts.base not in WEIGHT_LAYERS:
            continue
        if not facts.attrs.get("has_bias") or facts.base in RNN_TYPES:
            continue
        norm = _sole_consumer(trace, lt.node)
        bias = next((p for p in trace.params if p.name == f"{lt.module}.bias"), None)
        if norm is None or not _cancels_bias(norm, math.prod(bias.shape) if bias else None):
            continue
        shift = ("its affine shift β takes the bias's role" if norm.attrs.get("affine")
                 else "the norm has no affine shift, so the output has no offset at all")
        yield Hit(
            module=lt.module,
            message=(f"{facts.type} {lt.module!r} has a bias, but its output goes straight "
                     f"into {norm.type} {norm.name!r}, whose per-channel mean subtraction "
                     f"cancels it; {shift}"),
            fix=f"build {lt.module!r} with bias=False",
            evidence={"norm": norm.name, "norm_type": norm.type},
        )


IMAGE_CHANNELS = (1, 2, 3, 4)


def _image_output_shape(trace: RunTrace) -> Optional[tuple]:
    """The shape of the model's (first) output when a layer or an input makes it through
    reshapes and element-wise ops (a residual generator returns x - net(x), an output clamp
    or squashing), else None."""
    for origin, via in trace.output_ops[:1]:
        if not set(via) <= SHAPE_OPS | ELEMENTWISE_OPS:
            return None
        if origin[0] == "point":
            layer = layer_at(trace, origin)
            return tuple(layer.shape) if layer is not None else None
        if origin[0] == "input":
            return next((tuple(i.shape) for i in trace.inputs if i.name == origin[1]), None)
    return None


@rule("TL405", "batchnorm-image-generator", "info")
def batchnorm_image_generator(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """BatchNorm in an image-to-image generator.

    ## What it does
    Fires when the model maps an image to an image of the same size and channels
    (``(N, C, H, W)`` in and out, C ≤ 4) with a regression-style loss (not a per-pixel
    classification: segmentation nets are left alone) and contains BatchNorm layers.

    ## Why is this bad?
    In image generation and style transfer each output depends on one image instance, but
    BatchNorm mixes statistics across the batch: the output of one image depends on the others
    in the batch, and training and eval outputs differ. Instance normalization fixes the
    statistics per image.

    ## Example
    A U-Net denoiser or a style-transfer network built with ``nn.BatchNorm2d``.

    ## Fix
    Replace ``nn.BatchNorm2d(C)`` with ``nn.InstanceNorm2d(C, affine=True)`` (or
    ``nn.GroupNorm``).
    """
    if trace.loss_kind in CLASSIFICATION_LOSSES:
        return
    out_shape = _image_output_shape(trace)
    images = [i for i in trace.inputs if len(i.shape) == 4 and i.channel_dim == 1]
    if out_shape is None or len(out_shape) != 4 or not images:
        return
    source = images[0].shape
    if tuple(out_shape[1:]) != tuple(source[1:]) or out_shape[1] not in IMAGE_CHANNELS:
        return
    for facts in batchnorms(trace):
        channels = facts.attrs.get("num_features")
        yield Hit(
            module=facts.name,
            message=(f"{facts.type} {facts.name!r} normalizes over the batch in an "
                     f"image-to-image model (input {tuple(source)}, output {tuple(out_shape)}): "
                     "each generated image depends on the others in its batch"),
            fix=f"replace it with nn.InstanceNorm2d({channels}, affine=True)",
            evidence={"input_shape": list(source), "output_shape": list(out_shape)},
        )


@rule("TL406", "dropout-before-batchnorm", "info")
def dropout_before_batchnorm(trace: RunTrace, t: Thresholds) -> Iterator[Hit]:
    """Dropout whose output feeds a BatchNorm.

    ## What it does
    Finds BatchNorm layers whose input comes straight from a Dropout module (p > 0) or a
    functional ``F.dropout``.

    ## Why is this bad?
    Dropout changes the variance of its output between training (units zeroed and the rest
    scaled by 1/(1-p)) and evaluation (no dropout). BatchNorm's running variance is learned on
    the training variance, so at evaluation it normalizes with the wrong statistics ("variance
    shift", Li et al. 2019) and accuracy drops.

    ## Example
    ``nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm1d(256))``.

    ## Fix
    Move the Dropout after the last BatchNorm (just before the classifier), or drop one of them.
    """
    for facts in batchnorms(trace):
        for src, via in sources(trace, facts.name):
            if not only_shape_ops(via):
                continue
            functional = any(op in FUNCTIONAL_DROPOUT for op in via)
            feeder = trace.modules.get(src[1]) if src[0] == "point" else None
            if not functional and (feeder is None or feeder.base not in DROPOUT_TYPES
                                   or not feeder.attrs.get("p")):
                continue
            what = "F.dropout" if functional else f"{feeder.type} {feeder.name!r}"
            yield Hit(
                module=facts.name if functional else feeder.name,
                message=(f"{what} feeds {facts.type} {facts.name!r}: the variance BatchNorm "
                         "learns in training (with dropout) is not the one it sees at eval"),
                fix=(f"move the dropout after {facts.name!r} (e.g. just before the classifier), "
                     "or remove one of the two"),
                evidence={"batchnorm": facts.name},
            )
            break
