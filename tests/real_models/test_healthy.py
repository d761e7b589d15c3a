"""Healthy real architectures at sensible settings: no warning and no error, via the API and
the CLI. Each run must also have observed what the rules judge (so silence means something)."""

from __future__ import annotations

import math

import pytest
import torch.nn as nn

from .harness import (
    ARCHITECTURES,
    FAILING,
    MODELS,
    api_check,
    cli_check,
    describe,
    load,
    threshold,
)

# The activation family each architecture's hidden layers use (None: inside nn.LSTM's or
# nn.GRU's kernel).
ACTIVATION_KIND = {
    "hf_bert": "gelu", "hf_distilbert": "gelu", "hf_gpt2": "gelu", "hf_t5": "relu",
    "hf_vit": "gelu", "hf_resnet": "relu", "hf_convnext": "gelu", "hf_mobilenet_v2": "relu",
    "hf_regnet": "relu", "hf_segformer": "gelu", "hf_llama": "gelu", "hf_swin": "gelu",
    "hf_whisper": "gelu", "hf_modernbert": "gelu",
    "torch_transformer": "gelu", "torch_lstm_lm": None, "torch_gru_lm": None,
    "torch_densenet": "relu",
}
BATCHNORM_MODELS = ("hf_resnet", "hf_mobilenet_v2", "hf_regnet", "torch_densenet")


def test_every_architecture_has_a_model_file() -> None:
    files = {p.stem for p in MODELS.glob("*.py") if not p.stem.startswith("_")}
    assert set(ARCHITECTURES) == files == set(ACTIVATION_KIND)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_api_reports_no_warning_or_error(name: str) -> None:
    module = load(name)
    model = module.build_model()
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    report = api_check(module, model=model)
    bad = [f for f in report.findings if f.severity in FAILING]
    assert not bad, f"{name} is healthy, yet:\n{describe(bad)}"
    assert report.ok

    trace = report.trace
    assert trace.observed_steps == 3
    assert len(trace.losses) == 3 and all(math.isfinite(x) for x in trace.losses)
    assert all(p.grad_norm is not None for p in trace.params if p.requires_grad)
    assert any(p.update_ratios for p in trace.params), "no optimizer update was measured"
    kind = ACTIVATION_KIND[name]
    if kind is not None:
        units = [lt for lt in trace.layers if lt.kind == kind and lt.unit_ever_active is not None]
        assert units, f"no {kind} activation of {name} was observed"
    assert bool(norms) == (name in BATCHNORM_MODELS)
    for n in norms:  # TL401 saw every BatchNorm's batch, and it is one TL401 accepts
        sizes = trace.modules[n].batch_sizes
        assert sizes and min(sizes) >= threshold("TL401", "min_batch")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cli_reports_no_warning_or_error(name: str) -> None:
    code, doc = cli_check(name)
    bad = [f for f in doc["findings"] if f["severity"] in FAILING]
    assert not bad, f"{name} is healthy, yet:\n{describe(bad)}"
    assert code == 0
    assert doc["summary"]["error"] == doc["summary"]["warning"] == 0
    assert doc["run"]["steps"] == 3
    assert doc["layers"], "the CLI report lists no layer"
