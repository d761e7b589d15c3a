"""ModernBERT (transformers) for sequence classification: random init from a small config
(its own init, whose residual branches start ~100x below the stream, so the [CLS] token it
classifies barely differs between samples at first), AdamW at a pretraining rate."""

import torch
from transformers import ModernBertConfig, ModernBertForSequenceClassification

VOCAB, SEQ, CLASSES = 128, 24, 4


def build_model():
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128, num_labels=CLASSES,
                              max_position_embeddings=64, local_attention=16, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return ModernBertForSequenceClassification(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch_size, SEQ), generator=g)
    ids[:, 0] = 1  # [CLS]
    labels = torch.randint(0, CLASSES, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
