"""An observed step of this checkout's trainlint against another revision's, side by side.

    python benchmarks/compare.py HEAD~3                 # cnn, mlp, depth32; 30 steps
    python benchmarks/compare.py v0.1 --workloads mlp --steps 60
    python benchmarks/compare.py DIR --device cuda       # DIR/trainlint: a copy made earlier

On a machine shared with other jobs, two separate benchmark runs can differ by more than a
change's effect. Here ``plain``, ``base`` (``trainlint.Monitor(every=1)`` of the revision,
extracted with ``git archive`` and imported under another name) and ``current`` (this
checkout's) train their own copies of the same model on the same batch, taking turns step by
step in ONE process (in a new shuffled order every round), so noise slows them alike. Printed: the
10th-percentile and the median step time of each, and their ratios to ``plain``, and the median
minor page faults of a step (memory the heap gave back and took again).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the workloads and their batches)

ROOT = Path(__file__).resolve().parent.parent


def import_revision(rev: str, into: Path) -> Any:
    """The ``trainlint`` package of git revision ``rev``, imported as ``trainlint_base``; or,
    where ``rev`` is a folder holding a ``trainlint`` package (a copy of another revision, for
    a machine without the git history), that package."""
    copied = Path(rev) / "trainlint"
    if (copied / "__init__.py").is_file():
        shutil.copytree(copied, into / "trainlint_base")
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "trainlint"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
        (into / "trainlint").rename(into / "trainlint_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("trainlint_base")


def compare(workload: overhead.Workload, base_package: Any, steps: int,
            warmup: int, device: str = "cpu") -> dict:
    """Per mode (plain, base, current): (10th percentile, median) wall step time in seconds
    and the median minor page faults a step, from :func:`overhead.time_modes` (the modes
    take turns step by step)."""
    def factory(name: str, model: torch.nn.Module, optimizer: Any) -> overhead.Mode:
        if name == "plain":
            return overhead.Mode(model, optimizer)
        package = base_package if name == "base" else None
        return overhead.Trainlint(model, optimizer, every=1, package=package)

    times = overhead.time_modes(workload, ("plain", "base", "current"), steps, warmup,
                                torch.device(device), factory)
    out = {}
    for name, pairs in times.items():
        wall = sorted(step[0] for step in pairs)
        out[name] = (wall[len(wall) // 10], statistics.median(wall),
                     statistics.median(step[2] for step in pairs))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare with (e.g. HEAD~3), or a "
                        "folder holding a copy of its trainlint package")
    parser.add_argument("--workloads", default="cnn,mlp,depth32")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = overhead.workloads()
    unknown = [w for w in args.workloads.split(",") if w not in table]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {', '.join(table)}")
    with tempfile.TemporaryDirectory() as tmp:
        base_package = import_revision(args.rev, Path(tmp))
        print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, "
              f"{args.steps} steps after {args.warmup}; base = {args.rev}")
        print(f"  {'workload':14s} {'mode':8s} {'p10 ms':>9s} {'x plain':>8s} "
              f"{'median ms':>10s} {'x plain':>8s} {'faults':>7s}")
        for name in args.workloads.split(","):
            result = compare(table[name], base_package, args.steps, args.warmup,
                             args.device)
            p10, med, _ = result["plain"]
            for mode, (a, b, faults) in result.items():
                print(f"  {name:14s} {mode:8s} {1e3 * a:9.1f} {a / p10:8.3f} "
                      f"{1e3 * b:10.1f} {b / med:8.3f} {faults:7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
