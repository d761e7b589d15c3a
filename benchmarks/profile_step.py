"""Where an observed step's extra time goes: torch.profiler tables of a plain and an observed
training step of one of overhead.py's workloads.

    python benchmarks/profile_step.py --workload resnet50 --device cuda
    python benchmarks/profile_step.py --workload mlp --rows 30

Prints, for ``plain`` and ``trainlint-observed``, the wall time per step and the ops with the
most self time (on CUDA: device time, then CPU time), summed over ``--steps`` profiled steps
after a warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the workloads, modes and runner)


def profile_mode(mode: str, workload: overhead.Workload, device: torch.device, steps: int,
                 rows: int) -> None:
    torch.manual_seed(0)
    base = workload.model()
    runner = overhead.Runner(mode, base, workload, overhead._batch(workload, device), device)
    for _ in range(5):
        runner.step()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    per_step = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
    runner.mode.close()
    print(f"\n=== {mode}: {1e3 * per_step:.2f} ms per step (unprofiled) ===")
    averages = prof.key_averages()
    if device.type == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="resnet50")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = overhead.workloads()[args.workload]
    for mode in ("plain", "trainlint-observed"):
        profile_mode(mode, workload, torch.device(args.device), args.steps, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
