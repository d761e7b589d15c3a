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
    when its output is never positive nor below minus the GELU activity level."""
    seen = []
    handle = act.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    rows = seen[0].reshape(-1, seen[0].shape[-1])
    dead = (rows.amax(dim=0) <= 0) & (rows.amin(dim=0) >= -GELU_ACTIVE_LEVEL)
    return int(dead.sum()), dead.numel()


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


def test_vit_on_raw_pixels_gets_tl201_with_the_measured_channel_stats() -> None:
    module = load("hf_vit")
    images, labels = module.get_batch()
    raw = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0)).float()
    report = api_check(module, batch=(raw, labels))
    hits = by_code(report.findings, "TL201")
    assert len(hits) == 1, describe(report.findings)
    evidence = hits[0].evidence
    assert hits[0].module == "" and evidence["input"] == "input0"
    mean = raw.double().mean(dim=(0, 2, 3))
    std = raw.double().permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(torch.tensor(evidence["mean"], dtype=torch.float64), mean, rtol=1e-6)
    assert torch.allclose(torch.tensor(evidence["std"], dtype=torch.float64), std, rtol=1e-6)
    assert evidence["max_abs_mean"] > threshold("TL201", "max_abs_mean")


def sgd_lr_10(params):
    return torch.optim.SGD(params, lr=10.0, momentum=0.9)


def direct_update_ratios(module, steps: int = 3) -> dict:
    """‖Δw‖/‖w before‖ of every weight matrix/kernel at each of ``steps`` SGD(lr=10) steps on
    the ResNet, computed with a plain training loop."""
    model = module.build_model().train()
    optimizer = sgd_lr_10(model.parameters())
    images, labels = module.get_batch()
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    ratios: dict = {n: [] for n in weights}
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in weights.items()}
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images).logits, labels).backward()
        optimizer.step()
        for n, p in weights.items():
            ratios[n].append(float((p.detach() - before[n]).norm() / before[n].norm()))
    return ratios


def test_resnet_at_learning_rate_10_gets_tl503_on_the_weights_it_blows_up() -> None:
    module = load("hf_resnet")
    report = api_check(module, optimizer=sgd_lr_10)
    direct = direct_update_ratios(module)
    measured = {p.name: p.update_ratios for p in report.trace.params if p.name in direct}
    assert measured.keys() == direct.keys()
    for name, ratios in direct.items():
        # Estimated on 4096 of the weight's elements: a few % off, never a layout bias.
        assert torch.allclose(torch.tensor(measured[name]), torch.tensor(ratios), rtol=0.1), name

    hits = [f for f in by_code(report.findings, "TL503") if f.evidence["direction"] == "high"]
    assert len(hits) == 1, describe(report.findings)
    limit = threshold("TL503", "max_ratio")
    always_high = {n for n, r in direct.items() if min(r) > limit}
    flagged = set(hits[0].evidence["params"])
    assert always_high and always_high <= flagged
    assert all(max(direct[n]) > limit for n in flagged)
    assert hits[0].evidence["lr_factor"] < 1


def test_softmax_output_into_cross_entropy_gets_tl601_on_the_softmax() -> None:
    module = load("torch_transformer")
    model = nn.Sequential(module.build_model(), nn.Softmax(dim=-1))
    assert isinstance(module.loss_fn, nn.CrossEntropyLoss)
    report = api_check(module, model=model)
    hits = by_code(report.findings, "TL601")
    assert [(f.module, f.severity) for f in hits] == [("1", "error")], describe(report.findings)


def test_whisper_under_plain_sgd_gets_tl501_on_its_encoder() -> None:
    """The same Whisper that AdamW trains cleanly: its encoder gets ~1e-4 of the decoder's
    gradient through cross-attention over 1500 positions. Plain SGD moves the encoder's
    weights by that much less, so the fade shows in the updates too."""
    module = load("hf_whisper")
    report = api_check(module, optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    [hit] = by_code(report.findings, "TL501")
    assert hit.module.startswith("model.encoder."), describe(report.findings)
    assert hit.evidence["ratio"] < threshold("TL501", "min_ratio")
    assert hit.evidence["update_fade"] < threshold("TL501", "update_fade")
