"""DistilBERT (transformers) for sequence classification: random init from a small config,
(inputs, labels) batches with cross-entropy on the logits, AdamW."""

import torch
import torch.nn.functional as F
from transformers import DistilBertConfig, DistilBertForSequenceClassification

VOCAB, SEQ, CLASSES = 1000, 32, 5


def build_model():
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, hidden_dim=256,
                              max_position_embeddings=64, num_labels=CLASSES)
    return DistilBertForSequenceClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (batch_size, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, SEQ - 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, CLASSES, (batch_size,),
                                                                      generator=g)


def loss_fn(outputs, labels):
    return F.cross_entropy(outputs.logits, labels)


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4)
