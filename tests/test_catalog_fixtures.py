"""The rule catalog end to end: each fault fixture fires its rule at the right module, each
healthy twin and each standard healthy model stays clean, Monitor-only rules fire under a
Monitor, and every rule is listed and documented."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import trainlint
from tests.conftest import FIXTURES, fixture_run, run_cli
from trainlint.engine import RULES, load_rules

load_rules()

# fixture -> (code, modules the finding may name), checked through `trainlint check`.
FAULTS = {
    "sigmoid_hidden": ("TL105", {"1"}),
    "input_raw_pixels": ("TL201", {""}),
    "input_tiny_scale": ("TL201", {""}),
    "constant_channel": ("TL202", {""}),
    "init_scale_mismatch": ("TL301", {"4"}),
    "loss_at_init": ("TL302", {"2"}),
    "batchnorm_sequence": ("TL402", {"norm"}),
    "bias_before_norm": ("TL403", {"0", "3"}),
    "batchnorm_generator": ("TL405", {"1", "4"}),
    "dropout_before_batchnorm": ("TL406", {"2"}),
    "vanishing_gradients": ("TL501", {"0", "2", "4"}),  # the input side of the stack
    "exploding_gradients": ("TL502", {""}),
    "update_ratio_low": ("TL503", {""}),
    "update_ratio_high": ("TL503", {""}),
    "nonfinite": ("TL504", {"logfeat"}),
    "unused_parameters": ("TL505", {"aux_head"}),
    "parameters_not_in_optimizer": ("TL506", {"2"}),
    "double_softmax": ("TL601", {"3"}),
    "double_softmax_in_loss": ("TL601", {"2"}),
}
TWINS = {
    "sigmoid_hidden": "sigmoid_hidden_ok", "input_raw_pixels": "input_raw_pixels_ok",
    "input_tiny_scale": "input_bag_of_words_ok",
    "constant_channel": "constant_channel_ok", "init_scale_mismatch": "init_scale_mismatch_ok",
    "loss_at_init": "loss_at_init_ok", "batchnorm_sequence": "batchnorm_sequence_ok",
    "bias_before_norm": "bias_before_norm_ok", "batchnorm_generator": "batchnorm_generator_ok",
    "dropout_before_batchnorm": "dropout_before_batchnorm_ok",
    "vanishing_gradients": "vanishing_gradients_ok",
    "exploding_gradients": "exploding_gradients_ok", "update_ratio_low": "update_ratio_ok",
    "update_ratio_high": "update_ratio_ok", "nonfinite": "nonfinite_ok",
    "unused_parameters": "unused_parameters_ok",
    "parameters_not_in_optimizer": "parameters_not_in_optimizer_ok",
    "double_softmax": "double_softmax_ok",
    "double_softmax_in_loss": "double_softmax_in_loss_ok",
}
# Standard healthy models: nothing at all may fire on them, not even info.
HEALTHY = ["resnet_small", "transformer_classifier", "lstm_lm", "healthy_relu",
           "functional_relu"]
# Monitor-run faults: fixture -> (code, twin); each has train(model, optimizer, monitor, steps).
MONITOR_FAULTS = {
    "eval_mode_training": ("TL602", "eval_mode_training_ok"),
    "loss_not_decreasing": ("TL603", "loss_not_decreasing_ok"),
    "loss_divergence": ("TL604", "loss_divergence_ok"),
    "gradients_not_zeroed": ("TL502", "gradients_not_zeroed_ok"),
}
MONITOR_STEPS, MONITOR_EVERY = 45, 5


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_fires_at_the_right_module(name: str) -> None:
    code, modules = FAULTS[name]
    run = fixture_run(name)
    named = {f["module"] for f in run.doc["findings"] if f["code"] == code}
    assert named, f"{code} did not fire on fixtures/{name}.py"
    assert named <= modules
    if RULES[code].severity != "info":
        assert run.exit_code == 1


@pytest.mark.parametrize("name", sorted(set(TWINS.values())))
def test_healthy_twin_is_clean(name: str) -> None:
    run = fixture_run(name)
    assert run.exit_code == 0
    assert run.doc["findings"] == []


@pytest.mark.parametrize("name", HEALTHY)
def test_standard_healthy_model_is_clean(name: str) -> None:
    run = fixture_run(name)
    assert run.exit_code == 0
    assert run.doc["findings"] == []


def _fixture(name: str):
    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    return importlib.import_module(name)


def _monitor_run(name: str) -> trainlint.Report:
    torch.manual_seed(0)
    fixture = _fixture(name)
    model = fixture.build_model()
    optimizer = fixture.build_optimizer(model.parameters())
    with trainlint.Monitor(model, optimizer, every=MONITOR_EVERY) as monitor:
        fixture.train(model, optimizer, monitor, MONITOR_STEPS)
        return monitor.report()


@pytest.mark.parametrize("name", sorted(MONITOR_FAULTS))
def test_monitor_fault_fires_and_its_twin_is_clean(name: str) -> None:
    code, twin = MONITOR_FAULTS[name]
    fault = _monitor_run(name)
    assert [f.module for f in fault.findings if f.code == code] == [""]
    healthy = _monitor_run(twin)
    assert [f for f in healthy.findings if f.severity != "info"] == []


def test_divergence_in_a_check_run():
    run = fixture_run("nonfinite")
    [finding] = [f for f in run.doc["findings"] if f["code"] == "TL604"]
    assert finding["evidence"]["step"] == 0


def test_notes_say_which_rules_a_check_cannot_run():
    notes = fixture_run("healthy_relu").doc["run"]["notes"]
    for code in ("TL602", "TL603"):
        assert any(note.startswith(f"{code} ") and "not checked" in note for note in notes)


# SPEC section 4 (25 codes; the "24" miscounts the table).
CATALOG = {"TL101", "TL102", "TL103", "TL104", "TL105", "TL201", "TL202", "TL301", "TL302",
           "TL401", "TL402", "TL403", "TL404", "TL405", "TL406", "TL501", "TL502", "TL503",
           "TL504", "TL505", "TL506", "TL601", "TL602", "TL603", "TL604"}


def test_rules_lists_the_whole_catalog():
    run = run_cli(["rules"])
    assert run.exit_code == 0
    listed = {line.split()[0] for line in run.stdout.splitlines() if line.startswith("TL")}
    assert set(RULES) == CATALOG
    assert listed == CATALOG


@pytest.mark.parametrize("code", sorted(RULES))
def test_every_rule_page_has_the_four_sections(code: str) -> None:
    run = run_cli(["rule", code])
    assert run.exit_code == 0
    for section in ("## What it does", "## Why is this bad?", "## Example", "## Fix"):
        assert section in run.stdout
    for name in RULES[code].defaults:
        assert name in run.stdout
