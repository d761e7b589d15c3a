"""TrainlintCallback inside a real lightning.Trainer (CPU, a few batches)."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainlint.engine import RULES, load_rules
from trainlint.integrations.lightning import TrainlintCallback
from trainlint.monitor import RunFailed

from ._models import WIDTH, dead_relu_net

BATCH = 16
VAL_BATCH = 5
BATCHES = 4


class DeadReluModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = dead_relu_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch)


def fit(callback: TrainlintCallback, tmp_path, **kwargs) -> L.Trainer:
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
                        callbacks=[callback], **kwargs)
    trainer.fit(DeadReluModule(), loader(BATCH * BATCHES, BATCH), loader(10, VAL_BATCH))
    return trainer


def test_dead_relu_reported_and_logged(tmp_path, capsys):
    load_rules()
    callback = TrainlintCallback(every=2)
    trainer = fit(callback, tmp_path, val_check_interval=2, num_sanity_val_steps=1)
    report = callback.report
    assert report is not None and callback.monitor is None  # reported, hooks removed
    assert report.trace.observed_steps == BATCHES // 2
    dead = [f for f in report.findings if f.code == "TL101"]
    assert [f.module for f in dead] == ["net.3"]
    assert dead[0].evidence["dead_fraction"] >= RULES["TL101"].defaults["dead_fraction"]
    # Only training batches were observed: validation (5 samples a batch, run between
    # training batches and before training) would add rows of another size.
    layer = next(lt for lt in report.trace.layers if lt.module == "net.1")
    assert layer.activation.count == report.trace.observed_steps * BATCH * WIDTH
    assert "TL101" in capsys.readouterr().out
    assert not any(h for m in trainer.lightning_module.modules()
                   for h in (m._forward_hooks, m._forward_pre_hooks))

    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("trainlint/net.3/dead_fraction")]
    assert [int(r["step"]) for r in logged] == [0, 2]
    assert all(float(r["trainlint/net.3/dead_fraction"]) == 1.0 for r in logged)
    healthy = RULES["TL101"].defaults["dead_fraction"]
    assert all(float(r["trainlint/net.1/dead_fraction"]) < healthy for r in logged)
    step_std = report.trace.per_step[-1]["layers"]
    key = next(k for k in step_std if k[0] == "net.0")
    assert float(logged[-1]["trainlint/net.0/act_std"]) == pytest.approx(step_std[key]["std"])


def test_logged_at_the_optimizer_step_under_gradient_accumulation(tmp_path):
    callback = TrainlintCallback(every=1, verbose=False)
    trainer = fit(callback, tmp_path, accumulate_grad_batches=2, num_sanity_val_steps=0)
    assert trainer.global_step == BATCHES // 2
    with open(f"{trainer.logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [int(r["step"]) for r in rows if r.get("trainlint/net.3/dead_fraction")]
    assert logged == [0, 1]  # batches 0-1 and 2-3: the first and the second optimizer step


class LossRecordingModule(DeadReluModule):
    """Keeps the loss each training_step computes."""

    def __init__(self) -> None:
        super().__init__()
        self.computed: list = []

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.computed.append(float(loss))
        return loss


class SlowLossRecordingModule(LossRecordingModule):
    """Adam at a learning rate far too small (TL503); the second ReLU revived (the bias of the
    Linear feeding it back at 0), so gradients reach every weight."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[2].bias.zero_()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-9)


def fit_epoch(callback: TrainlintCallback, module: L.LightningModule, accumulate: int = 1,
              batches: int = BATCHES) -> None:
    """One epoch of ``batches`` batches, ``accumulate`` batches to an optimizer step."""
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, logger=False,
                        callbacks=[callback], accumulate_grad_batches=accumulate)
    trainer.fit(module, loader(BATCH * batches, BATCH))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_losses_read_are_those_training_step_computed(tmp_path, accumulate):
    """Under gradient accumulation Lightning hands on_train_batch_end the loss divided by
    accumulate_grad_batches: the first loss would read N times too small (TL302, TL603).
    An observed step's loss is its last batch's; its window's mean counts every batch."""
    callback = TrainlintCallback(every=1, verbose=False)
    module = LossRecordingModule()
    fit_epoch(callback, module, accumulate)
    computed = module.computed
    trace = callback.report.trace
    assert trace.losses == pytest.approx(computed[accumulate - 1::accumulate], rel=1e-6)
    windows = [computed[i:i + accumulate] for i in range(0, len(computed), accumulate)]
    assert [s["loss_mean"] for s in trace.per_step] == pytest.approx(
        [sum(w) / len(w) for w in windows], rel=1e-6)
    assert [s["loss_max"] for s in trace.per_step] == pytest.approx(
        [max(w) for w in windows], rel=1e-6)


@pytest.mark.parametrize("accumulate, batches, every, observed", [
    (2, 8, 2, [(0, 1), (4, 5)]),
    (4, 8, 1, [(0, 3), (4, 7)]),
    (3, 8, 2, [(0, 2), (6, 7)]),  # the epoch's last window is short: Lightning steps there
])
def test_every_counts_optimizer_steps_under_gradient_accumulation(accumulate, batches, every,
                                                                  observed):
    """accumulate_grad_batches=N with ``every`` a multiple of N (the default 100 with N=2 or 4):
    no observed batch held an optimizer step, and TL503 was skipped for the whole run. An
    observed step is the accumulation window that ends in the optimizer step."""
    callback = TrainlintCallback(every=every, verbose=False)
    torch.manual_seed(0)
    module = SlowLossRecordingModule()
    fit_epoch(callback, module, accumulate, batches)
    report = callback.report
    trace = report.trace
    assert trace.observed_steps == len(observed)
    assert trace.losses == pytest.approx([module.computed[last] for _, last in observed],
                                         rel=1e-6)
    layer = next(lt for lt in trace.layers if lt.module == "net.1")
    assert layer.activation.count == sum(b - a + 1 for a, b in observed) * BATCH * WIDTH
    weights = [p for p in trace.params if p.name.endswith("weight")]
    assert weights and all(p.update_ratios for p in weights)
    assert "TL503" not in report.skipped
    assert "TL503" in {f.code for f in report.findings}


def test_fail_on_stops_a_doomed_run_early(tmp_path):
    callback = TrainlintCallback(every=1, fail_on="warning", verbose=False)
    with pytest.raises(RunFailed) as failed:
        fit(callback, tmp_path)
    assert "TL101" in str(failed.value)
    assert callback.report is failed.value.report
    assert callback.report.trace.observed_steps == 1  # stopped at the first batch
    assert callback.monitor is None


def test_fail_on_error_lets_warnings_through(tmp_path):
    callback = TrainlintCallback(every=1, fail_on="error", verbose=False)
    trainer = fit(callback, tmp_path)
    assert trainer.global_step == BATCHES
    assert any(f.code == "TL101" for f in callback.report.findings)
    assert not callback.report.failing("error")


def test_an_unknown_submodule_is_a_config_error(tmp_path):
    from trainlint.errors import ConfigError

    with pytest.raises(ConfigError, match=r"module='nope'.*children: \['net'\]"):
        fit(TrainlintCallback(module="nope"), tmp_path, num_sanity_val_steps=0)


class SoftmaxTwiceModule(DeadReluModule):
    """Ends in a softmax and trains with cross_entropy, which applies it again."""

    def __init__(self, probabilities: bool) -> None:
        super().__init__()
        self.probabilities = probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.softmax(dim=1) if self.probabilities else out


@pytest.mark.parametrize("probabilities", [True, False])
def test_softmax_twice_is_read_off_the_loss_lightning_hands_over(tmp_path, probabilities):
    """on_train_batch_end gets the loss detached: its kind comes from on_before_backward."""
    callback = TrainlintCallback(every=1, verbose=False)
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, logger=False,
                        callbacks=[callback])
    trainer.fit(SoftmaxTwiceModule(probabilities), loader(BATCH * BATCHES, BATCH))
    assert callback.report.trace.loss_kind == "cross_entropy"
    assert ("TL601" in {f.code for f in callback.report.findings}) == probabilities


class DictSoftmaxModule(DeadReluModule):
    """Returns ``{"features", "probs"}``; cross_entropy reads the second, a softmax's output."""

    def __init__(self) -> None:
        super().__init__()
        self.act = torch.nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"features": self.net[:2](x), "probs": self.act(self.net(x))}

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x)["probs"], y)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_output_the_loss_reads_is_found_in_every_batch_of_a_window(accumulate):
    """An observed step of several batches: the output the loss reads is put first for the
    last batch's forward too (the rules read that one), so TL601 finds the softmax."""
    callback = TrainlintCallback(every=1, verbose=False)
    torch.manual_seed(0)
    fit_epoch(callback, DictSoftmaxModule(), accumulate)
    assert [f.module for f in callback.report.findings if f.code == "TL601"] == ["act"]


class TwoOptimizerModule(DeadReluModule):
    """Manual optimization with two optimizers, each stepping part of the network (as SparseAdam
    and Adam, or Muon and AdamW, do)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        first, rest = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        first.zero_grad()
        rest.zero_grad()
        self.manual_backward(loss)
        first.step()
        rest.step()
        return loss

    def configure_optimizers(self) -> list:
        layers = list(self.net)
        return [torch.optim.SGD(layers[0].parameters(), lr=0.01),
                torch.optim.Adam([p for m in layers[1:] for p in m.parameters()], lr=1e-3)]


@pytest.mark.parametrize("module", [None, "net"])
def test_several_optimizers_of_the_watched_module_are_all_hooked(tmp_path, module):
    callback = TrainlintCallback(every=1, verbose=False, module=module)
    torch.manual_seed(0)
    fit_epoch(callback, TwoOptimizerModule())
    report = callback.report
    assert "TL506" not in {f.code for f in report.findings}
    weights = [p for p in report.trace.params if p.name.endswith("weight")]
    assert weights and all(p.in_optimizer and p.update_ratios for p in weights)
    assert {p.group for p in weights} == {0, 1}


class GanModule(L.LightningModule):
    """Lightning's GAN recipe: manual optimization, the discriminator's step, then the
    generator's, each after a backward of its own; training_step returns the generator's
    loss."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
                                             torch.nn.Linear(16, 8))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(8, 16),
                                                 torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 1))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        g_opt, d_opt = self.optimizers()
        real, _ = batch
        fake = self.generator(torch.randn(real.shape[0], 4))
        d_loss = (F.softplus(-self.discriminator(real)).mean()
                  + F.softplus(self.discriminator(fake.detach())).mean())
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = F.softplus(-self.discriminator(fake)).mean()
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        return g_loss

    def configure_optimizers(self) -> list:
        return [torch.optim.Adam(self.generator.parameters(), lr=2e-4),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-4)]


@pytest.mark.parametrize("module", [None, "discriminator", "generator"])
def test_a_gans_generator_loss_level_is_not_judged_whatever_is_watched(module):
    """With both networks watched, or the discriminator alone (whose loss graph read first is
    the discriminator's, while the loss returned is the generator's), the level of the loss
    returned shows how the two compete: TL603 must not call it 'not learning'."""
    callback = TrainlintCallback(every=1, verbose=False, module=module)
    torch.manual_seed(0)
    fit_epoch(callback, GanModule(), batches=8)
    report = callback.report
    assert report.trace.alternating or report.trace.foreign_params
    assert "compete" in report.skipped["TL603"]
    cooperative = TrainlintCallback(every=1, verbose=False)
    fit_epoch(cooperative, TwoOptimizerModule())
    assert not cooperative.report.trace.alternating


def test_a_watched_generator_gets_its_own_optimizer_not_the_discriminators():
    from trainlint.integrations.lightning import _optimizers_of

    generator, discriminator = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    g_opt = torch.optim.Adam(generator.parameters())
    d_opt = torch.optim.Adam(discriminator.parameters())
    assert _optimizers_of(generator, [g_opt, d_opt]) == [g_opt]
    assert _optimizers_of(generator, [g_opt]) is g_opt
    assert _optimizers_of(generator, []) is None


class NoLossReturnedModule(DeadReluModule):
    """Manual optimization whose training_step steps the optimizer and returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        opt.step()


def test_a_training_step_that_returns_no_loss_is_told_to_return_it(tmp_path):
    callback = TrainlintCallback(every=1, verbose=False)
    torch.manual_seed(0)
    fit_epoch(callback, NoLossReturnedModule())
    report = callback.report
    assert report.trace.losses == []
    for code in ("TL603", "TL604"):
        assert "training_step returned no loss" in report.skipped[code]
        assert "monitor.step(loss)" not in report.skipped[code]
