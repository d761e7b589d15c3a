"""ResNet (transformers' ResNetForImageClassification): basic blocks with BatchNorm, random
init from a small config, normalized 32 px images, class labels, SGD with momentum."""

import torch
from transformers import ResNetConfig, ResNetForImageClassification

SIZE, CLASSES = 32, 10


def build_model():
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128],
                          depths=[1, 1, 1], layer_type="basic", num_labels=CLASSES)
    return ResNetForImageClassification(config)


def get_batch(batch_size=32):
    g = torch.Generator().manual_seed(6)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
