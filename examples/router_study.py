"""Rate-distortion study of routed assignments against the uniform curve and the search's oracle.

    python examples/router_study.py --labels LABELS.zarr --routed NAME=ROUTED.jsonl [...] --out REPORT

LABELS is a labels store written by ``evatok search`` (exact search) over the evaluation clips: it
holds, for every clip, the metric of **every** assignment under the tokenizer that was searched.
Each ROUTED file is the JSON-lines output of ``evatok route -o`` over the same clips (matched by
key). Because the tokenizer is deterministic, the metric of a routed assignment is read from the
labels instead of reconstructing again, so uniform, oracle and router points come from the same
reconstructions:

- uniform: every clip at (k, ..., k), one point per level;
- oracle: per clip, the assignment maximising metric - lambda * tokens, one point per lambda (the
  search's best trade-off at every rate; no router can beat it on these clips);
- router: the routed assignment of each clip.

For each routed point: the uniform tokens needed for the same mean metric (log2-linear between
uniform points) and the savings at equal quality; the uniform and oracle metric at the same mean
tokens; and the share of the oracle's margin over the uniform curve that the router realises.
Also the router's mean tokens per block and per kind of clip (the clip's parent folder).

Writes REPORT.json, REPORT.md and REPORT.png (matplotlib, when installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from evatok_cli.evaluation import equal_quality_tokens
from evatok_cli.labels import Labels, load_labels

LAMBDAS = (0.0, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.024, 0.032, 0.05, 0.08, 0.12)


def log2_interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """y at x on the piecewise-linear curve through (log2 xs, ys); None outside its range."""
    lx = [math.log2(v) for v in xs]
    t = math.log2(x)
    for (x0, y0), (x1, y1) in zip(zip(lx, ys), zip(lx[1:], ys[1:])):
        if x0 <= t <= x1:
            return y0 + (t - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y0
    return None


def load_oriented(path: Path) -> tuple[Labels, np.ndarray]:
    """The labels and their metric (N, m**T) oriented so that higher is better."""
    lab = load_labels(path)
    m = lab.metric.astype(np.float64)
    if np.isnan(m).any():
        raise SystemExit(f"{path}: unexplored assignments (a beam search?): the study needs an exact search")
    return lab, m if lab.higher_is_better else -m


def study(labels: Path, routed: dict[str, Path]) -> dict:
    lab, m = load_oriented(labels)
    space, keys, sources = lab.space, lab.keys, lab.sources
    lengths = space.lengths().astype(np.float64)
    row = {k: i for i, k in enumerate(keys)}
    uniform = []
    for k in space.levels:
        a = space.to_index(space.uniform(k))
        uniform.append({"level": k, "tokens": float(lengths[a]), "metric": float(m[:, a].mean())})
    ux, uy = [p["tokens"] for p in uniform], [p["metric"] for p in uniform]
    oracle = []
    for lam in LAMBDAS:
        best = np.argmax(m - lam * lengths[None], axis=1)
        oracle.append(
            {"lambda": lam, "tokens": float(lengths[best].mean()), "metric": float(m[np.arange(len(m)), best].mean())}
        )
    oracle.sort(key=lambda p: p["tokens"])
    ox, oy = [p["tokens"] for p in oracle], [p["metric"] for p in oracle]
    points = []
    for name, path in routed.items():
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        idx, rows = [], []
        for r in recs:
            if r["key"] in row:
                rows.append(row[r["key"]])
                idx.append(int(r["index"]))
        if not rows:
            raise SystemExit(f"{path}: none of its keys is in {labels}")
        rows_a, idx_a = np.array(rows), np.array(idx)
        tokens = float(lengths[idx_a].mean())
        value = float(m[rows_a, idx_a].mean())
        # the uniform and oracle curves over the same clips as this router (all clips, normally)
        u_same = log2_interp(tokens, ux, uy)
        o_same = log2_interp(tokens, ox, oy)
        eq = equal_quality_tokens(list(zip(ux, uy)), value, higher_is_better=True)  # m is oriented
        per_block = space.table()[idx_a].mean(0)
        kinds: dict[str, list[int]] = defaultdict(list)
        for r, a in zip(rows_a, idx_a):
            kinds[Path(sources[r]).parent.name].append(int(lengths[a]))
        points.append(
            {
                "name": name,
                "clips": int(len(rows_a)),
                "tokens": tokens,
                "metric": value,
                "uniform_metric_at_tokens": u_same,
                "oracle_metric_at_tokens": o_same,
                "equal_quality_uniform_tokens": eq,
                "savings_at_equal_quality": None if eq is None else 1 - tokens / eq,
                "margin_over_uniform": None if u_same is None else value - u_same,
                "oracle_margin": None if u_same is None or o_same is None else o_same - u_same,
                "oracle_margin_realised": (
                    None
                    if u_same is None or o_same is None or o_same - u_same <= 1e-9
                    else (value - u_same) / (o_same - u_same)
                ),
                "tokens_per_block": [round(float(v), 2) for v in per_block],
                "tokens_per_kind": {k: round(float(np.mean(v)), 1) for k, v in sorted(kinds.items())},
            }
        )
    if not lab.higher_is_better:  # back to the metric's own sign (e.g. LPIPS, lower is better)
        for p in uniform + oracle + points:
            for k in (
                "metric",
                "uniform_metric_at_tokens",
                "oracle_metric_at_tokens",
                "margin_over_uniform",
                "oracle_margin",
            ):
                if p.get(k) is not None:
                    p[k] = -p[k]
    return {
        "labels": str(labels),
        "clips": len(keys),
        "metric": lab.metric_name,
        "higher_is_better": lab.higher_is_better,
        "uniform": uniform,
        "oracle": oracle,
        "routers": points,
    }


def render_md(rep: dict) -> str:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    out = [
        f"# Router study on {rep['clips']} clips ({rep['labels']}; metric {rep['metric']})",
        "",
        "| point | mean tokens | metric | uniform at same tokens | oracle at same tokens | uniform tokens for same metric | savings | oracle margin realised |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in rep["uniform"]:
        out.append(f"| uniform:{p['level']} | {p['tokens']:.1f} | {p['metric']:.3f} | | | | | |")
    for p in rep["oracle"]:
        out.append(f"| oracle lambda={p['lambda']} | {p['tokens']:.1f} | {p['metric']:.3f} | | | | | |")
    for p in rep["routers"]:
        sav = "-" if p["savings_at_equal_quality"] is None else f"{p['savings_at_equal_quality']:+.1%}"
        real = "-" if p["oracle_margin_realised"] is None else f"{p['oracle_margin_realised']:.0%}"
        out.append(
            f"| **{p['name']}** | {p['tokens']:.1f} | {p['metric']:.3f} | {f(p['uniform_metric_at_tokens'], 3)} | "
            f"{f(p['oracle_metric_at_tokens'], 3)} | {f(p['equal_quality_uniform_tokens'], 1)} | {sav} | {real} |"
        )
    out += ["", "Router tokens per block and per kind of clip:", ""]
    for p in rep["routers"]:
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in p["tokens_per_kind"].items())
        out.append(f"- {p['name']}: blocks {p['tokens_per_block']}; {kinds}")
    return "\n".join(out) + "\n"


def plot(rep: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot(
        [p["tokens"] for p in rep["uniform"]],
        [p["metric"] for p in rep["uniform"]],
        "o-",
        color="grey",
        label="uniform",
    )
    ax.plot(
        [p["tokens"] for p in rep["oracle"]],
        [p["metric"] for p in rep["oracle"]],
        "s--",
        color="tab:green",
        ms=3,
        label="oracle (search labels)",
    )
    # one colour and one legend entry per router; its budgets (name@budget) joined by a line
    routers: dict[str, list[dict]] = {}
    for p in rep["routers"]:
        routers.setdefault(p["name"].split("@")[0], []).append(p)
    colours = ("tab:red", "tab:blue", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:cyan", "black")
    for (name, pts), c in zip(routers.items(), colours * 4):
        pts = sorted(pts, key=lambda p: p["tokens"])
        style = "*:" if len(pts) > 1 else "*"
        ax.plot([p["tokens"] for p in pts], [p["metric"] for p in pts], style, ms=9, lw=1, color=c, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean tokens per clip")
    ax.set_ylabel(rep["metric"])
    ax.set_title(f"{rep['clips']} clips")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--routed", action="append", default=[], help="NAME=ROUTED.jsonl (repeat)")
    p.add_argument("--out", type=Path, required=True, help="report path without extension")
    args = p.parse_args(argv)
    routed = {}
    for item in args.routed:
        name, _, path = item.partition("=")
        routed[name] = Path(path)
    rep = study(args.labels, routed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render_md(rep))
    plot(rep, args.out.with_suffix(".png"))
    print(render_md(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
