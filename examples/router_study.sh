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
#    outputs) and reward with the blocks form (20 outputs)
# -> routing of both held-out sets: the reward heads at fixed mean-token budgets, the classify head
#    at its one trade-off
# -> examples/router_study.py: uniform curve, oracle curve (the held-out labels) and the routed
#    points, savings at equal PSNR, share of the oracle's margin realised, tokens per kind/block.
#
# Nothing is chosen on the held-out sets: the budgets and every setting are fixed here. Every
# stage resumes: finished outputs are kept, unfinished searches continue their stores.
# Environment: RUN_DIR, TOKENIZER, TRAIN_CLIPS (176), HELDOUT_CLIPS (88), ROUTER_STEPS (1500),
# BUDGETS (128,192,256,320,384), CALIBRATION (500), BEAM (empty: exact search; N: beam width N), WORKERS (1), PYTHON.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
: "${RUN_DIR:=runs/claim}" "${TOKENIZER:=$HERE/../evatok_cli/demo/models/tokenizer}"
: "${TRAIN_CLIPS:=176}" "${HELDOUT_CLIPS:=88}" "${ROUTER_STEPS:=1500}" "${BUDGETS:=128,192,256,320,384}"
: "${CALIBRATION:=500}" "${WORKERS:=1}" "${BEAM=}"
mkdir -p "$RUN_DIR/reports"
cd "$RUN_DIR"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

[[ -f corpus/train/manifest.json ]] || "$PYTHON" "$HERE/demo_corpus.py" corpus/train --split train --clips "$TRAIN_CLIPS"
[[ -f corpus/heldout/manifest.json ]] || "$PYTHON" "$HERE/demo_corpus.py" corpus/heldout --split heldout --clips "$HELDOUT_CLIPS"
[[ -d real-heldout ]] || "$PYTHON" "$HERE/real_heldout.py" real-heldout

search() {  # NAME DATA [extra args]: exact search, resumable; the JSON summary in reports/
    local name=$1 data=$2
    shift 2
    [[ -s reports/search-$name.json ]] && return 0
    log "search $name"
    evatok search --tokenizer "$TOKENIZER" --data "$data" -o "labels-$name.zarr" --metric psnr --w-q 1.2 --w-l 0.8 \
        --calibration "$CALIBRATION" --workers "$WORKERS" --device cpu --json "$@" > "reports/search-$name.json.tmp" 2> "reports/search-$name.log"
    mv "reports/search-$name.json.tmp" "reports/search-$name.json"
}
# exact search by default: a beam guided by the reward explores only the assignments near that
# reward's optimum, while the reward heads learn every assignment's quality (for any budget);
# the held-out labels are always exact, since the oracle curve needs every assignment
search train corpus/train ${BEAM:+--beam "$BEAM"}
# the held-out sets reuse the train calibration, so their rewards are on the same scale
search heldout corpus/heldout --stats labels-train.zarr
search real real-heldout --clips all --stats labels-train.zarr

train() {  # NAME HEAD [extra args]
    local name=$1 head=$2
    shift 2
    [[ -f router-$name/DONE ]] && return 0
    log "router $name"
    evatok train router --labels labels-train.zarr --data corpus/train --head "$head" --preset small \
        --out "router-$name" --steps "$ROUTER_STEPS" --batch-size 32 --workers 0 --checkpoint-every 500 \
        --log-every 100 --device cpu --resume --quiet "$@"
    touch "router-$name/DONE"
}
train classify classify
train reward reward
train blocks reward --reward-form blocks

route() {  # ROUTER SET DATA OUT [extra args]
    local router=$1 set=$2 data=$3 out=$4
    shift 4
    [[ -s $out ]] && return 0
    evatok route --router "router-$router" --data "$data" --eval "labels-$set.zarr" -o "$out.tmp" --device cpu \
        --json "$@" > "reports/route-$(basename "$out" .jsonl).json"
    mv "$out.tmp" "$out"
}
for set in heldout real; do
    data=corpus/heldout clips=()
    [[ $set == real ]] && data=real-heldout clips=(--clips all)
    mkdir -p "routed-$set"
    args=(--labels "labels-$set.zarr")
    route classify "$set" "$data" "routed-$set/classify.jsonl" "${clips[@]}"
    args+=(--routed "classify=routed-$set/classify.jsonl")
    for router in reward blocks; do
        for b in ${BUDGETS//,/ }; do
            route "$router" "$set" "$data" "routed-$set/$router-$b.jsonl" --budget "$b" "${clips[@]}"
            args+=(--routed "$router@$b=routed-$set/$router-$b.jsonl")
        done
    done
    "$PYTHON" "$HERE/router_study.py" "${args[@]}" --out "reports/study-$set" > /dev/null
    log "reports/study-$set.md"
done
