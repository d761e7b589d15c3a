"""BERT (transformers) for sequence classification: random init from a small config, the
model's own cross-entropy loss via ``labels``, AdamW at a pretraining learning rate."""

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB, SEQ, CLASSES = 1000, 32, 4


def build_model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=64, num_labels=CLASSES)
    return BertForSequenceClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch_size, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[batch_size // 2:, SEQ - 8:] = 0
    labels = torch.randint(0, CLASSES, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
