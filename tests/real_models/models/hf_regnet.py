"""RegNetY (transformers' RegNetForImageClassification): grouped-conv bottlenecks with
squeeze-and-excitation gates (AdaptiveAvgPool2d, 1x1 conv, ReLU, 1x1 conv, sigmoid) and
BatchNorm, random init from a small config, normalized 64 px images, class labels, SGD with
momentum."""

import torch
from transformers import RegNetConfig, RegNetForImageClassification

SIZE, CLASSES = 64, 10


def build_model():
    torch.manual_seed(0)
    config = RegNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64, 128, 256],
                          depths=[1, 1, 2, 1], groups_width=8, layer_type="y",
                          num_labels=CLASSES)
    return RegNetForImageClassification(config)


def get_batch(batch_size=32):
    g = torch.Generator().manual_seed(8)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-5)
