#!/usr/bin/env bash
# The GPU half of the engine's benchmarks and tests, in one command (benchmarks/README.md).
#
#   bash benchmarks/gpu.sh            # every step below, in order (~20-30 min on one H100)
#   bash benchmarks/gpu.sh recipe     # one step: tests | bench | accuracy | recipe | harness
#
# Needs torch, numpy and pytest; the `harness` step (and one CUDA test) also need the project's
# own dependencies (hydra-core, omegaconf, mlflow, optuna) and is skipped, saying so, without
# them. Each step's output is kept in benchmarks/results/gpu_<step>.log beside the JSON files
# (benchmarks/results/quick/ with QUICK=1).
#
#   DATA=/path      where the 345-class end-to-end data is written once (default /tmp/synthetic345)
#   PYTHON=python3  the interpreter that has torch
#   QUICK=1         tiny sizes, to check this script itself on any machine (figures meaningless)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS=benchmarks/results
[ "${QUICK:-0}" = 1 ] && RESULTS=benchmarks/results/quick  # never over a real run's files
mkdir -p "$RESULTS"

if [ "${QUICK:-0}" = 1 ]; then
  BENCH=(--classes 10 --per-class 200 --widths 8 --batch-size 256 --images 1024 --compile --profile)
  ACCURACY=(--accuracy --accuracy-per-class 200 --width 8 --epochs 1 --seeds 2)
  CLASSES=10 PER_CLASS=300 RECIPE=(--width 8 --epochs 2) HARNESS=(model.width=8 trainer.epochs=2)
  DATA="${DATA:-/tmp/sketchsweep-quick}"
else
  # The issue's conditions: 345 classes, width 64 and a second width, batch >= 1024, bf16 (auto).
  BENCH=(--classes 345 --per-class 1000 --widths 64,128 --batch-size 1024 --images 200000 --compile --profile)
  # Distinct drawings of the 10 synthetic shapes; 5 epochs of the seed recipe, 3 seeds per loop.
  ACCURACY=(--accuracy --accuracy-per-class 5000 --width 64 --epochs 5 --seeds 3)
  # The seed recipe: 345 classes x 10k, 20 epochs, width 64, batch 256.
  CLASSES=345 PER_CLASS=10000 RECIPE=() HARNESS=()
  DATA="${DATA:-/tmp/synthetic345}"
fi

step() {  # run "$@" with its output shown and kept in $RESULTS/gpu_$name.log
  local name=$1
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$RESULTS/gpu_$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  return "$rc"
}

write_data() {
  if [ ! -f "$DATA/class$(printf %03d $((CLASSES - 1))).npy" ]; then
    "$PY" benchmarks/bench_train.py --classes "$CLASSES" --per-class "$PER_CLASS" --write-data "$DATA" || return
  fi
}

run_tests() {
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device: the CUDA tests would all skip"' || return
  nvidia-smi || true
  SKETCHSWEEP_SLOW_TESTS=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_engine.py
}

run_recipe() {
  write_data && time "$PY" benchmarks/bench_train.py --recipe "$DATA" "${RECIPE[@]}" --out-dir "$RESULTS"
}

run_harness() {
  if ! "$PY" -c 'import hydra, omegaconf, mlflow, optuna' 2>/dev/null; then
    echo "skipped: hydra-core, omegaconf, mlflow and optuna are not all installed (pip install -e .)"
    return 0
  fi
  write_data || return
  local store
  store=$(mktemp -d)
  # The whole harness: data check, MLflow run, checkpoints, evaluation artifacts, ONNX export.
  time "$PY" -m sketchsweep.train data=quickdraw "data.root=$DATA" "${HARNESS[@]}" \
    "mlflow.tracking_uri=sqlite:///$store/mlflow.db" "hydra.run.dir=$store/run"
}

rc=0
for name in ${1:-tests bench accuracy recipe harness}; do
  case $name in
    tests) step tests run_tests || rc=1 ;;
    bench) step bench "$PY" benchmarks/bench_train.py "${BENCH[@]}" --out-dir "$RESULTS" || rc=1 ;;
    accuracy) step accuracy "$PY" benchmarks/bench_train.py "${ACCURACY[@]}" --out-dir "$RESULTS" || rc=1 ;;
    recipe) step recipe run_recipe || rc=1 ;;
    harness) step harness run_harness || rc=1 ;;
    *) echo "unknown step '$name': expected tests, bench, accuracy, recipe or harness" >&2; exit 2 ;;
  esac
done
exit $rc
