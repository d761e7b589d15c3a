"""MobileNetV2 (transformers): inverted residuals with BatchNorm and ReLU6, random init from
a small config (width multiplier 0.35), normalized 32 px images, Adam.

transformers initializes these convolutions with its generic N(0, 0.02^2), 6-15x below
Kaiming; each feeds a BatchNorm, so their gradients are ~1/||w|| large. Adam's step does not
depend on that scale; SGD(lr=0.05) would move them by 25-100x their norm in the first step
(TL503 says so, rightly)."""

import torch
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

SIZE, CLASSES = 32, 10


def build_model():
    torch.manual_seed(0)
    config = MobileNetV2Config(num_channels=3, image_size=SIZE, depth_multiplier=0.35,
                               num_labels=CLASSES)
    return MobileNetV2ForImageClassification(config)


def get_batch(batch_size=32):
    g = torch.Generator().manual_seed(8)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.Adam(params, lr=1e-3)
