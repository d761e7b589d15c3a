"""TL103 on a VQ-VAE whose codebook starts at uniform(±1/K): the encoder's output has RMS ~1,
the codebook vectors that replace it ~0.01, and the decoder keeps that scale. The finding
names the codebook lookup (measured here with forward hooks), not the decoder's Kaiming-
initialized layers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainlint


class Quantizer(nn.Module):
    def __init__(self, codes: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(codes, dim)
        nn.init.uniform_(self.emb.weight, -1 / codes, 1 / codes)

    def forward(self, z: torch.Tensor) -> tuple:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = torch.cdist(flat, self.emb.weight).argmin(1)
        q = self.emb(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return z + (q - z).detach(), F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())


class VqVae(nn.Module):
    def __init__(self, ch: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, ch, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch, ch, 4, 2, 1),
                                 nn.ReLU(), nn.Conv2d(ch, dim, 1))
        self.vq = Quantizer(dim=dim)
        self.dec = nn.Sequential(nn.Conv2d(dim, ch, 3, 1, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(ch, 1, 4, 2, 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple:
        q, vq_loss = self.vq(self.enc(x))
        return self.dec(q), vq_loss


def test_the_codebook_where_the_signal_falls_is_named() -> None:
    torch.manual_seed(0)
    model = VqVae()
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    seen: dict = {}

    def rms(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, out.pow(2).mean().sqrt().item())
        return hook

    hooks = [m.register_forward_hook(rms(n)) for n, m in (("enc", model.enc[4]),
                                                           ("vq", model.vq.emb))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert seen["vq"] < seen["enc"] / 30  # the truth: the drop is at the codebook
    report = trainlint.check(model, (x, x), loss_fn=lambda o, y: F.mse_loss(o[0], y) + o[1],
                             steps=2)
    [found] = [f for f in report.findings if f.code == "TL103"]
    assert found.module == "vq.emb"
    assert "'vq.emb' (Embedding) outputs a scale of" in found.fix
    assert "kaiming_normal_" not in found.fix
