"""SegFormer's Mix Transformer encoder (transformers' SegformerForImageClassification):
overlapping patch embeddings, efficient self-attention, Mix-FFN (Linear, 3x3 depthwise conv,
GELU, Linear) on residual branches, random init from a small config, normalized 64 px images,
class labels, AdamW."""

import torch
from transformers import SegformerConfig, SegformerForImageClassification

SIZE, CLASSES = 64, 10


def build_model():
    torch.manual_seed(0)
    config = SegformerConfig(num_channels=3, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                             num_attention_heads=[1, 2, 4, 8], num_labels=CLASSES)
    return SegformerForImageClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(9)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01)
