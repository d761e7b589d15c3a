"""TL104's float16-range finding names the init where the init is off the scale its fan-in
calls for, however much training grew the activations after."""

from __future__ import annotations

import torch
import torch.nn as nn

import trainlint


def test_float16_range_from_an_init_off_scale_is_the_inits_however_it_grows() -> None:
    """An MLP at normal(std=1) peaks at ~2e4 at step 0 and SGD inflates it further (RMS 19x):
    cutting the rate 10-100x with clipping left CE at 8.6e3, the default init reached 1.96
    (measured by the hunt). TL301 finds the init off scale, so TL104's fix names the init."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    for layer in model[::2]:
        nn.init.normal_(layer.weight, std=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=g)
    y = (x[:, :16] @ torch.randn(16, 10, generator=g)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    with trainlint.Monitor(model, optimizer=opt, every=5) as monitor:
        for step in range(60):
            i = torch.arange(step * 128, step * 128 + 128) % 512
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        findings = monitor.report().findings
    codes = [f.code for f in findings]
    assert "TL301" in codes
    [range_hit] = [f for f in findings if f.code == "TL104"]
    assert "rescale the layer's init" in range_hit.fix
