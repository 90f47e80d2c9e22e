"""How the search's labels would spread under other reward weights, from a labels store alone.

    python examples/label_weights.py LABELS.zarr [--w-q 1.2] [--w-l 0.8,0.4,0.2,0.1,0.05,0.02]

The labels store keeps every explored assignment's metric, so the best assignment of each clip
under any (w_q, w_l) is recomputed without searching again (``evatok_cli.labels.Labels``, with the
store's own calibration). For each w_l: the labels' spread
(evatok_cli.assignments.label_spread: distinct assignments, entropy, most common share, shortest
and longest shares, collapsed or not), the mean tokens and the mean metric of the best assignments.
Choose weights on the TRAINING labels only.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from evatok_cli.assignments import label_spread
from evatok_cli.labels import load_labels


def sweep(path: str, w_q: float, w_ls: list[float]) -> list[dict]:
    lab = load_labels(path)
    rows = []
    for w_l in w_ls:
        best = lab.best_assignments(w_q, w_l)
        spread = label_spread(lab.space, best)
        rows.append(
            {
                "w_q": w_q,
                "w_l": w_l,
                "mean_tokens": spread["mean_tokens"],
                "mean_metric": float(lab.metric[np.arange(len(best)), best].astype(np.float64).mean()),
                **{
                    k: spread[k]
                    for k in ("distinct", "entropy_bits", "top", "shortest_share", "longest_share", "collapsed")
                },
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels")
    p.add_argument("--w-q", type=float, default=1.2)
    p.add_argument("--w-l", default="0.8,0.4,0.2,0.1,0.05,0.02")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = sweep(args.labels, args.w_q, [float(x) for x in args.w_l.split(",")])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        "| w_l | mean tokens | mean metric | distinct | entropy (bits) | most common | shortest | longest | collapsed |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        top = f"{tuple(r['top']['assignment'])} {r['top']['share']:.0%}"
        print(
            f"| {r['w_l']:g} | {r['mean_tokens']:.1f} | {r['mean_metric']:.3f} | {r['distinct']} | {r['entropy_bits']:.2f} | "
            f"{top} | {r['shortest_share']:.0%} | {r['longest_share']:.0%} | {'yes' if r['collapsed'] else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
