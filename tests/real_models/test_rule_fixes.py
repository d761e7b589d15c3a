"""Rule fixes found by the real-architecture suite, pinned on minimal models."""

from __future__ import annotations

import torch
import torch.nn as nn

import trainlint
from trainlint.engine import Selection

from .harness import threshold


class ChannelsLastLayerNorm(nn.LayerNorm):
    """A library's own LayerNorm subclass, as transformers' ConvNextLayerNorm."""


def small_init_block(norm: nn.Module) -> nn.Sequential:
    """norm -> Linear(32, 128) at transformers' std 0.02 (0.08x Kaiming) -> GELU -> head."""
    model = nn.Sequential(norm, nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 10))
    nn.init.normal_(model[1].weight, std=0.02)
    nn.init.zeros_(model[1].bias)
    return model


def tl301(model: nn.Module) -> list:
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    report = trainlint.check(model, batch, selection=Selection(select={"TL301"}))
    return [f.module for f in report.findings]


def test_tl301_skips_a_layer_fed_by_a_layernorm_subclass() -> None:
    # ConvNeXt's pwconv1 reads ConvNextLayerNorm's output: the norm sets the block's scale.
    assert tl301(small_init_block(ChannelsLastLayerNorm(32))) == []


def test_tl301_still_fires_without_the_norm() -> None:
    assert tl301(small_init_block(nn.Identity())) == ["1"]


def conv_bn_net(weight_std: float) -> nn.Sequential:
    """A conv whose output feeds a BatchNorm, initialized far below Kaiming."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    nn.init.normal_(model[0].weight, std=weight_std)
    return model


def image_batch() -> tuple:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)


def summed_cross_entropy(scale: float):
    """Cross-entropy summed over the batch, times ``scale``."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return scale * nn.functional.cross_entropy(logits, labels, reduction="sum")
    return loss


def tl502(model: nn.Module, loss_fn) -> list:
    report = trainlint.check(model, image_batch(), loss_fn=loss_fn,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                             selection=Selection(select={"TL502"}))
    return report.findings


def test_tl502_leaves_out_the_gradient_of_a_weight_a_batchnorm_rescales() -> None:
    # BatchNorm cancels the conv weight's scale (its input variance stays well above eps), so
    # the weight's gradient is ~1/||w||: huge at this init, while the rest of the network's
    # gradient is not. MobileNetV2 from transformers (std 0.02 convs) is this case.
    loss_fn = summed_cross_entropy(20.0)
    model = conv_bn_net(weight_std=3e-3)
    images, labels = image_batch()
    loss_fn(model(images), labels).backward()
    rest = [p.grad.norm() for name, p in model.named_parameters() if name != "0.weight"]
    assert model[0].weight.grad.norm() > threshold("TL502", "max_norm")
    assert torch.stack(rest).norm() < threshold("TL502", "max_norm")
    assert tl502(conv_bn_net(weight_std=3e-3), loss_fn) == []


def test_tl502_still_fires_on_huge_gradients_in_the_same_network() -> None:
    findings = tl502(conv_bn_net(weight_std=0.1), summed_cross_entropy(1e5))
    assert [f.module for f in findings] == [""]
    assert findings[0].evidence["total_grad_norm"] > threshold("TL502", "max_norm")
