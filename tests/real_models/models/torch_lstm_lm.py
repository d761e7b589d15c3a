"""A word-level language model: embedding, 2-layer nn.LSTM with dropout, a linear decoder;
next-token cross-entropy on the flattened logits and Adam (lr 1e-3)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, SEQ, DIM = 1000, 32, 128


class LSTMLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.lstm = nn.LSTM(DIM, DIM, num_layers=2, dropout=0.2, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.decoder = nn.Linear(DIM, VOCAB)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, ids):
        hidden, _ = self.lstm(self.drop(self.embed(ids)))
        return self.decoder(self.drop(hidden))


def build_model():
    torch.manual_seed(0)
    return LSTMLanguageModel()


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def build_optimizer(params):
    return torch.optim.Adam(params, lr=1e-3)
