"""Known faults seeded into real architectures: the rule fires, on the right modules."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainlint.stats import GELU_ACTIVE_LEVEL

from .harness import api_check, cli_check, describe, load, threshold


def by_code(findings: list, code: str) -> list:
    return [f for f in findings if (f["code"] if isinstance(f, dict) else f.code) == code]


def batchnorm_names(model: nn.Module) -> set:
    return {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_resnet_at_batch_2_gets_tl401_on_every_batchnorm() -> None:
    module = load("hf_resnet")
    model = module.build_model()
    norms = batchnorm_names(model)
    batch = 2
    assert batch < threshold("TL401", "min_batch")
    report = api_check(module, model=model, batch=module.get_batch(batch))
    hits = by_code(report.findings, "TL401")
    assert {f.module for f in hits} == norms, describe(hits)
    assert all(f.evidence["batch_size"] == batch for f in hits)
    assert all(f.severity == "warning" for f in hits)


def test_resnet_at_batch_2_through_the_cli() -> None:
    norms = batchnorm_names(load("hf_resnet").build_model())
    code, doc = cli_check("hf_resnet", "--batch-size", "2")
    hits = by_code(doc["findings"], "TL401")
    assert code == 1
    assert {f["module"] for f in hits} == norms, describe(hits)


def gelu_dead_units(model: nn.Module, act: nn.Module, inputs: dict) -> tuple[int, int]:
    """(dead units, units) of ``act``'s output on ``inputs``, computed directly: a unit is dead
    when its |output| stays at or below the GELU activity level for every token."""
    seen = []
    handle = act.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    peak = seen[0].abs().reshape(-1, seen[0].shape[-1]).amax(dim=0)
    return int((peak <= GELU_ACTIVE_LEVEL).sum()), peak.numel()


def test_gpt2_mlp_bias_minus_10_gets_tl101_on_its_activation() -> None:
    module = load("hf_gpt2")
    model = module.build_model()
    block = model.transformer.h[0].mlp
    with torch.no_grad():
        block.c_fc.bias.fill_(-10.0)
    inputs = module.get_batch()
    dead, units = gelu_dead_units(model, block.act, inputs)
    assert dead / units >= threshold("TL101", "dead_fraction")

    report = api_check(module, model=model, batch=inputs)
    hits = by_code(report.findings, "TL101")
    assert [f.module for f in hits] == ["transformer.h.0.mlp.act"], describe(hits)
    assert hits[0].evidence["units"] == units
    assert hits[0].evidence["dead_units"] == dead
    # The untouched block stays healthy.
    assert not [f for f in report.findings if f.module.startswith("transformer.h.1.")]
