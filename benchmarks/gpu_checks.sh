#!/usr/bin/env bash
# The GPU checks in one pass, for a machine with a CUDA GPU and Triton: the GPU tests, then the
# benchmarks behind docs/performance.md's "On a GPU" table. Each step has a time limit and the
# pass stops by itself; everything goes to ONE log, $OUT/gpu-checks.log (default /tmp), with a
# line per step saying how it ended, so a partial pass still tells what ran.
#
#   bash benchmarks/gpu_checks.sh            # needs byzps importable (pip install -e .)
set -u
OUT=${OUT:-/tmp}
LOG="$OUT/gpu-checks.log"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
: > "$LOG"
step() {  # step NAME SECONDS COMMAND...: run it, append its output, record how it ended
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)" >> "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    echo "=== $name rc=$? $(date +%T)" >> "$LOG"
}
FLOORS=("torch.median(dim=0)" "cm (torch.sort)" "torch mean(dim=0)" "read once (x.sum())")
RULES=(mean cm cwtm meamed krum multikrum gm cclip nnm∘cm nnm∘cwtm)
step env 30 python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
step tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step agg_20_1e7 60 python3 benchmarks/bench_aggregators.py --n 20 --d 10000000 --f 8 --repeat 5 \
    --device cuda --rules "${RULES[@]}" "${FLOORS[@]}" "cm (torch network)"
step agg_100_1e7 60 python3 benchmarks/bench_aggregators.py --n 100 --d 10000000 --f 40 --repeat 5 \
    --device cuda --rules "${RULES[@]}" "${FLOORS[@]}"
step agg_20_1e8 60 python3 benchmarks/bench_aggregators.py --n 20 --d 100000000 --f 8 --repeat 3 \
    --device cuda --rules mean cm cwtm nnm∘cm krum gm cclip "${FLOORS[@]}"
step blocks 60 python3 benchmarks/bench_band_kernel.py --n 20 100 --blocks 32 64 128 256 --warps 4 8
step sim_a9a 90 bash -c 'for dev in cuda cpu; do /usr/bin/time -f "$dev %e s" python3 -m byzps.cli.main simulate --config experiments/a9a/base.toml --set run.rounds=1000 --set run.eval_every=1000 --out /tmp/gpu-checks-a9a-$dev --overwrite --device $dev; done'
step sim_fmnist 120 bash -c 'for dev in cuda cpu; do /usr/bin/time -f "$dev %e s" python3 -m byzps.cli.main simulate --config experiments/fmnist/base.toml --set run.rounds=20 --set run.eval_every=20 --out /tmp/gpu-checks-fm-$dev --overwrite --device $dev; done'
step round 120 python3 benchmarks/bench_round.py --sizes 10000000 --rounds 2 --warmup 3 --aggregators cm --device cuda
grep "^=== .* rc=" "$LOG"
