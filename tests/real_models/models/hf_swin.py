"""Swin Transformer (transformers' SwinForImageClassification): shifted-window attention with
patch merging between stages; random init from a small config, normalized 64 px images,
class labels, AdamW."""

import torch
from transformers import SwinConfig, SwinForImageClassification

SIZE, CLASSES = 64, 10


def build_model():
    torch.manual_seed(0)
    config = SwinConfig(image_size=SIZE, patch_size=4, embed_dim=32, depths=[2, 2],
                        num_heads=[2, 4], window_size=4, num_labels=CLASSES)
    return SwinForImageClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(12)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return {"pixel_values": images,
            "labels": torch.randint(0, CLASSES, (batch_size,), generator=g)}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
