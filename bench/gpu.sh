#!/usr/bin/env bash
# One prepared GPU session for evatok_kernels (docs/kernels.md): correctness of both kernels on CUDA,
# then their benchmarks. Finishes in under ~8 minutes (GPU_BUDGET_S, default 450 s, shared by all
# parts; a part that would start with < 20 s left is skipped). Every part runs under its own
# `timeout` and a failing part never stops the next one. Results (JSON, logs, junit XML) go to
# $OUT (default ./gpu-results); $OUT/summary.txt lists each part's exit code and duration.
#
# Usage (repository root, on a machine with a CUDA GPU):
#   bash bench/gpu.sh                  # OUT=./gpu-results
#   OUT=/tmp/r GPU_BUDGET_S=300 bash bench/gpu.sh
#   GPU_SH_DEVICE=cpu bash bench/gpu.sh  # dry run on CPU (quick sizes, no pip), checks the plumbing
#
# Setup: uses the first python that imports torch with CUDA (PYTHON, else python3, else python).
# Only when none imports torch at all is `torch` installed from PyPI (the Linux wheels there are
# CUDA builds). Then `pip install -e .[dev] triton`; where that fails (no network), evatok is
# imported from the source tree instead (PYTHONPATH=kernels/:., so evatok_kernels is kernels/evatok_kernels/).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_BUDGET_S:-450}
# GPU_SH_DEVICE=cpu: a dry run of the same parts on CPU with --quick sizes and no pip (plumbing check).
DEVICE=${GPU_SH_DEVICE:-cuda}
QUICK=(); [[ $DEVICE == cpu ]] && QUICK=(--quick)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu.log"; }

# part NAME LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the budget.
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then
    log "SKIP $name (only ${left}s of the budget left)"
    echo "$name skipped (budget)" >> "$SUMMARY"
    return 0
  fi
  (( limit > left )) && limit=$left
  log "START $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "END $name rc=$rc in $(( $(date +%s) - t0 ))s"
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >> "$SUMMARY"
  tail -n 5 "$OUT/$name.log" | sed "s/^/    [$name] /" | tee -a "$OUT/gpu.log"
  return 0
}

# ------------------------------------------------------------------------------------- setup
PY=""
[[ $DEVICE == cpu ]] && PY=${PYTHON:-python3}
for cand in ${PYTHON:-} python3 python; do
  [[ -n $PY ]] && break
  if command -v "$cand" > /dev/null && "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    PY=$cand; break
  fi
done
if [[ -z $PY ]]; then
  PY=${PYTHON:-python3}
  if ! "$PY" -c "import torch" 2> /dev/null; then
    log "no importable torch: installing torch (CUDA wheel) from PyPI"
    timeout 240 "$PY" -m pip install -q torch > "$OUT/pip-torch.log" 2>&1 || log "pip install torch failed (see pip-torch.log)"
  fi
fi
if [[ $DEVICE == cuda ]]; then
  timeout 150 "$PY" -m pip install -q -e ".[dev]" triton > "$OUT/pip-evatok.log" 2>&1 \
    || log "pip install -e .[dev] triton failed (no network?): importing from the source tree"
fi
if ! "$PY" -c "import evatok_kernels, evatok_cli" 2> /dev/null; then
  export PYTHONPATH="$REPO/kernels:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  echo "python: $(command -v "$PY")"
  "$PY" - <<'EOF'
import importlib.util, platform
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "pytest", "evatok_cli", "evatok_kernels", "safetensors", "typer"):
    spec = importlib.util.find_spec(name)
    print(name, "missing" if spec is None else spec.origin)
try:
    import triton
    print("triton version", triton.__version__)
except ImportError:
    pass
print("python", platform.python_version())
EOF
  nvidia-smi 2>&1 | head -n 15
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/gpu.log"
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "torch sees no CUDA device: nothing to measure"
  echo "setup rc=1 (no CUDA)" >> "$SUMMARY"
  exit 1
fi
log "setup done"

# --------------------------------------------------------------------------------- the parts
# Kernel correctness on CUDA (compiled Triton / compiled FlexAttention), fastest first.
part test-vq 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_vq_kernel.py \
  --junitxml="$OUT/test-vq.xml" --durations=5
part bench-vq 90 "$PY" bench/kernels.py vq --device "$DEVICE" "${QUICK[@]}" --repeats 5 --json "$OUT/bench-vq.json"
part test-flex 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_flex_masks.py \
  --junitxml="$OUT/test-flex.xml" --durations=10
# Tokenizer (paper preset, bf16) forward + backward: flex vs dense-mask SDPA (first flex steps compile).
TOK_PRESET=paper; [[ $DEVICE == cpu ]] && TOK_PRESET=tiny
part bench-tokenizer 150 "$PY" bench/kernels.py tokenizer --device "$DEVICE" "${QUICK[@]}" --preset $TOK_PRESET \
  --batch 8 --dtype bf16 \
  --warmup 2 --repeats 3 --json "$OUT/bench-tokenizer.json"
# GPT-B forward + backward in bf16 autocast, and causal attention: SDPA is_causal vs flex causal_padded.
GPT_PRESET=gpt-b; [[ $DEVICE == cpu ]] && GPT_PRESET=tiny
part bench-gpt 90 "$PY" bench/kernels.py gpt --device "$DEVICE" "${QUICK[@]}" --preset $GPT_PRESET --batch 16 --dtype bf16 \
  --warmup 2 --repeats 5 --json "$OUT/bench-gpt.json"
# Whatever budget is left: the model tests on CUDA-capable torch (CPU paths; a regression check).
part test-models 60 "$PY" -m pytest -q -p no:cacheprovider -x tests/models/test_quantizer.py tests/models/test_masks.py

log "done in $(( $(date +%s) - START ))s; results in $OUT"
cat "$SUMMARY"
