"""A small DenseNet: each layer (BatchNorm, ReLU, 3x3 conv) adds 12 channels concatenated to
everything before it, a transition (BatchNorm, ReLU, 1x1 conv, average pool) between two
dense blocks; normalized 32 px images, class labels, SGD with Nesterov momentum."""

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZE, CLASSES, GROWTH = 32, 10, 12


class DenseLayer(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, GROWTH, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], dim=1)


def dense_block(channels, layers):
    return nn.Sequential(*[DenseLayer(channels + i * GROWTH) for i in range(layers)])


class DenseNet(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1, bias=False)
        width = 24 + layers * GROWTH
        self.block1 = dense_block(24, layers)
        self.transition = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(),
                                        nn.Conv2d(width, width // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.block2 = dense_block(width // 2, layers)
        out = width // 2 + layers * GROWTH
        self.norm = nn.BatchNorm2d(out)
        self.head = nn.Linear(out, CLASSES)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1).flatten(1))


def build_model():
    torch.manual_seed(0)
    return DenseNet()


def get_batch(batch_size=32):
    g = torch.Generator().manual_seed(14)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
