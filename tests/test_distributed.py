"""Monitor under torch.distributed: two real processes (gloo, CPU) training a
DistributedDataParallel model must report what one process sees on the whole batch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import trainlint
from trainlint.distributed import merge_inputs, reduce_values, unwrap
from trainlint.engine import RULES, load_rules
from trainlint.errors import ConfigError

WORLD = 2
PER_DEVICE = 8
STEPS = 2


def mlp() -> nn.Sequential:
    """An MLP whose first ReLU has just over TL101's share of units that never fire."""
    load_rules()
    dead = int(np.ceil(RULES["TL101"].defaults["dead_fraction"] * 32)) + 1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 4))
    with torch.no_grad():
        net[0].bias[:dead] = -100.0
    return net


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def bn_per_device() -> int:
    """A per-device batch below TL401's min_batch whose global batch over WORLD reaches it."""
    load_rules()
    min_batch = RULES["TL401"].defaults["min_batch"]
    per_device = -(-min_batch // WORLD)
    assert per_device < min_batch <= per_device * WORLD
    return per_device


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g) * 3 + 1, torch.randn(n, 4, generator=g)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS,
          **kwargs) -> trainlint.Report:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trainlint.Monitor(model, opt, every=1, **kwargs) as monitor:
        for _ in range(steps):
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
        return monitor.report()


def summary(report: trainlint.Report) -> dict:
    """Plain numbers of a report, picklable across processes."""
    trace = report.trace
    return {
        "layers": {(lt.module, lt.op): {
            "count": lt.activation.count, "mean": lt.activation.mean, "std": lt.activation.std,
            "min": lt.activation.min, "max": lt.activation.max,
            "zero_fraction": lt.activation.zero_fraction, "grad_norm": lt.grad_norm,
            "ever_active": None if lt.unit_ever_active is None
            else lt.unit_ever_active.tolist()} for lt in trace.layers},
        "params": {p.name: (p.norm, p.grad_norm) for p in trace.params},
        "inputs": [(i.shape, i.mean.tolist(), i.std.tolist(), i.min.tolist(), i.max.tolist())
                   for i in trace.inputs],
        "losses": list(trace.losses),
        "findings": [(f.code, f.module, f.fix, f.evidence) for f in report.findings],
        "batch": (trace.batch_size, trace.world_size, trace.global_batch_size),
    }


def worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=WORLD)
    try:
        shard = slice(rank * PER_DEVICE, (rank + 1) * PER_DEVICE)
        x, y = data(WORLD * PER_DEVICE)
        logged: list = []
        ddp = nn.parallel.DistributedDataParallel(mlp())
        result = {"mlp": summary(train(ddp, x[shard], y[shard],
                                       log_to=lambda scalars, step: logged.append(step)))}
        result["logged"] = logged
        result["hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                              for m in ddp.modules())
        per_device = bn_per_device()
        x, y = data(WORLD * per_device)
        shard = slice(rank * per_device, (rank + 1) * per_device)
        bn = nn.parallel.DistributedDataParallel(bn_net())
        result["bn"] = summary(train(bn, x[shard], y[shard], steps=1))
        with open(f"{tmp}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(result, fh)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(tmp),), nprocs=WORLD, join=True)
    out = []
    for rank in range(WORLD):
        with open(tmp / f"rank{rank}.pkl", "rb") as fh:
            out.append(pickle.load(fh))
    return out


def test_statistics_equal_one_process_on_the_whole_batch(ranks):
    reference = summary(train(mlp(), *data(WORLD * PER_DEVICE)))
    got = ranks[0]["mlp"]
    assert got["layers"].keys() == reference["layers"].keys()
    for key, expected in reference["layers"].items():
        layer = got["layers"][key]
        assert layer["count"] == expected["count"], key
        assert layer["ever_active"] == expected["ever_active"], key
        for name in ("mean", "std", "min", "max", "zero_fraction", "grad_norm"):
            if expected[name] is None:  # an activation's gradient: not read
                assert layer[name] is None, (key, name)
                continue
            assert layer[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), (key, name)
    for name, (norm, grad) in reference["params"].items():
        assert got["params"][name] == pytest.approx((norm, grad), rel=1e-5), name
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    for mine, theirs in zip(got["inputs"], reference["inputs"]):
        assert mine[0] == theirs[0]
        for a, b in zip(mine[1:], theirs[1:]):
            assert np.allclose(a, b, rtol=1e-6, atol=1e-9)
    dead = [f for f in got["findings"] if f[0] == "TL101"]
    assert [f[1] for f in dead] == ["1"]
    expected = [f for f in reference["findings"] if f[0] == "TL101"]
    assert [f[3]["dead_units"] for f in dead] == [f[3]["dead_units"] for f in expected]
    assert got["batch"] == (PER_DEVICE, WORLD, WORLD * PER_DEVICE)


def test_every_rank_sees_the_same_report_and_only_rank0_logs(ranks):
    assert ranks[0]["mlp"] == ranks[1]["mlp"]
    assert ranks[0]["logged"] == list(range(STEPS))
    assert ranks[1]["logged"] == []
    assert ranks[0]["hooks"] == ranks[1]["hooks"] == 0


def test_small_per_device_batchnorm_gets_syncbatchnorm(ranks):
    per_device = bn_per_device()
    findings = [f for f in ranks[0]["bn"]["findings"] if f[0] == "TL401"]
    assert [f[1] for f in findings] == ["1"]
    _, _, fix, evidence = findings[0]
    assert "nn.SyncBatchNorm.convert_sync_batchnorm(model)" in fix
    assert evidence["batch_size"] == per_device
    assert evidence["global_batch"] == WORLD * per_device
    assert ranks[0]["bn"]["batch"] == (per_device, WORLD, WORLD * per_device)
    # One process at that batch: the batch-independent replacement instead.
    alone = summary(train(bn_net(), *data(per_device), steps=1))
    fix_alone = next(f[2] for f in alone["findings"] if f[0] == "TL401")
    assert "SyncBatchNorm" not in fix_alone


def test_fsdp_is_a_clear_error():
    # fully_shard turns a module's class into a subclass of FSDPModule; do the same here,
    # since sharding for real needs a device mesh.
    from torch.distributed.fsdp import FSDPModule

    sharded = nn.Sequential(nn.Linear(4, 4))
    sharded[0].__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})
    with pytest.raises(ConfigError, match="FSDP"):
        trainlint.Monitor(sharded)
    plain = nn.Sequential(nn.Linear(4, 4))
    assert unwrap(nn.parallel.DataParallel(plain)) is plain


def test_reduce_values_merges_by_kind():
    act = np.array([[4, 4, 4, 4, 1.0, 2.0, -1, 3, 0, 0]])
    values = [{("act", "k"): act, ("grad", "k"): np.array([[4, 8.0, 0]]),
               ("units", "k"): np.array([True, False, False]),
               ("param", "w"): np.array([1.0, 2.0]), ("extra", "loss"): np.array([2.0])},
              {("act", "k"): act * 2, ("grad", "k"): np.array([[4, 16.0, 1]]),
               ("units", "k"): np.array([False, False, True]),
               ("param", "w"): np.array([1.0, 2.0]), ("extra", "loss"): np.array([4.0])}]
    merged = reduce_values(values)
    assert merged[("act", "k")].shape == (2, 10)
    assert merged[("grad", "k")].tolist() == [[4, 2.0, 0], [4, 4.0, 1]]  # sumsq / world**2
    assert merged[("units", "k")].tolist() == [True, False, True]
    assert merged[("extra", "loss")].tolist() == [3.0]
    assert merged[("param", "w")].tolist() == [1.0, 2.0]


def test_merge_inputs_matches_the_concatenated_batch():
    rng = np.random.default_rng(0)
    a, b = rng.normal(2, 3, (6, 5)), rng.normal(-1, 1, (10, 5))

    def row(x):
        return np.stack([x.mean(0), x.std(0), x.min(0), x.max(0), np.full(x.shape[1],
                                                                          x.shape[0])])

    tag, merged = merge_inputs([(("input", 0, "input0", a.shape, "float32", 1), row(a)),
                                (("input", 0, "input0", b.shape, "float32", 1), row(b))])
    assert tag[3] == (16, 5)
    assert np.allclose(merged, row(np.concatenate([a, b])))
