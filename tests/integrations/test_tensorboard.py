"""Monitor(log_to=...): per-layer scalars after each observed step, read back from TensorBoard."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import trainlint
from trainlint.errors import ConfigError
from trainlint.sinks import make_sink, step_scalars

from ._models import dead_relu_net

STEPS = 4
EVERY = 2


def run(log_to, seen: dict) -> None:
    """Train the dead-ReLU net for STEPS steps, recording layer "0"'s output and its gradient
    at every step, as the reference the logged scalars must match."""
    torch.manual_seed(0)
    net = dead_relu_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def keep(module, args, out):
        seen.setdefault("act", []).append(out.detach().double())
        out.register_hook(lambda g: seen.setdefault("grad", []).append(g.double()))

    net[0].register_forward_hook(keep)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with trainlint.Monitor(net, opt, every=EVERY, log_to=log_to) as monitor:
        for _ in range(STEPS):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)


def test_summary_writer_event_file(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    seen: dict = {}
    run(writer, seen)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    observed = list(range(0, STEPS, EVERY))

    dead = events.Scalars("trainlint/3/dead_fraction")
    assert [e.step for e in dead] == observed
    assert all(e.value == 1.0 for e in dead)
    std = events.Scalars("trainlint/0/act_std")
    grad = events.Scalars("trainlint/0/grad_norm")
    for i, step in enumerate(observed):
        assert std[i].value == pytest.approx(seen["act"][step].std(unbiased=False).item(),
                                             rel=1e-5)
        assert grad[i].value == pytest.approx(seen["grad"][step].norm().item(), rel=1e-5)
    assert {"trainlint/loss", "trainlint/grad_norm", "trainlint/1/zero_fraction",
            "trainlint/4/act_mean"} <= set(tags)


def test_callable_and_list_sinks():
    calls: list = []
    seen: dict = {}
    run([lambda scalars, step: calls.append((step, scalars)), None], seen)
    assert [step for step, _ in calls] == list(range(0, STEPS, EVERY))
    assert calls[0][1]["trainlint/3/dead_fraction"] == 1.0


def test_lightning_style_logger():
    class Logger:
        def __init__(self) -> None:
            self.rows: list = []

        def log_metrics(self, metrics: dict, step: int) -> None:
            self.rows.append((step, metrics))

    logger = Logger()
    make_sink(logger)({"trainlint/loss": 1.5}, 7)
    assert logger.rows == [(7, {"trainlint/loss": 1.5})]


def test_step_scalars_names_and_nonfinite():
    info = {"layers": {("enc", "relu", 8): {"std": 1.0, "dead_fraction": 0.25},
                       ("", "output", None): {"mean": float("nan"), "grad_norm": 2.0}},
            "loss": float("inf"), "grad_norm": 3.0}
    assert step_scalars(info) == {"trainlint/enc:relu/act_std": 1.0,
                                  "trainlint/enc:relu/dead_fraction": 0.25,
                                  "trainlint/(model)/grad_norm": 2.0,
                                  "trainlint/grad_norm": 3.0}


def test_bad_sink_is_a_config_error():
    with pytest.raises(ConfigError, match="log_to"):
        trainlint.Monitor(torch.nn.Linear(2, 2), log_to=42)
