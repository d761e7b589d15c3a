"""A sequence classifier on torch's own nn.TransformerEncoder (pre-norm, GELU), mean-pooled,
with nn.CrossEntropyLoss and AdamW."""

import torch
import torch.nn as nn

VOCAB, SEQ, DIM, CLASSES = 1000, 32, 128, 6


class TransformerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(1, SEQ, DIM))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(DIM, nhead=4, dim_feedforward=256, dropout=0.1,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids):
        x = self.encoder(self.embed(ids) + self.pos[:, :ids.shape[1]])
        return self.head(self.norm(x).mean(dim=1))


def build_model():
    torch.manual_seed(0)
    return TransformerClassifier()


def get_batch(batch_size=16):
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    return ids, torch.randint(0, CLASSES, (batch_size,), generator=g)


loss_fn = nn.CrossEntropyLoss()


def build_optimizer(params):
    return torch.optim.AdamW(params, lr=3e-4)
