#!/usr/bin/env bash
# One prepared GPU session (docs/kernels.md, docs/benchmarks.md): correctness of both kernels on
# CUDA, the paper-scale job (bench/paper_job.py: the tokenizer's training step, encode end to end,
# GPT training, the router, the exact search), then the kernel benchmarks. Finishes in under ~9.5
# minutes (GPU_BUDGET_S, default 540 s, counted from the start, setup included, and shared by all
# parts; a part that would start with < 20 s left is skipped). Every part runs under its own
# `timeout` and a failing part never stops the next one. Results (JSON, logs, junit XML) go to
# $OUT (default ./gpu-results); $OUT/summary.txt lists each part's exit code and duration.
#
# Usage (repository root, on a machine with a CUDA GPU):
#   bash bench/gpu.sh                  # OUT=./gpu-results
#   OUT=/tmp/r GPU_BUDGET_S=300 bash bench/gpu.sh
#   PEAK_FLOPS=989e12 bash bench/gpu.sh  # the device's peak bf16 FLOP/s for the MFU, when not in the table
#   GPU_SH_DEVICE=cpu bash bench/gpu.sh  # dry run on CPU (quick sizes, tiny presets, no pip), checks the plumbing
#   GPU_SH_ONLY=job-encode,job-router bash bench/gpu.sh  # only these parts (the others: "skipped (GPU_SH_ONLY)")
#
# Setup: uses the first python that imports torch with CUDA (PYTHON, else python3, else python).
# Only when none imports torch at all is `torch` installed from PyPI (the Linux wheels there are
# CUDA builds). Then `pip install -e .[dev] triton`; where that fails (no network), evatok is
# imported from the source tree instead (PYTHONPATH=kernels/:., so evatok_kernels is kernels/evatok_kernels/).
# An evatok installed from another checkout never shadows this one (the source tree goes first).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_BUDGET_S:-540}
# GPU_SH_DEVICE=cpu: a dry run of the same parts on CPU with --quick sizes and no pip (plumbing check).
DEVICE=${GPU_SH_DEVICE:-cuda}
QUICK=(); [[ $DEVICE == cpu ]] && QUICK=(--quick)
# GPU_SH_ONLY: a comma or space separated list of part names to run (default: all of them).
ONLY=${GPU_SH_ONLY:-}
ONLY=" ${ONLY//,/ } "
PEAK=(); [[ -n ${PEAK_FLOPS:-} ]] && PEAK=(--peak-flops "$PEAK_FLOPS")
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu.log"; }

# part NAME LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the budget.
part() {
  local name=$1 limit=$2; shift 2
  if [[ -n ${GPU_SH_ONLY:-} && $ONLY != *" $name "* ]]; then
    echo "$name skipped (GPU_SH_ONLY)" >> "$SUMMARY"
    return 0
  fi
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
  timeout 150 "$PY" -m pip install -q --retries 1 --timeout 10 -e ".[dev]" triton > "$OUT/pip-evatok.log" 2>&1 \
    || log "pip install -e .[dev] triton failed (no network?): importing from the source tree"
fi
if ! "$PY" -c "import sys, evatok_kernels, evatok_cli; sys.exit(evatok_cli.__file__ != '$REPO/evatok_cli/__init__.py')" 2> /dev/null; then
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
# Most valuable first: when the budget runs out, it is the last parts that are skipped.
# 1. The Triton VQ kernel is right on CUDA (cheap; the encode, search and training parts use it).
part test-vq 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_vq_kernel.py \
  --junitxml="$OUT/test-vq.xml" --durations=5
# 2. The paper-scale job (bench/paper_job.py; --quick on CPU: tiny presets). Each part rewrites its
# JSON after every finished case, so one cut off by its limit keeps what it measured. The sweeps
# (train-step, gpt-train) start no batch size that would end after --max-seconds.
# The tokenizer's training step (paper preset, bf16, flex): batch doubled until OOM; samples/s, memory, MFU.
part job-train-step 150 "$PY" bench/paper_job.py train-step --device "$DEVICE" "${QUICK[@]}" "${PEAK[@]}" \
  --max-seconds 120 --json "$OUT/job-train-step.json"
# `evatok encode` end to end on real footage at 16x128x128: clips/s, GPU busy, decode- or model-bound.
part job-encode 100 "$PY" bench/paper_job.py encode --device "$DEVICE" "${QUICK[@]}" --json "$OUT/job-encode.json"
# gpt-b training (bf16 autocast, optimizer step included): tokens/s, memory, MFU; batch doubled until OOM.
part job-gpt-train 90 "$PY" bench/paper_job.py gpt-train --device "$DEVICE" "${QUICK[@]}" "${PEAK[@]}" \
  --max-seconds 70 --json "$OUT/job-gpt-train.json"
# The paper router's latency against the tokenizer's encode of the same batch (16x128x128).
part job-router 45 "$PY" bench/paper_job.py router --device "$DEVICE" "${QUICK[@]}" --json "$OUT/job-router.json"
# The exact search (prefix tree, paper preset): clips/s.
part job-search 75 "$PY" bench/paper_job.py search --device "$DEVICE" "${QUICK[@]}" --json "$OUT/job-search.json"
# 3. The kernels: flex masks' correctness, flex vs dense at the paper preset, GPT attention, VQ.
# Tokenizer (paper preset, bf16) forward + backward: flex vs dense-mask SDPA (first flex steps compile).
TOK_PRESET=paper; [[ $DEVICE == cpu ]] && TOK_PRESET=tiny
part bench-tokenizer 150 "$PY" bench/kernels.py tokenizer --device "$DEVICE" "${QUICK[@]}" --preset $TOK_PRESET \
  --batch 8 --dtype bf16 \
  --warmup 2 --repeats 3 --json "$OUT/bench-tokenizer.json"
part test-flex 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_flex_masks.py \
  --junitxml="$OUT/test-flex.xml" --durations=10
# GPT-B forward + backward in bf16 autocast, and causal attention: SDPA is_causal vs flex causal_padded.
GPT_PRESET=gpt-b; [[ $DEVICE == cpu ]] && GPT_PRESET=tiny
part bench-gpt 90 "$PY" bench/kernels.py gpt --device "$DEVICE" "${QUICK[@]}" --preset $GPT_PRESET --batch 16 --dtype bf16 \
  --warmup 2 --repeats 5 --json "$OUT/bench-gpt.json"
part bench-vq 90 "$PY" bench/kernels.py vq --device "$DEVICE" "${QUICK[@]}" --repeats 5 --json "$OUT/bench-vq.json"
# Whatever budget is left: the model tests on CUDA-capable torch (CPU paths; a regression check).
part test-models 60 "$PY" -m pytest -q -p no:cacheprovider -x tests/models/test_quantizer.py tests/models/test_masks.py

log "done in $(( $(date +%s) - START ))s; results in $OUT"
cat "$SUMMARY"
