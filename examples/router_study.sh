#!/usr/bin/env bash
# Does a router realise the search's gains? One tokenizer, three router heads, two held-out sets.
#
#   examples/router_study.sh                       # the shipped demo tokenizer, RUN_DIR=runs/claim
#   TOKENIZER=runs/small/proxy examples/router_study.sh
#
# corpus (train + held-out splits of examples/demo_corpus.py) and real held-out footage
# (examples/real_heldout.py: the last 30% of each real video, other codecs and sizes, full frame)
# -> exact search with TOKENIZER on all three sets (PSNR reward, the paper's w_q 1.2 / w_l 0.8)
# -> routers trained on the TRAIN labels only: classify (argmax labels), reward (joint, 625
#    outputs) and reward with the blocks form (20 outputs); both reward forms again with per-clip
#    quality targets and flips (reward-pc, blocks-pc)
# -> routing of both held-out sets: the reward heads at fixed mean-token budgets, the classify head
#    at its one trade-off
# -> examples/router_study.py: uniform curve, oracle curve (the held-out labels) and the routed
#    points, savings at equal PSNR, share of the oracle's margin realised, tokens per kind/block.
# -> `evatok eval curve --plot` on both held-out sets with CURVE_ROUTER at the budgets and the
#    quality-target (threshold) points: PSNR and SSIM against tokens, as PNG + JSON + markdown.
# -> with FINAL_STEPS > 0: two final tokenizers from the same start (TOKENIZER's weights), the same
#    steps and data: one on CURVE_ROUTER's assignments (argmax at the labels' weights), one on
#    uniform:MAX (the paper's Table 1 pair), then `evatok eval recon` of both on both held-out sets.
#
# With MORE_DATA (a corpus directory of more train-split clips, e.g. the proxy's own training clips)
# and MORE_CLIPS / VAL_CLIPS > 0: MORE_CLIPS of its clips (balanced over kinds) are searched too and
# every router trains on both label stores; VAL_CLIPS others form a validation split, searched and
# routed like the held-out sets, and CURVE_ROUTER=auto takes the router with the best mean savings
# at equal PSNR on it (reports/study-val.*, reports/curve-router.txt).
#
# EXTRA_LABELS: more labels stores of MORE_DATA clips, searched with TOKENIZER and the train
# calibration (e.g. results/round4/labels-more2.zarr); every router trains on them too.
# REAL_TRAIN=1: real footage for training (examples/real_heldout.py --part head: the first 70% of
# the real videos, the held-out set's framing and codecs, frames the corpus already trains on) is
# searched too (labels-real-train.zarr) and every router trains on it.
#
# ENSEMBLE="reward-pc blocks-pc" (two or more of ROUTERS, reward heads): their average
# (`evatok route --router A --router B`) is routed and studied as one more router, "ensemble", and
# can be the curve router (CURVE_ROUTER=ensemble or chosen by auto).
#
# Nothing is chosen on the held-out sets: the budgets and every setting are fixed here or on the
# validation split. Every stage resumes: finished outputs are kept, unfinished searches continue their stores.
# Environment: RUN_DIR, TOKENIZER, TRAIN_CLIPS (176), HELDOUT_CLIPS (88), ROUTER_STEPS (1500),
# ROUTERS (classify reward blocks reward-pc blocks-pc; NAME-sN: NAME from seed N), MORE_DATA, MORE_CLIPS (0), VAL_CLIPS (0),
# EXTRA_LABELS, REAL_TRAIN (0), ENSEMBLE, BUDGETS (128,192,256,320,384), CALIBRATION (500), BEAM (empty: exact search; N: beam width N), WORKERS (1),
# CURVE_ROUTER (blocks; fixed before any held-out number), TARGETS (18,20,22,24: PSNR thresholds),
# FINAL_STEPS (0: skip the final tokenizers), FINAL_DATA (corpus/train), FINAL_LR (3e-4), FINAL_W_Q / FINAL_W_L
# (the router's trade-off for the final pair; default its labels' weights; set them on the TRAIN split), PYTHON.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
: "${RUN_DIR:=runs/claim}" "${TOKENIZER:=$HERE/../evatok_cli/demo/models/tokenizer}"
: "${TRAIN_CLIPS:=176}" "${HELDOUT_CLIPS:=88}" "${ROUTER_STEPS:=1500}" "${BUDGETS:=128,192,256,320,384}"
: "${CALIBRATION:=500}" "${WORKERS:=1}" "${BEAM=}" "${CURVE_ROUTER:=blocks}" "${TARGETS:=18,20,22,24}"
: "${FINAL_STEPS:=0}" "${FINAL_DATA:=corpus/train}" "${FINAL_LR:=3e-4}" "${FINAL_W_Q=}" "${FINAL_W_L=}"
: "${ROUTERS:=classify reward blocks reward-pc blocks-pc}" "${MORE_DATA=}" "${MORE_CLIPS:=0}" "${VAL_CLIPS:=0}"
: "${EXTRA_LABELS=}" "${REAL_TRAIN:=0}" "${ENSEMBLE=}"
TRADE=()  # the router's trade-off for the final pair (train and evaluation alike)
[[ -n $FINAL_W_Q ]] && TRADE+=(--w-q "$FINAL_W_Q")
[[ -n $FINAL_W_L ]] && TRADE+=(--w-l "$FINAL_W_L")
TOKENIZER=$(cd "$(dirname "$TOKENIZER")" && pwd)/$(basename "$TOKENIZER")  # absolute: the stages run in RUN_DIR
mkdir -p "$RUN_DIR/reports"
cd "$RUN_DIR"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

[[ -f corpus/train/manifest.json ]] || "$PYTHON" "$HERE/demo_corpus.py" corpus/train --split train --clips "$TRAIN_CLIPS"
[[ -f corpus/heldout/manifest.json ]] || "$PYTHON" "$HERE/demo_corpus.py" corpus/heldout --split heldout --clips "$HELDOUT_CLIPS"
[[ -d real-heldout ]] || "$PYTHON" "$HERE/real_heldout.py" real-heldout

search() {  # NAME DATA [extra args]: exact search, resumable; the JSON summary in reports/
    local name=$1 data=$2 input=/dev/null
    shift 2
    [[ -s reports/search-$name.json ]] && return 0
    [[ $data == - ]] && input=lists/$name.txt  # the clips listed in lists/NAME.txt
    log "search $name"
    evatok search --tokenizer "$TOKENIZER" --data "$data" -o "labels-$name.zarr" --metric psnr --w-q 1.2 --w-l 0.8 \
        --calibration "$CALIBRATION" --workers "$WORKERS" --device cpu --json "$@" < "$input" \
        > "reports/search-$name.json.tmp" 2> "reports/search-$name.log"
    mv "reports/search-$name.json.tmp" "reports/search-$name.json"
}
# exact search by default: a beam guided by the reward explores only the assignments near that
# reward's optimum, while the reward heads learn every assignment's quality (for any budget);
# the held-out labels are always exact, since the oracle curve needs every assignment
search train corpus/train ${BEAM:+--beam "$BEAM"}
# the held-out sets reuse the train calibration, so their rewards are on the same scale
search heldout corpus/heldout --stats labels-train.zarr
search real real-heldout --clips all --stats labels-train.zarr
LABELS=(--labels labels-train.zarr) ROUTER_DATA=(--data corpus/train)
mkdir -p lists
if [[ -n $MORE_DATA ]] && ((MORE_CLIPS + VAL_CLIPS > 0)); then
    # lists/val.txt: the first VAL_CLIPS/kinds clips of each kind (sorted names); lists/more.txt: the next MORE_CLIPS/kinds
    [[ -s lists/more.txt || -s lists/val.txt ]] || "$PYTHON" - "$MORE_DATA" "$VAL_CLIPS" "$MORE_CLIPS" <<'EOF'
import json, sys
root, n_val, n_more = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = json.load(open(f"{root}/manifest.json"))
val, more = [], []
for kind in m["kinds"]:
    files = sorted(f"{root}/{c['file']}" for c in m["clips"] if c["kind"] == kind)
    a, b = n_val // len(m["kinds"]), n_more // len(m["kinds"])
    val, more = val + files[:a], more + files[a : a + b]
for name, rows in (("val", val), ("more", more)):
    open(f"lists/{name}.txt", "w").write("".join(f + "\n" for f in rows))
EOF
    if ((MORE_CLIPS > 0)); then
        search more - --stats labels-train.zarr
        LABELS+=(--labels labels-more.zarr) ROUTER_DATA+=(--data "$MORE_DATA")
    fi
    ((VAL_CLIPS > 0)) && search val - --stats labels-train.zarr
fi
if [[ -n $EXTRA_LABELS ]]; then
    [[ -n $MORE_DATA ]] || { echo "EXTRA_LABELS needs MORE_DATA (the corpus holding their clips)" >&2; exit 2; }
    for store in $EXTRA_LABELS; do LABELS+=(--labels "$store"); done
    ((MORE_CLIPS > 0)) || ROUTER_DATA+=(--data "$MORE_DATA")
fi
if ((REAL_TRAIN)); then
    [[ -d real-train ]] || "$PYTHON" "$HERE/real_heldout.py" real-train --part head
    search real-train real-train --clips all --stats labels-train.zarr
    LABELS+=(--labels labels-real-train.zarr) ROUTER_DATA+=(--data real-train)
fi

train() {  # NAME HEAD [extra args]
    local name=$1 head=$2
    shift 2
    [[ -f router-$name/DONE ]] && return 0
    log "router $name"
    evatok train router "${LABELS[@]}" "${ROUTER_DATA[@]}" --head "$head" --preset small \
        --out "router-$name" --steps "$ROUTER_STEPS" --batch-size 32 --workers 0 --checkpoint-every 500 \
        --log-every 100 --device cpu --resume --quiet "$@"
    touch "router-$name/DONE"
}
# reward-pc / blocks-pc: the reward heads with per-clip quality targets (Q minus the clip's mean:
# the same routing, no across-clip offset to learn) and left-right flips (docs/pipeline.md "Router")
declare -A HOW=([classify]="classify" [reward]="reward" [blocks]="reward --reward-form blocks"
    [reward-pc]="reward --quality per-clip --flip" [blocks-pc]="reward --reward-form blocks --quality per-clip --flip")
for router in $ROUTERS; do
    # NAME-sN: the router NAME trained from seed N (e.g. blocks-pc-s1, for an ensemble of seeds)
    base=$router seed=()
    [[ $router =~ ^(.+)-s([0-9]+)$ ]] && base=${BASH_REMATCH[1]} seed=(--seed "${BASH_REMATCH[2]}")
    [[ -n ${HOW[$base]:-} ]] || { echo "unknown router $router (ROUTERS: ${!HOW[*]}, optionally -sN)" >&2; exit 2; }
    # shellcheck disable=SC2086
    train "$router" ${HOW[$base]} "${seed[@]}"
done

router_dirs() {  # NAME -> its --router options (the members' for "ensemble")
    local members=$1
    [[ $1 == ensemble ]] && members=$ENSEMBLE
    for m in $members; do printf -- '--router\nrouter-%s\n' "$m"; done
}
route() {  # ROUTER SET DATA OUT [extra args]
    local router=$1 set=$2 data=$3 out=$4
    shift 4
    [[ -s $out ]] && return 0
    local dirs
    mapfile -t dirs < <(router_dirs "$router")
    evatok route "${dirs[@]}" --data "$data" --eval "labels-$set.zarr" -o "$out.tmp" --device cpu \
        --json "$@" > "reports/route-$set-$(basename "$out" .jsonl).json"
    mv "$out.tmp" "$out"
}
study() {  # SET: route SET with every router, then examples/router_study.py -> reports/study-SET.*
    local set=$1 data=corpus/heldout clips=() input=/dev/null
    [[ $set == real ]] && data=real-heldout clips=(--clips all)
    [[ $set == val ]] && data=- clips=(--clips all) input=lists/val.txt
    mkdir -p "routed-$set"
    local args=(--labels "labels-$set.zarr")
    for router in $ROUTERS ${ENSEMBLE:+ensemble}; do
        if [[ $router == classify ]]; then
            route classify "$set" "$data" "routed-$set/classify.jsonl" "${clips[@]}" < "$input"
            args+=(--routed "classify=routed-$set/classify.jsonl")
            continue
        fi
        for b in ${BUDGETS//,/ }; do
            route "$router" "$set" "$data" "routed-$set/$router-$b.jsonl" --budget "$b" "${clips[@]}" < "$input"
            args+=(--routed "$router@$b=routed-$set/$router-$b.jsonl")
        done
    done
    "$PYTHON" "$HERE/router_study.py" "${args[@]}" --out "reports/study-$set" > /dev/null
    log "reports/study-$set.md"
}
if ((VAL_CLIPS > 0)) && [[ -n $MORE_DATA ]]; then
    study val
    if [[ $CURVE_ROUTER == auto ]]; then
        # the reward router with the best mean savings at equal PSNR over the budgets, on the validation split
        CURVE_ROUTER=$("$PYTHON" -c "
import json, statistics
rows = json.load(open('reports/study-val.json'))['routers']
names = {r['name'].split('@')[0] for r in rows if '@' in r['name']}
mean = {n: statistics.mean(r['savings_at_equal_quality'] for r in rows if r['name'].split('@')[0] == n) for n in names}
print(max(sorted(mean), key=mean.get))")
        echo "$CURVE_ROUTER" > reports/curve-router.txt
        log "CURVE_ROUTER=$CURVE_ROUTER (best mean savings on the validation split)"
    fi
fi
[[ $CURVE_ROUTER == auto ]] && { echo "CURVE_ROUTER=auto needs MORE_DATA and VAL_CLIPS > 0" >&2; exit 2; }
for set in heldout real; do
    data=corpus/heldout clips=()
    [[ $set == real ]] && data=real-heldout clips=(--clips all)
    study "$set"
    curve=reports/curve-$set-$CURVE_ROUTER
    if [[ ! -s $curve.json ]]; then
        log "eval curve $set ($CURVE_ROUTER)"
        mapfile -t dirs < <(router_dirs "$CURVE_ROUTER")
        evatok eval curve --tokenizer "$TOKENIZER" --data "$data" "${dirs[@]}" --budgets "$BUDGETS" \
            --targets "$TARGETS" --metric psnr,ssim "${clips[@]}" -o "$curve.json" --plot "$curve.png" --device cpu --quiet
    fi
done

if ((FINAL_STEPS > 0)); then
    max=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['config']['levels'][-1])" "$TOKENIZER/config.json" 2>/dev/null \
        || python -c "import json,glob,sys; print(json.load(open(sorted(glob.glob(sys.argv[1]+'/step-*/config.json'))[-1]))['config']['levels'][-1])" "$TOKENIZER")
    final() {  # NAME [assignment args]
        local name=$1
        shift
        [[ -f final-$name/DONE ]] && return 0
        log "final tokenizer $name ($FINAL_STEPS steps)"
        evatok train tokenizer --stage final --preset small --data "$FINAL_DATA" --init "$TOKENIZER" --out "final-$name" \
            --steps "$FINAL_STEPS" --batch-size 8 --lr "$FINAL_LR" --warmup 50 --no-disc --no-lpips --workers 1 \
            --checkpoint-every 250 --log-every 50 --device cpu --seed 0 --resume "$@" > "reports/final-$name.log" 2>&1
        touch "final-$name/DONE"
    }
    mapfile -t curve_dirs < <(router_dirs "$CURVE_ROUTER")
    final router "${curve_dirs[@]}" "${TRADE[@]}"
    final uniform --assignment "uniform:$max"
    for set in heldout real; do
        data=corpus/heldout clips=()
        [[ $set == real ]] && data=real-heldout clips=(--clips all)
        for name in router uniform; do
            how=("${curve_dirs[@]}" "${TRADE[@]}")
            [[ $name == uniform ]] && how=(--assignment "uniform:$max")
            [[ -s reports/recon-final-$name-$set.json ]] || evatok eval recon --tokenizer "final-$name" --data "$data" \
                "${how[@]}" "${clips[@]}" --metrics psnr,ssim -o "reports/recon-final-$name-$set.json" --device cpu --quiet
        done
        evatok eval compare "reports/recon-final-uniform-$set.json" "reports/recon-final-router-$set.json" \
            -o "reports/compare-final-$set.md"
        log "reports/compare-final-$set.md"
    done
fi
