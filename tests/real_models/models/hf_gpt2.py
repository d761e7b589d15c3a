"""GPT-2 (transformers) language model: random init from a small config, next-token loss
computed by the model from ``labels``, AdamW."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, SEQ = 1000, 32


def build_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
