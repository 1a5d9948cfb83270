#!/usr/bin/env bash
# The Fashion-MNIST study end to end, resumable at every step (experiments/fmnist/study.toml):
#   bash experiments/fmnist/run-study.sh [SWEEP_DIR]      (default runs/fmnist-study; JOBS=2)
# (GRID, RAW and REPORT name the grid, the kept cells and the report directory; the defaults are
# this study's, tests/test_run_study.py runs it on a tiny a9a grid.)
#
# ~20 CPU-hours on two cores, so it is built to be stopped and run again:
# - the finished cells kept in the repo ($RAW) are copied in first, and
#   `byzps sweep` skips every cell already finished with the same config;
# - the second stage (each row's chosen γ on seeds 1–3) starts for the rows whose selection
#   runs (seed 0) are all done before the rest of the first stage runs, so that complete rows
#   come early: Byz-VR-MARINA's and Byz-DASHA-PAGE's cells cost 3–4 times the others'.
# Then the report ($REPORT).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/fmnist-study}
jobs=${JOBS:-2}
grid=${GRID:-experiments/fmnist/study.toml}
raw=${RAW:-docs/results/fmnist-study-runs}
report=${REPORT:-docs/results/fmnist-study}
second="$out.confirm.toml"
select=(--metric test_accuracy --selection-seeds 0)

mkdir -p "$out"
for cell in "$raw"/*/; do
  name=$(basename "$cell")
  if [ -f "$cell/summary.json" ] && [ ! -e "$out/$name" ]; then cp -r "$cell" "$out/$name"; fi
done

second_stage() {  # the rows chosen so far on their reported seeds; none ready is not an error
  if byzps confirm "$out" --grid "$grid" "${select[@]}" --seed 1 --seed 2 --seed 3 \
      --out "$second"; then
    byzps sweep --grid "$second" --out "$out" --jobs "$jobs"
  fi
}

second_stage
byzps sweep --grid "$grid" --out "$out" --jobs "$jobs"
second_stage
byzps report "$out" --out "$report" "${select[@]}"
