#!/usr/bin/env bash
# The device checks, as one script for a CUDA machine (about 5-8 minutes): the CUDA tests
# (zero syncs before the observed step's copy; statistics on the device), then the overhead
# benchmark on the GPU, ResNet-50 layout included. PY picks the interpreter (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-.}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -p no:cacheprovider tests/test_overhead_syncs.py tests/test_stats_numeric.py
$PY benchmarks/overhead.py --device cuda --quick --json "$OUT/overhead_cuda.json" | tee "$OUT/overhead_cuda.txt"
