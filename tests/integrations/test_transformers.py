"""TrainlintCallback inside a real transformers.Trainer (CPU, a tiny random-init BERT)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from trainlint.engine import RULES, load_rules
from trainlint.integrations.transformers import TrainlintCallback
from trainlint.monitor import RunFailed

from ._models import DEAD_BIAS

BATCH = 8
STEPS = 4
DEAD = "bert.encoder.layer.0.intermediate.intermediate_act_fn"


def tiny_bert() -> BertForSequenceClassification:
    """A 2-layer BERT whose first feed-forward GELU is dead (its Linear's bias is -10)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        num_labels=3)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias.fill_(DEAD_BIAS)
    return model


def dataset(n: int = BATCH * STEPS, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (n, length), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def train(callback: TrainlintCallback, tmp_path) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             max_steps=STEPS, learning_rate=1e-4, report_to=[], use_cpu=True,
                             logging_strategy="no", save_strategy="no", disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset(),
                      callbacks=[callback])
    trainer.train()
    return trainer


def test_dead_gelu_reported(tmp_path, capsys):
    load_rules()
    logged: list = []
    callback = TrainlintCallback(every=2, log_to=lambda scalars, step: logged.append(step))
    trainer = train(callback, tmp_path)
    report = callback.report
    assert callback.monitor is None
    assert report.trace.observed_steps == STEPS // 2
    # The model's own loss, read off its graph: cross-entropy over the logits it returns.
    assert (report.trace.loss_kind, report.trace.loss_reads_output) == ("cross_entropy", True)
    assert logged == [0, 2]
    dead = [f for f in report.findings if f.code == "TL101"]
    assert [f.module for f in dead] == [DEAD]
    assert dead[0].evidence["dead_fraction"] >= RULES["TL101"].defaults["dead_fraction"]
    # The loss is the model's own .loss; gradients were read before Trainer zeroed them.
    assert len(report.trace.losses) == STEPS // 2
    assert all(math.isfinite(v) and v > 0 for v in report.trace.losses)
    trainable = [p for p in report.trace.params if p.requires_grad]
    assert trainable and all(p.grad_norm is not None for p in trainable)
    assert all(p.update_norm is not None for p in trainable)
    assert DEAD in capsys.readouterr().out
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trainer.model.modules())


def test_fail_on_stops_training(tmp_path):
    callback = TrainlintCallback(every=1, fail_on="warning", verbose=False)
    with pytest.raises(RunFailed) as failed:
        train(callback, tmp_path)
    assert DEAD in str(failed.value)
    assert callback.report.trace.observed_steps == 1
    assert callback.monitor is None


class _RaisesOnThirdLoss(Trainer):
    calls = 0

    def compute_loss(self, model, inputs, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 3:
            raise RuntimeError("a bug in compute_loss")
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_a_train_that_raises_leaves_hooks_that_close_or_the_next_train_takes_off(tmp_path):
    """Trainer tells callbacks nothing when train() raises: close() takes the hooks off, and
    a later train() with the same callback does before it starts."""
    def hooks(model) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             max_steps=STEPS, learning_rate=1e-4, report_to=[], use_cpu=True,
                             logging_strategy="no", save_strategy="no", disable_tqdm=True,
                             seed=0)
    callback = TrainlintCallback(every=1, verbose=False)
    trainer = _RaisesOnThirdLoss(model=tiny_bert(), args=args, train_dataset=dataset(),
                                 callbacks=[callback])
    with pytest.raises(RuntimeError, match="a bug in compute_loss"):
        trainer.train()
    assert hooks(trainer.model) > 0
    trainer.train()  # calls 4.. : no raise
    assert hooks(trainer.model) == 0 and callback.monitor is None
    with pytest.raises(RuntimeError):
        _RaisesOnThirdLoss.calls = 2
        trainer.train()
    callback.close()
    callback.close()
    assert hooks(trainer.model) == 0


def loud_gpt2() -> GPT2LMHeadModel:
    """A 1-layer GPT-2 without dropout whose tied embedding is 100x too large: its first
    loss is far above ln(vocab)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(100)
    return model


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_causal_lms_loss_over_num_items_in_batch_is_its_token_mean(tmp_path, accumulation):
    """Trainer passes num_items_in_batch: the model's loss is its tokens' summed cross-entropy
    over that count (of the whole accumulated batch). trainlint reads it as a mean (TL302
    judges the first loss) and records each step's per-token mean, the loss the same model
    returns without the count."""
    ids = torch.arange(12) * 5 % 64
    expected = float(loud_gpt2()(input_ids=ids[None].repeat(4, 1), labels=ids[None]
                                 .repeat(4, 1)).loss)  # every sample the same: every batch's
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulation, max_steps=2,
                             learning_rate=0.0, report_to=[], use_cpu=True,
                             logging_strategy="no", save_strategy="no", disable_tqdm=True,
                             seed=0)
    callback = TrainlintCallback(every=1, verbose=False)
    Trainer(model=loud_gpt2(), args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 16,
            callbacks=[callback]).train()
    trace = callback.report.trace
    assert (trace.loss_kind, trace.loss_reduction) == ("cross_entropy", "mean")
    assert len(trace.losses) == 2
    assert all(math.isclose(v, expected, rel_tol=1e-4) for v in trace.losses)
    load_rules()
    limits = RULES["TL302"].defaults  # the fixture's first loss is far above them
    assert expected > limits["max_ratio"] * math.log(64) + limits["min_excess"]
    assert "TL302" in {f.code for f in callback.report.findings}


@pytest.mark.parametrize("how", ["label_smoothing_factor", "compute_loss_func"])
def test_a_loss_trainer_computes_itself_is_explained_where_the_loss_rules_skip(tmp_path, how):
    """Trainer takes the labels from the model and computes the loss itself, showing
    callbacks none: the rules that need the loss say what happened and what to do, not
    'pass the loss to monitor.step(loss)', which a callback's user cannot."""
    def loss_func(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels)

    smoothing = {"label_smoothing_factor": 0.1} if how == "label_smoothing_factor" else {}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             max_steps=STEPS, learning_rate=1e-4, report_to=[], use_cpu=True,
                             logging_strategy="no", save_strategy="no", disable_tqdm=True,
                             seed=0, **smoothing)
    callback = TrainlintCallback(every=1, verbose=False)
    Trainer(model=tiny_bert(), args=args, train_dataset=dataset(), callbacks=[callback],
            compute_loss_func=None if smoothing else loss_func).train()
    report = callback.report
    assert report.trace.losses == [] and report.trace.loss_kind is None
    cause = "label_smoothing_factor=0.1" if smoothing else "compute_loss_func"
    for code in ("TL603", "TL604", "TL302", "TL601"):
        assert "the model returned no .loss" in report.skipped[code]
        assert cause in report.skipped[code]
        assert "pass the loss to monitor.step(loss)" not in report.skipped[code]


def test_an_observed_step_under_gradient_accumulation_holds_its_optimizer_step(tmp_path):
    """gradient_accumulation_steps=2, every=2: Trainer's on_step_begin fires at a window's
    first micro-batch and on_optimizer_step after its last, so an observed step covers the
    window, optimizer step included: update ratios are read (TL503 is judged)."""
    callback = TrainlintCallback(every=2, verbose=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=2, max_steps=STEPS,
                             learning_rate=1e-4, report_to=[], use_cpu=True,
                             logging_strategy="no", save_strategy="no", disable_tqdm=True,
                             seed=0)
    Trainer(model=tiny_bert(), args=args, train_dataset=dataset(BATCH * STEPS * 2),
            callbacks=[callback]).train()
    trace = callback.report.trace
    assert trace.observed_steps == STEPS // 2
    assert trace.batch_size == BATCH
    assert "TL503" not in callback.report.skipped
    trainable = [p for p in trace.params if p.requires_grad]
    assert trainable and all(p.update_norm is not None for p in trainable)
