"""Whisper (transformers) speech encoder-decoder: random init from a small config, log-mel-like
input features (80 bins x 3000 frames: 1500 positions after the convolutions), the model's own
cross-entropy loss from ``labels``, AdamW. At init the decoder's cross-attention averages over
the 1500 positions, so the encoder gets ~1e-4 of the decoder's gradient; AdamW moves both as
fast."""

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

VOCAB, FRAMES, TGT = 1000, 3000, 16


def build_model():
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                           max_source_positions=FRAMES // 2, max_target_positions=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1, suppress_tokens=[],
                           begin_suppress_tokens=[])
    return WhisperForConditionalGeneration(config)


def get_batch(batch_size=8):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(batch_size, 80, FRAMES, generator=g).clamp_(-3, 3) / 3
    labels = torch.randint(3, VOCAB, (batch_size, TGT), generator=g)
    return {"input_features": features, "labels": labels}


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=3e-4)
