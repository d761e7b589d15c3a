"""ViT (transformers) image classifier: random init from a small config, normalized 32 px
images, cross-entropy on the logits (the default loss for (images, class labels)), AdamW."""

import torch
from transformers import ViTConfig, ViTForImageClassification

SIZE, CLASSES = 32, 10


def build_model():
    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=128,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                       num_labels=CLASSES)
    return ViTForImageClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=g)
    return images, torch.randint(0, CLASSES, (batch_size,), generator=g)


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
