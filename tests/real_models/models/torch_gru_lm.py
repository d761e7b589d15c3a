"""A character-level language model: embedding, 2-layer nn.GRU with dropout between its
layers, a linear decoder; the logits come out as (batch, classes, time) for cross-entropy as
it is, and Adam (lr 2e-3)."""

import torch
import torch.nn as nn

VOCAB, SEQ, DIM = 96, 48, 128


class GRULanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.gru = nn.GRU(DIM, DIM, num_layers=2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        states, _ = self.gru(self.embed(ids))
        return self.head(states).transpose(1, 2)


def build_model():
    torch.manual_seed(0)
    return GRULanguageModel()


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(13)
    text = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return text[:, :-1], text[:, 1:]


def build_optimizer(params):
    return torch.optim.Adam(params, lr=2e-3)
