"""T5 (transformers) encoder-decoder: random init from a small config, the model's own
cross-entropy loss from ``labels`` (decoder inputs are the shifted labels), AdamW."""

import torch
from transformers import T5Config, T5ForConditionalGeneration

VOCAB, SRC, TGT = 1000, 32, 16


def build_model():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, VOCAB, (batch_size, SRC), generator=g)
    labels = torch.randint(2, VOCAB, (batch_size, TGT), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=3e-4)
