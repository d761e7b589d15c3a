"""An observed step of this checkout's trainlint against another revision's, side by side.

    python benchmarks/compare.py HEAD~3                 # cnn, mlp, depth32; 30 steps
    python benchmarks/compare.py v0.1 --workloads mlp --steps 60

On a machine shared with other jobs, two separate benchmark runs can differ by more than a
change's effect. Here ``plain``, ``base`` (``trainlint.Monitor(every=1)`` of the revision,
extracted with ``git archive`` and imported under another name) and ``current`` (this
checkout's) train their own copies of the same model on the same batch, taking turns step by
step in ONE process (the order rotates every round), so noise slows them alike. Printed: the
10th-percentile and the median step time of each, and their ratios to ``plain``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the workloads and their batches)

ROOT = Path(__file__).resolve().parent.parent


def import_revision(rev: str, into: Path) -> Any:
    """The ``trainlint`` package of git revision ``rev``, imported as ``trainlint_base``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "trainlint"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "trainlint").rename(into / "trainlint_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("trainlint_base")


class Runner:
    """One copy of the workload's model and optimizer, with a Monitor of ``package``."""

    def __init__(self, workload: overhead.Workload, base: torch.nn.Module, batch: tuple,
                 package: Optional[Any]) -> None:
        self.workload = workload
        self.batch = batch
        self.model = copy.deepcopy(base)
        self.optimizer = workload.optimizer(self.model.parameters())
        self.monitor = (None if package is None
                        else package.Monitor(self.model, optimizer=self.optimizer, every=1))
        self.times: list[float] = []

    def step(self) -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model(self.batch[0]), self.batch[1])
        loss.backward()
        self.optimizer.step()
        if self.monitor is not None:
            self.monitor.step(loss)
        self.times.append(time.perf_counter() - start)


def compare(workload: overhead.Workload, packages: dict, steps: int, warmup: int) -> dict:
    """Per package name: (10th percentile, median) step time in seconds."""
    torch.manual_seed(0)
    base = workload.model().train()
    batch = overhead._batch(workload, torch.device("cpu"))
    runners = {name: Runner(workload, base, batch, pkg) for name, pkg in packages.items()}
    order = list(runners.values())
    for i in range(warmup + steps):
        shift = i % len(order)
        for runner in order[shift:] + order[:shift]:
            runner.step()
    out = {}
    for name, runner in runners.items():
        times = sorted(runner.times[warmup:])
        out[name] = (times[len(times) // 10], statistics.median(times))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~3)")
    parser.add_argument("--workloads", default="cnn,mlp,depth32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = overhead.workloads()
    unknown = [w for w in args.workloads.split(",") if w not in table]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {', '.join(table)}")
    import trainlint
    with tempfile.TemporaryDirectory() as tmp:
        packages = {"plain": None, "base": import_revision(args.rev, Path(tmp)),
                    "current": trainlint}
        print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps after "
              f"{args.warmup}; base = {args.rev}")
        print(f"  {'workload':12s} {'mode':8s} {'p10 ms':>9s} {'x plain':>8s} "
              f"{'median ms':>10s} {'x plain':>8s}")
        for name in args.workloads.split(","):
            result = compare(table[name], packages, args.steps, args.warmup)
            p10, med = result["plain"]
            for mode, (a, b) in result.items():
                print(f"  {name:12s} {mode:8s} {1e3 * a:9.1f} {a / p10:8.3f} "
                      f"{1e3 * b:10.1f} {b / med:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
