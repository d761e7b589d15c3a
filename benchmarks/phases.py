"""Where observing adds time, phase by phase: each mode's extra milliseconds over ``plain`` in
zero_grad, the forward (with the loss), the backward, the optimizer step and the step hook
(``Monitor.step``), medians over steps that the modes take in turns (as in overhead.py).

    python benchmarks/phases.py                              # cnn, mlp and their stand-ins
    python benchmarks/phases.py --workloads mlp-w16 --threads 1 --steps 300
    python benchmarks/phases.py --modes plain,floor,trainlint-observed

``sampled-floor`` (overhead.py's modes) does the reads and sample gathers an observed step does
and nothing else: the difference to ``trainlint-observed`` is trainlint's own machinery.
``mlp-w16`` and ``cnn-tiny`` (overhead.py's workloads) have the MLP's and the CNN's layouts with
tensors so small that reading one costs next to nothing: the extra time there is observing's
fixed cost per observed tensor and per step (hooks, Python, op dispatch). On CUDA each phase
ends with a sync, so the phases show where the host waits, not what overlaps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the workloads, modes and runner)

PHASES = ("zero_grad", "forward", "backward", "optimizer", "step hook", "total")


def timed_phases(runner: overhead.Runner) -> tuple:
    """One training step of ``runner``: the wall seconds of each of ``PHASES``."""
    marks: list[float] = []

    def mark() -> None:
        overhead._sync(runner.device)
        marks.append(time.perf_counter())

    mark()
    runner.train(mark)
    return tuple(b - a for a, b in zip(marks, marks[1:])) + (marks[-1] - marks[0],)


def phase_table(times: dict[str, list]) -> dict[str, list[float]]:
    """Per mode, the median milliseconds of each phase: ``plain``'s as they are, the other
    modes' as the extra over ``plain``'s."""
    medians = {mode: [1e3 * statistics.median(step[i] for step in steps)
                      for i in range(len(PHASES))] for mode, steps in times.items()}
    plain = medians["plain"]
    return {mode: values if mode == "plain" else [v - p for v, p in zip(values, plain)]
            for mode, values in medians.items()}


def print_phases(title: str, table: dict[str, list[float]]) -> None:
    print(f"\n{title}\n  {'mode':20s}" + "".join(f"{p:>11s}" for p in PHASES))
    for mode, values in table.items():
        spec = ".2f" if mode == "plain" else "+.2f"
        print(f"  {mode:20s}" + "".join(f"{format(v, spec):>11s}" for v in values))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="cnn,mlp,cnn-tiny,mlp-w16")
    parser.add_argument("--modes",
                        default="plain,floor,exact-floor,sampled-floor,trainlint-observed")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    if "plain" not in modes:
        parser.error("--modes must include plain (the other modes are shown against it)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    table = overhead.workloads()
    unknown = [name for name in args.workloads.split(",") if name not in table]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(table)}")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads; "
          f"medians over {args.steps} steps after {args.warmup}; ms (plain) and extra ms")
    for name in args.workloads.split(","):
        times = overhead.time_modes(table[name], modes, args.steps, args.warmup, device,
                                    measure=timed_phases)
        print_phases(f"{name}: {table[name].description}", phase_table(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
