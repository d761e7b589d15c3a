"""ConvNeXt (transformers): depthwise convs, channels-last LayerNorm, GELU and layer scale,
random init from a small config, normalized 32 px images, AdamW."""

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

SIZE, CLASSES = 32, 10


def build_model():
    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[32, 64, 128],
                            depths=[1, 1, 1], num_stages=3, image_size=SIZE, num_labels=CLASSES)
    return ConvNextForImageClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
