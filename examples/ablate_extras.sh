#!/usr/bin/env bash
# Do the tokenizer's two extras help at small scale? (docs/tokenizer.md, "paper is the paper's architecture")
#
#   examples/ablate_extras.sh                          # tiny preset, RUN_DIR=runs/ablate
#   PRESET=small STEPS=600 examples/ablate_extras.sh
#
# Four proxy tokenizers of one preset from the same seed, data, steps and schedule, the two extras
# switched on and off in every combination (PATCH layers: tiny 1, else 2; BIAS: 4):
#   both     --patch-depth PATCH --dec-locality-bias BIAS
#   no-patch --patch-depth 0 (the paper's linear patch embedding) --dec-locality-bias BIAS
#   no-bias  --patch-depth PATCH --dec-locality-bias 0 (the paper's plain decoder cross-attention)
#   paper    both off (the paper's architecture at this preset's size)
# then `evatok eval curve` (uniform assignments at every level, PSNR and SSIM) of each on the corpus'
# held-out split, and examples/ablate_extras.py's table (reports/ablation.md/json). Nothing is
# chosen on the held-out split except the preset defaults this ablation reports on.
# Environment: RUN_DIR (runs/ablate), PRESET (tiny), PATCH, BIAS, STEPS (1500), BATCH (8), LR (3e-4), SEED (0), DATA
# (corpus/train of examples/demo_corpus.py, TRAIN_CLIPS 352 clips), HELDOUT (corpus/heldout, 88), PYTHON.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
: "${RUN_DIR:=runs/ablate}" "${PRESET:=tiny}" "${STEPS:=1500}" "${BATCH:=8}" "${LR:=3e-4}" "${TRAIN_CLIPS:=352}" "${SEED:=0}"
mkdir -p "$RUN_DIR/reports"
cd "$RUN_DIR"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
: "${DATA:=corpus/train}" "${HELDOUT:=corpus/heldout}"
[[ -e $DATA/manifest.json || $DATA != corpus/train ]] || "$PYTHON" "$HERE/demo_corpus.py" corpus/train --split train --clips "$TRAIN_CLIPS"
[[ -e $HELDOUT/manifest.json || $HELDOUT != corpus/heldout ]] || "$PYTHON" "$HERE/demo_corpus.py" corpus/heldout --split heldout --clips 88

PATCH=${PATCH:-$([[ $PRESET == tiny ]] && echo 1 || echo 2)} BIAS=${BIAS:-4}
declare -A EXTRA=([both]="--patch-depth $PATCH --dec-locality-bias $BIAS"
    [no-patch]="--patch-depth 0 --dec-locality-bias $BIAS" [no-bias]="--patch-depth $PATCH --dec-locality-bias 0"
    [paper]="--patch-depth 0 --dec-locality-bias 0")
for name in both no-patch no-bias paper; do
    out=$PRESET-$name
    if [[ ! -f $out/DONE ]]; then
        log "train $out ($STEPS steps)"
        # shellcheck disable=SC2086
        evatok train tokenizer --stage proxy --preset "$PRESET" --data "$DATA" --out "$out" --steps "$STEPS" \
            --batch-size "$BATCH" --lr "$LR" --warmup 100 --no-disc --no-lpips --workers 1 --seed "$SEED" \
            --checkpoint-every 500 --log-every 50 --device cpu --resume --quiet ${EXTRA[$name]} > "reports/train-$out.log" 2>&1
        touch "$out/DONE"
    fi
    [[ -s reports/curve-$out.json ]] || evatok eval curve --tokenizer "$out" --data "$HELDOUT" --metric psnr,ssim \
        -o "reports/curve-$out.json" --device cpu --quiet
done
"$PYTHON" "$HERE/ablate_extras.py" --preset "$PRESET" --out reports/ablation reports/curve-"$PRESET"-{both,no-patch,no-bias,paper}.json
log "reports/ablation.md"
