"""The table of examples/ablate_extras.sh: held-out PSNR/SSIM of tokenizers with and without the extras.

    python examples/ablate_extras.py --preset tiny --out reports/ablation reports/curve-tiny-*.json

Each input is an `evatok eval curve` report (uniform points only) of one tokenizer; its config.json
says which extras it has (``patch_depth``, ``dec_locality_bias``) and its training directory's
metrics.jsonl the training PSNR of the last logged steps. Writes OUT.json and OUT.md: per
tokenizer, the parameters, the mean training PSNR of the last 5 log lines, the held-out PSNR at
every uniform level, the mean over levels and its difference to the tokenizer without extras.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from safetensors import safe_open


def _params(model_dir: Path) -> int:
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        total = 0
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= int(d)
            total += n
        return total


def row(report_path: Path) -> dict:
    report = json.loads(report_path.read_text())
    model_dir = Path(report["models"]["tokenizer"]["path"])
    if not model_dir.is_absolute():
        model_dir = report_path.parent.parent / model_dir
    config = json.loads((model_dir / "config.json").read_text())["config"]
    log = model_dir.parent / "metrics.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    train_psnr = statistics.mean(r["psnr"] for r in lines[-5:]) if lines else None
    uniform = sorted((p for p in report["points"] if p["kind"] == "uniform"), key=lambda p: p["mean_tokens"])
    return {
        "name": report_path.stem.removeprefix("curve-"),
        "tokenizer": str(model_dir),
        "patch_depth": config["patch_depth"],
        "dec_locality_bias": config["dec_locality_bias"],
        "params": _params(model_dir),
        "steps": lines[-1]["step"] + 1 if lines else None,
        "train_psnr_last5": train_psnr,
        "clips": report["data"]["clips"],
        "uniform": [{"tokens": p["mean_tokens"], "psnr": p["psnr"], "ssim": p.get("ssim")} for p in uniform],
        "mean_psnr": statistics.mean(p["psnr"] for p in uniform),
        "mean_ssim": statistics.mean(p["ssim"] for p in uniform) if all("ssim" in p for p in uniform) else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="evatok eval curve reports (JSON), one per tokenizer")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md")
    args = ap.parse_args(argv)
    rows = [row(p) for p in args.reports]
    plain = next((r for r in rows if r["patch_depth"] == 0 and r["dec_locality_bias"] == 0), None)
    for r in rows:
        r["mean_psnr_vs_plain"] = None if plain is None else r["mean_psnr"] - plain["mean_psnr"]
    args.out.with_suffix(".json").write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=1) + "\n")
    tokens = [int(p["tokens"]) for p in rows[0]["uniform"]]
    head = ["tokenizer", "patch_depth", "locality bias", "params", "train PSNR"]
    head += [f"PSNR @{t}" for t in tokens] + ["mean PSNR", "vs no extras", "mean SSIM"]
    md = [f"# Extras ablation, preset {args.preset} (held-out split, {rows[0]['clips']} clips)", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], str(r["patch_depth"]), f"{r['dec_locality_bias']:g}", f"{r['params'] / 1e6:.3f}M"]
        cells.append("-" if r["train_psnr_last5"] is None else f"{r['train_psnr_last5']:.2f}")
        cells += [f"{p['psnr']:.2f}" for p in r["uniform"]]
        cells.append(f"{r['mean_psnr']:.2f}")
        cells.append("-" if r["mean_psnr_vs_plain"] is None else f"{r['mean_psnr_vs_plain']:+.2f} dB")
        cells.append("-" if r["mean_ssim"] is None else f"{r['mean_ssim']:.3f}")
        md.append("| " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
