"""End-to-end latency of ``trainlint check`` on a small fixture (process start to exit), as a
ratio to ``python -c "import torch"`` and to a bare training step in a fresh process (creating
a ``torch.optim`` optimizer imports ``torch._dynamo``, ~2 s that any torch.optim user pays;
``trainlint check`` of a model.py without ``build_optimizer`` does not: see
trainlint/default_optimizer.py).

    python benchmarks/latency.py [--runs 7] [--fixture fixtures/healthy_relu.py]

The commands take turns run by run, so a noisy machine slows them alike; medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STEP = (
    "import torch\n"
    "model = torch.nn.Linear(4, 2)\n"
    "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
    "model(torch.randn(8, 4)).sum().backward()\n"
    "opt.step()\n"
)


def commands(fixture: str) -> dict[str, list[str]]:
    return {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "bare training step": [sys.executable, "-c", TRAINING_STEP],
        f"trainlint check {fixture}": [sys.executable, "-m", "trainlint", "check", fixture,
                                       "--format", "json"],
    }


def run_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--fixture", default="fixtures/healthy_relu.py")
    args = parser.parse_args(argv)
    table = commands(args.fixture)
    times: dict[str, list[float]] = {name: [] for name in table}
    for cmd in table.values():  # warm the file cache once
        run_once(cmd)
    for _ in range(args.runs):
        for name, cmd in table.items():
            times[name].append(run_once(cmd))
    base = statistics.median(times["python -c 'import torch'"])
    print(f"medians of {args.runs} runs each, taking turns")
    print(f"  {'command':45s} {'median s':>9s} {'x import torch':>15s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:45s} {median:9.2f} {median / base:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
