#!/usr/bin/env bash
# Everything measured on one NVIDIA GPU (H100 / H200), in one short run, offline:
#   1. the hardware kernel tests (compiled Pallas and cuDNN kernels vs the reference);
#   2. forward+backward TFLOP/s of the Pallas BiPE-ALiBi kernel and of cuDNN
#      attention without bias, batch 8, 12 heads, head dim 64, bf16, 1k-16k tokens;
#   3. the 151M training step (bf16, batch 16 x 1024): tokens/s and MFU against the
#      GPU's dense bf16 peak, bipe_rope (cuDNN) and bipe_alibi (Pallas);
#   4. evaluation at 8192 and 32768 tokens: tokens/s and peak GPU memory.
# Every step's output goes to the terminal and to --out (default gpu_results.txt).
# A step that fails stops the script with its name and exit status; each step has
# a time limit, so the whole run stays under 8 minutes.
#
#   bash benchmarks/gpu.sh                     # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run           # anywhere: checks the steps' imports and flags
#   PEAK_TFLOPS=756 bash benchmarks/gpu.sh     # another peak (H100 PCIe); default 989.4 (SXM/H200)
# PYTHON picks the interpreter (default: python).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989.4}"
OUT="gpu_results.txt"
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (valid: --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "error: $*" | tee -a "$OUT" >&2; exit 1; }
START=$SECONDS
: > "$OUT" || { echo "error: cannot write --out $OUT" >&2; exit 1; }
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# Each step: a name, a time limit in seconds, a command.
STEPS=(
  "kernel tests|120|$PYTHON -m pytest -q -rs tests/test_attention.py -k hardware"
  "Pallas BiPE-ALiBi fwd+bwd|80|$PYTHON benchmarks/attention.py --batch 8 --dtype bfloat16 --grad --bias alibi --impls pallas --repeats 2 --lengths 1024 2048 4096 8192 16384"
  "cuDNN (no bias) fwd+bwd|50|$PYTHON benchmarks/attention.py --batch 8 --dtype bfloat16 --grad --bias none --impls cudnn --repeats 2 --lengths 1024 2048 4096 8192 16384"
  "151M training step, bf16|110|$PYTHON benchmarks/train_step.py --kinds bipe_rope,bipe_alibi --batch 16 --steps 10 --set model.dtype=bfloat16 --peak_tflops $PEAK_TFLOPS"
  "evaluation 8k / 32k|100|$PYTHON benchmarks/eval_long.py --kinds bipe_rope bipe_alibi --lengths 8192 32768 --repeats 2"
)

# Fail early: the interpreter, the package and kernels, every script's flags, the tests.
"$PYTHON" -c "import jax, bipe_jax, pytest; from bipe_jax.attention import pallas_gpu, cudnn" \
  2>>"$OUT" || die "$PYTHON cannot import jax, bipe_jax (with its GPU kernels) and pytest" \
                   "(install the package: pip install -e .)"
SCRIPTS=(attention train_step eval_long)
PIDS=()
for script in "${SCRIPTS[@]}"; do     # in parallel: each imports JAX
  "$PYTHON" "benchmarks/$script.py" --help > /dev/null 2>>"$OUT" &
  PIDS+=($!)
done
COLLECTED="$(mktemp)"
"$PYTHON" -m pytest -q --collect-only tests/test_attention.py -k hardware > "$COLLECTED" 2>>"$OUT" &
COLLECT_PID=$!
for i in "${!SCRIPTS[@]}"; do
  wait "${PIDS[$i]}" || die "benchmarks/${SCRIPTS[$i]}.py --help failed (a missing import or flag)"
done
wait "$COLLECT_PID" || true
n_tests=$(grep -c "::" "$COLLECTED" || true)
rm -f "$COLLECTED"
[[ "$n_tests" -gt 0 ]] || die "no hardware kernel tests collected from tests/test_attention.py"

if [[ $DRY -eq 0 ]]; then
  command -v nvidia-smi > /dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT"
  backend=$("$PYTHON" -c "import jax; print(jax.default_backend())")
  [[ "$backend" == "gpu" ]] || die "JAX runs on '$backend', not the GPU (install jax[cuda12])"
fi

echo "gpu.sh: $n_tests kernel tests; bf16 peak $PEAK_TFLOPS TFLOP/s; results in $OUT" | tee -a "$OUT"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "== $name (limit ${limit} s): $cmd" | tee -a "$OUT"
  if [[ $DRY -eq 1 ]]; then
    continue
  fi
  t0=$SECONDS
  set +e
  timeout "$limit" $cmd 2>&1 | tee -a "$OUT"
  status=${PIPESTATUS[0]}
  set -e
  [[ $status -eq 0 ]] || die "step '$name' failed (exit $status; 124 = over its ${limit} s limit)"
  echo "   $name: $((SECONDS - t0)) s" | tee -a "$OUT"
done
echo "gpu.sh: $([[ $DRY -eq 1 ]] && echo 'dry run, steps checked' || echo done) in $((SECONDS - START)) s" \
  | tee -a "$OUT"
