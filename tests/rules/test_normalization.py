"""TL401 and TL404 on hand-built traces, at the edges of their thresholds."""

from __future__ import annotations

import re

from trainlint.rules.normalization import SMALL_SHARE

from trainlint.engine import RULES, Selection, load_rules, run_rules, set_thresholds
from trainlint.trace import Location, ModuleFacts, RunTrace

load_rules()


def bn(name: str, batch: int, *, channels: int = 48, spatial: int = 8 * 8,
       type_: str = "BatchNorm2d", training: bool = True) -> ModuleFacts:
    """A BatchNorm that saw one training-mode call at ``batch``."""
    shape = (batch, channels) + ((8, 8) if spatial > 1 else ())
    facts = ModuleFacts(name=name, type=type_, training=training, is_leaf=True,
                        location=Location("model.py", 7), attrs={"num_features": channels})
    if training:
        facts.values_per_channel.append(batch * spatial)
        facts.batch_sizes.append(batch)
        facts.input_shapes.append(shape)
    return facts


def trace_of(*modules: ModuleFacts, world_size: int = 1) -> RunTrace:
    return RunTrace(modules={m.name: m for m in modules}, world_size=world_size)


def run(code: str, trace: RunTrace, **overrides: object) -> list:
    selection = Selection(select={code})
    if overrides:
        set_thresholds(selection, {code: overrides})
    findings, _ = run_rules(trace, selection)
    return findings


def test_tl401_at_the_edges_of_min_batch() -> None:
    m = RULES["TL401"].defaults["min_batch"]
    assert run("TL401", trace_of(bn("bn", m))) == []
    assert run("TL401", trace_of(bn("bn", m + 1))) == []
    [below] = run("TL401", trace_of(bn("bn", m - 1)))
    assert below.module == "bn" and below.severity == "warning"
    assert below.location == Location("model.py", 7)
    assert below.evidence["batch_size"] == m - 1 and below.evidence["threshold"] == m
    assert f"batches of {m - 1} sample" in below.message and f"threshold {m}" in below.message


def _epochs(*runs: tuple) -> RunTrace:
    """A BatchNorm observed over steps whose batches come as ``runs`` of (batch, steps)."""
    facts = bn("bn", min(batch for batch, _ in runs))
    facts.batch_sizes = sorted({batch for batch, _ in runs})
    facts.batch_runs = [list(run) for run in runs]
    return trace_of(facts)


def test_tl401_a_small_batch_alone_between_full_ones_is_an_epochs_last() -> None:
    """DataLoader(drop_last=False): 1024 + 10 samples at batch 64 give one step of 10 every 17
    (a CNN trained to eval accuracy 1.0, as without it). Small at two observed steps in a row
    (the batch dropping to 2 from step 300 of 600), at every one, or at two or more that are
    SMALL_SHARE of them is judged (batch 2 at every third step: accuracy 0.80 against 0.88)."""
    m = RULES["TL401"].defaults["min_batch"]
    assert run("TL401", _epochs((64, 16), (10, 1), (64, 16), (10, 1), (64, 3))) == []
    [in_a_row] = run("TL401", _epochs((64, 16), (10, 2), (64, 16)))
    assert in_a_row.evidence["batch_size"] == 10 and in_a_row.evidence["small_steps"] == 2
    assert "at 2 of 34 observed steps" in in_a_row.message
    [neighbours] = run("TL401", _epochs((64, 9), (10, 1), (2, 1), (64, 9)))
    assert neighbours.evidence["batch_size"] == 2
    share = round(1 / SMALL_SHARE)  # two small ones in 2 * share observed steps
    [often] = run("TL401", _epochs((64, share - 1), (m - 1, 1), (64, share - 1), (m - 1, 1)))
    assert often.evidence["small_steps"] == 2 and often.evidence["observed_steps"] == 2 * share
    assert run("TL401", _epochs((64, share), (m - 1, 1), (64, share - 1), (m - 1, 1))) == []
    assert run("TL401", _epochs((64, 1), (2, 1))) == []  # one in two: too few to tell
    assert run("TL401", _epochs((64, 16), (m, 4))) == []
    [every] = run("TL401", _epochs((m - 1, 3)))
    assert "observed steps" not in every.message
    [once] = run("TL401", _epochs((m - 1, 1)))
    assert once.evidence["small_steps"] == 1


def test_tl401_fix_is_a_groupnorm_that_divides_the_channels() -> None:
    for channels in (48, 64, 30, 16, 7):
        [finding] = run("TL401", trace_of(bn("bn", 2, channels=channels)))
        groups, c = map(int, re.search(r"nn\.GroupNorm\((\d+), (\d+)\)", finding.fix).groups())
        assert c == channels and channels % groups == 0
        assert groups <= 32 and channels // groups >= 2  # not InstanceNorm in disguise
    [features] = run("TL401", trace_of(bn("bn", 2, channels=32, spatial=1,
                                          type_="BatchNorm1d")))
    assert "nn.LayerNorm(32)" in features.fix


def test_tl401_on_a_frozen_batchnorm_in_training_mode_says_eval_first() -> None:
    """A fine-tuned backbone frozen with requires_grad_(False) but left in training mode at
    batch 2: its BatchNorm still normalizes with the batch (measured: val acc 0.275, against
    0.309 with it in eval). The fix names eval mode first; a trainable one keeps GroupNorm."""
    from trainlint.trace import ParamTrace

    for trainable in (False, True):
        trace = trace_of(bn("backbone.1", 2))
        trace.params = [ParamTrace(f"backbone.1.{n}", "backbone.1", (48,), trainable, True,
                                   norm=1.0, std=0.0, grad_norm=None)
                        for n in ("weight", "bias")]
        [finding] = run("TL401", trace)
        assert finding.fix.startswith("its parameters are frozen") is not trainable
        assert ("model.get_submodule('backbone.1').eval()" in finding.fix) is not trainable
        assert "nn.GroupNorm" in finding.fix


def test_tl401_distributed_run_suggests_syncbatchnorm() -> None:
    m = RULES["TL401"].defaults["min_batch"]
    [finding] = run("TL401", trace_of(bn("bn", 4), world_size=m))
    assert "SyncBatchNorm" in finding.fix and finding.evidence["global_batch"] == 4 * m
    [alone] = run("TL401", trace_of(bn("bn", 4)))
    assert "SyncBatchNorm" not in alone.fix


def test_tl401_ignores_eval_mode_and_single_values() -> None:
    assert run("TL401", trace_of(bn("bn", 2, training=False))) == []
    assert run("TL401", trace_of(bn("bn", 1, spatial=1, type_="BatchNorm1d"))) == []


def test_tl401_threshold_override() -> None:
    m = RULES["TL401"].defaults["min_batch"]
    assert run("TL401", trace_of(bn("bn", m - 1)), min_batch=m - 1) == []
    assert len(run("TL401", trace_of(bn("bn", m)), min_batch=m + 1)) == 1
    selection = Selection(select={"TL401"})
    set_thresholds(selection, {"batchnorm-small-batch": {"min_batch": 2}})
    assert run_rules(trace_of(bn("bn", 4)), selection)[0] == []


def test_tl404_one_value_per_channel_is_an_error() -> None:
    [one] = run("TL404", trace_of(bn("bn", 1, spatial=1, type_="BatchNorm1d", channels=64)))
    assert one.severity == RULES["TL404"].severity == "error" and one.module == "bn"
    assert "nn.LayerNorm(64)" in one.fix and "drop_last=True" in one.fix
    assert run("TL404", trace_of(bn("bn", 2, spatial=1, type_="BatchNorm1d"))) == []
    assert run("TL404", trace_of(bn("bn", 1))) == []  # one image, but 64 values per channel


def test_tl404_from_the_error_pytorch_raised() -> None:
    failed = bn("net.bn", 1, spatial=1, type_="BatchNorm1d", channels=16)
    trace = trace_of(bn("other", 32), failed)
    trace.errors.append({"module": "net.bn", "phase": "forward", "kind": "batchnorm-single-value",
                         "message": "Expected more than 1 value per channel when training"})
    findings = run("TL404", trace)
    assert [f.module for f in findings] == ["net.bn"]
    trace.errors[0]["kind"] = "something-else"
    failed.values_per_channel.clear()
    assert run("TL404", trace) == []
