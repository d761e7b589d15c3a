#!/usr/bin/env bash
# The device checks, as one script for a CUDA machine (about 6 minutes on an H100/H200). Each
# part runs under its own time limit and writes OUT/<part>.txt; a failing part does not stop
# the others, and the exit status is 1 when any failed:
#   tests     the CUDA tests (no host sync added to the user's step, one copy per observed
#             step; statistics on the GPU equal those on the CPU) and the sync-count tests
#   parity    every fixture through the CLI on the CPU and on CUDA: the same findings
#   overhead  benchmarks/overhead.py --device cuda: CNN, MLP, transformer, ResNet-50, depth rows
#   memory    the ResNet-50 peak memory per mode (torch.cuda.max_memory_allocated)
#   phases    each phase's extra ms on ResNet-50 and the MLP (each phase ends with a sync: what
#             the host waits on in the forward, the backward, the optimizer, Monitor.step)
#   profile   where an observed ResNet-50 step's extra time goes (torch.profiler tables)
# PY picks the interpreter (default python), OUT the folder for the results (default .), PARTS
# the parts to run (default all, in the order above: the correctness checks first).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-.}
PARTS=${PARTS:-tests parity overhead memory phases profile}
failed=""

part() {
    local name=$1 limit=$2
    shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    tail -n 60 "$OUT/$name.txt"
    echo "=== $name: exit $rc"
    [ "$rc" = 0 ] || failed="$failed $name"
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name())" || exit 2
part tests 150 $PY -m pytest -q -p no:cacheprovider -p no:warnings tests/test_cuda.py \
    tests/test_overhead_syncs.py tests/test_stats_numeric.py
part parity 150 env OMP_NUM_THREADS=2 $PY benchmarks/device_parity.py --jobs 12 \
    --json "$OUT/parity.json"
part overhead 200 $PY benchmarks/overhead.py --device cuda --no-memory \
    --json "$OUT/overhead_cuda.json"
part memory 90 $PY benchmarks/overhead.py --device cuda --workloads resnet50 --no-depth \
    --steps 10 --modes plain,floor,trainlint-observed,trainlint-idle
part phases 45 $PY benchmarks/phases.py --device cuda --workloads resnet50,mlp --steps 15
part profile 60 $PY benchmarks/profile_step.py --workload resnet50 --device cuda --rows 30
[ -z "$failed" ] || { echo "failed:$failed"; exit 1; }
