#!/usr/bin/env bash
# Reproduce docs/reproduction.md: run the four CPU-scale sweeps through the product (sweep run -> MLflow ->
# analyze), check each finding, export the committed test fixtures and draw the figures.
#
#   bash docs/reproduce.sh [SWEEP ...]     (default: all four, one after the other; about 1.5 h on 2 cores)
#
# Running it again resumes: finished trials are skipped, interrupted ones continue from their checkpoints.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export MLFLOW_DISABLE_TELEMETRY=true
sweeps=("$@")
[ ${#sweeps[@]} -eq 0 ] && sweeps=(linear_sine_cpu mixture_weights_cpu sine_frequency_cpu sparsity_coverage_cpu)
status=0
for s in "${sweeps[@]}"; do
    start=$(date +%s)
    $PY -m iclmix sweep run "sweeps/$s.yaml" || exit $?
    echo "$s: sweep run took $(( $(date +%s) - start )) s"
    out="docs/figures/$s"
    mkdir -p "$out"
    $PY -m iclmix analyze check --sweep "$s" --out "$out" || status=1   # exit 1 = FAIL: recorded, not fatal
    $PY -m iclmix analyze export --sweep "$s" --out "tests/fixtures/$s.csv.gz"
    case $s in
      mixture_weights_cpu)   heat=(--test-axis nnz) curves=(--value 0.5) ;;
      sparsity_coverage_cpu) heat=(--test-axis nnz) curves=() ;;
      linear_sine_cpu)       heat=(--test-axis alpha) curves=() ;;
      sine_frequency_cpu)    heat=(--test-axis freq) curves=() ;;
      *)                     heat=() curves=() ;;
    esac
    $PY -m iclmix analyze heatmap --sweep "$s" --out "$out" --dpi 80 "${heat[@]}"
    $PY -m iclmix analyze heatmap --sweep "$s" --out "$out" --dpi 80 --relative-to none "${heat[@]}"
    $PY -m iclmix analyze curves --sweep "$s" --out "$out" --dpi 60 "${curves[@]}"
    rm -f "$out"/*.svg "$out"/curves_*.csv   # the docs keep small PNGs, the maps' CSVs and the check
done
exit $status
