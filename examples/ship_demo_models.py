"""Export a finished pipeline run as the demo models shipped inside the package (docs/models.md).

Takes a run directory of ``examples/reproduce_small.sh`` (or any with the same layout) and writes
three minimal model directories (EMA weights in float16, no training state; see
``evatok_cli.checkpoint.export_model``) with their model cards:

=====================  ==========================================
RUN_DIR/final-router   -> evatok_cli/demo/models/tokenizer
RUN_DIR/router         -> evatok_cli/demo/models/router
RUN_DIR/gpt-router     -> evatok_cli/demo/models/gpt
=====================  ==========================================

Each source may be a model directory or a training output directory (its latest complete step).
The GPT's record of its tokenizer is pointed at the exported tokenizer (its weights change with
the float16 cast), after checking that the GPT was trained on tokens of that very tokenizer step.
The three are exported to a staging directory first, checked against each other (router and GPT
against the tokenizer) and against the size limit, and only then moved into place.

Usage::

    python examples/ship_demo_models.py runs/small
    python examples/ship_demo_models.py runs/small --trained-on "demo corpus (examples/demo_corpus.py), 352 clips" \\
        --card-json cards.json            # {"tokenizer": {"quality": {...}}, "gpt": {...}, "all": {...}}
    python examples/ship_demo_models.py runs/quick --dest /tmp/demo --max-mb 1
    EVATOK_DEMO_MODELS=/tmp/demo evatok info --models

Prints each model's size and sha256; exits 1 (nothing moved) when the total exceeds ``--max-mb``
(MB = 10^6 bytes) or a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from evatok_cli.checkpoint import (
    STATE_NAME,
    CheckpointError,
    export_model,
    read_model_meta,
    resolve_model_dir,
    weights_sha256,
)
from evatok_cli.train.checkpoints import read_state

SOURCES = {"tokenizer": "final-router", "router": "router", "gpt": "gpt-router"}
DEFAULT_DEST = Path(__file__).resolve().parents[1] / "evatok_cli" / "demo" / "models"


def auto_card(kind: str, src: Path) -> dict[str, Any]:
    """The card fields a checkpoint knows about itself: clip geometry, steps, ... (the preset is in config.json)."""
    meta = read_model_meta(src)
    cfg = meta["config"]
    card: dict[str, Any] = {}
    if (src / STATE_NAME).is_file():
        card["steps"] = int(read_state(src)["step"]) + 1
    if kind in ("tokenizer", "router"):
        card["resolution"] = f"{cfg['frames']}x{cfg['height']}x{cfg['width']}"
        card["levels"] = list(cfg["levels"])
    if kind == "tokenizer":
        card.update({k: meta[k] for k in ("stage", "assignment", "clip_fps") if k in meta})
    if kind == "router":
        card["head"] = cfg.get("head")
    if kind == "gpt":
        names = meta.get("class_names")
        card["classes"] = list(names) if names else cfg.get("num_classes")
        if "data" in meta:
            card["train_samples"] = meta["data"].get("samples")
    return card


def check_together(d: Path) -> None:
    """The router and the GPT work with the tokenizer beside them (the checks encode/generate make)."""
    from evatok_cli.checkpoint import open_model
    from evatok_cli.sampling import check_tokenizer

    opened = open_model(d / "tokenizer", "tokenizer")
    tok = opened.model
    router = open_model(d / "router", "router").model
    rc, tc = router.config, tok.config
    if router.space != tok.space or (rc.frames, rc.height, rc.width) != (tc.frames, tc.height, tc.width):
        raise CheckpointError(
            f"the router ({rc.frames}x{rc.height}x{rc.width}, {router.space.to_dict()}) does not fit "
            f"the tokenizer ({tc.frames}x{tc.height}x{tc.width}, {tok.space.to_dict()})"
        )
    check_tokenizer(open_model(d / "gpt", "gpt"), opened)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def ship(
    run_dir: Path, dest: Path, *, cards: dict[str, dict[str, Any]], max_mb: float, dtype: torch.dtype = torch.float16
) -> dict[str, dict[str, Any]]:
    """Export, check and move the three demo models into ``dest``; returns kind -> {bytes, sha256}."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=dest) as tmp:
        stage = Path(tmp)
        for kind, name in SOURCES.items():
            src = resolve_model_dir(run_dir / name)
            card = {**auto_card(kind, src), **cards.get("all", {}), **cards.get(kind, {})}
            export_model(
                src, stage / kind, dtype=dtype, card=card, tokenizer=stage / "tokenizer" if kind == "gpt" else None
            )
        check_together(stage)
        sizes = {k: {"bytes": dir_bytes(stage / k), "sha256": weights_sha256(stage / k)} for k in SOURCES}
        total = sum(s["bytes"] for s in sizes.values())
        for k, s in sizes.items():
            print(f"{k:<10} {s['bytes'] / 1e6:8.2f} MB  sha256 {s['sha256']}")
        print(f"{'total':<10} {total / 1e6:8.2f} MB  (limit {max_mb:g} MB)")
        if total > max_mb * 1e6:
            raise SystemExit(
                f"error: the demo models take {total / 1e6:.2f} MB, over the {max_mb:g} MB limit; "
                f"nothing was moved to {dest} (ship smaller presets)"
            )
        for k in SOURCES:
            if (dest / k).exists():
                shutil.rmtree(dest / k)
            (stage / k).rename(dest / k)
    print(f"shipped to {dest}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", type=Path, help="run directory holding final-router/, router/ and gpt-router/")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"where the models go (default: {DEFAULT_DEST})")
    p.add_argument("--trained-on", help="the card's trained_on field of all three models")
    p.add_argument(
        "--card-json", type=Path, help='card fields: {"all": {...}, "tokenizer": {...}, "router": {...}, "gpt": {...}}'
    )
    p.add_argument("--max-mb", type=float, default=30.0, help="fail above this total size (MB, default 30)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    args = p.parse_args(argv)
    cards: dict[str, dict[str, Any]] = json.loads(args.card_json.read_text()) if args.card_json else {}
    unknown = set(cards) - {"all", *SOURCES}
    if unknown:
        p.error(f"--card-json: unknown keys {sorted(unknown)} (use all, tokenizer, router, gpt)")
    if args.trained_on:
        cards["all"] = {"trained_on": args.trained_on, **cards.get("all", {})}
    missing = [str(args.run_dir / n) for n in SOURCES.values() if not (args.run_dir / n).is_dir()]
    if missing:
        p.error(f"missing in {args.run_dir}: {', '.join(missing)}")
    try:
        ship(args.run_dir, args.dest, cards=cards, max_mb=args.max_mb, dtype=getattr(torch, args.dtype))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
