"""Model files through ``trainlint check`` on the CPU and on CUDA: the same findings?

    python benchmarks/device_parity.py [--jobs 8] [--json out.json] [--dir models/]

Each model file (the bundled fixtures, or those in ``--dir``) runs as the CLI runs it
(``python -m trainlint check F --device D --format json``), one process per file and device,
``--jobs`` at a time. Prints, per file, the exit status and rule codes on each device and
marks the files where they differ. Exit status 1 when any differ or a run fails with status 2
or more. Needs a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("cpu", "cuda")


def run_check(fixture: Path, device: str) -> dict:
    """One CLI run: its exit status and the sorted (code, module) pairs it reported."""
    cmd = [sys.executable, "-m", "trainlint", "check", str(fixture), "--device", device,
           "--format", "json", "--fail-on", "never"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    result: dict = {"status": done.returncode, "findings": []}
    try:
        report = json.loads(done.stdout)
        result["findings"] = sorted(f"{f['code']} {f['module']}" for f in report["findings"])
    except (json.JSONDecodeError, KeyError, TypeError):
        result["error"] = (done.stderr or done.stdout)[-2000:]
    return result


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--dir", type=Path, default=ROOT / "fixtures",
                        help="folder of model files (default: fixtures/)")
    args = parser.parse_args(argv)
    fixtures = sorted(p.resolve() for p in args.dir.glob("*.py") if not p.name.startswith("_"))
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {(f.name, d): pool.submit(run_check, f, d) for f in fixtures for d in DEVICES}
        results = {key: future.result() for key, future in futures.items()}
    bad = 0
    for fixture in fixtures:
        cpu, cuda = (results[(fixture.name, d)] for d in DEVICES)
        same = cpu["findings"] == cuda["findings"] and cpu["status"] == cuda["status"]
        failed = max(cpu["status"], cuda["status"]) >= 2
        bad += (not same) or failed
        mark = "  " if same and not failed else "!!"
        print(f"{mark} {fixture.name:36s} cpu {cpu['status']} {', '.join(cpu['findings'])}")
        if not same or failed:
            print(f"   {'':36s} cuda {cuda['status']} {', '.join(cuda['findings'])}")
            for device, result in (("cpu", cpu), ("cuda", cuda)):
                if "error" in result:
                    print(f"   {device} error: {result['error']}")
    print(f"\n{len(fixtures)} model files, {bad} differ or fail")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {f"{name} {device}": r for (name, device), r in results.items()}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
