"""Llama (transformers' LlamaForCausalLM): RMSNorm, SwiGLU MLP, rotary positions and grouped
key/value heads; random init from a small config, next-token loss computed by the model from
``labels``, AdamW."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, SEQ = 1000, 32


def build_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config)


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
