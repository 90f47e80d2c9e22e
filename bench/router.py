"""Benchmark: router latency as a fraction of tokenizer encode latency, at the same preset.

The router only pays off if choosing an assignment is cheap next to encoding with it (target: at
most 10% of the encode). Random (untrained) weights; float32; the same batch of random clips for
both models; ``Router.predict`` (one forward pass) against ``EVATokTokenizer.encode`` with every
clip at a uniform assignment, for two levels bracketing the paper's routed means (721-774 tokens
for levels {32..512}): uniform ``levels[2]`` (paper: 512 tokens) and ``levels[3]`` (paper: 1024,
the "traditional" length). Calls are interleaved (router, encode, encode, router, ...) and the
minimum of the repetitions is kept, so machine noise hits both sides alike.

Also times the policies on the router outputs of a large set: :func:`choose_assignments` and
:func:`budget_assignments` for 10,000 clips over 625 assignments.

Usage:
    python bench/router.py                      # tiny, small and paper: ~15 s on 2 loaded CPU cores (paper ~10 s)
    python bench/router.py --presets tiny small --reps 10
    python bench/router.py --device cuda --batch 16
    python bench/router.py --presets paper --router input_downsample=4   # try other router fields
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evatok_cli.assign import budget_assignments, choose_assignments
from evatok_cli.models.router import Router, router_config
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_preset(name: str, batch: int, reps: int, device: torch.device, overrides: dict[str, int]) -> None:
    torch.manual_seed(0)
    tok = EVATokTokenizer(tokenizer_config(name)).to(device).eval()
    c = tok.config
    router = Router(router_config(name, **overrides)).to(device).eval()
    video = torch.rand(batch, 3, c.frames, c.height, c.width, device=device) * 2 - 1
    levels = (c.levels[2], c.levels[3])
    assign = {k: torch.full((batch, c.blocks), k, dtype=torch.long, device=device) for k in levels}
    times: dict[str, list[float]] = {"router": [], **{f"encode@{k}": [] for k in levels}}
    with torch.inference_mode():
        router.predict(video)  # warm-up
        for k in levels:
            tok.encode(video, assign[k])
        for r in range(reps):
            order = ["router", *times.keys() - {"router"}]
            for key in order if r % 2 == 0 else order[::-1]:
                if key == "router":
                    times[key].append(timed(lambda: router.predict(video), device))
                else:
                    k = int(key.split("@")[1])
                    times[key].append(timed(lambda: tok.encode(video, assign[k]), device))
    t_router = min(times["router"])
    rc = router.config
    print(
        f"{name}: clips {c.frames}x{c.height}x{c.width}, batch {batch}; router {router.num_parameters() / 1e6:.2f}M "
        f"(dim {rc.dim}, depth {rc.depth}, input pooled {rc.input_downsample}x, {rc.temporal_patch}x{rc.spatial_patch}x"
        f"{rc.spatial_patch} patches -> {rc.num_patches} tokens), tokenizer {tok.num_parameters() / 1e6:.1f}M"
    )
    print(f"  router forward  {t_router * 1e3:9.2f} ms")
    for k in levels:
        t = min(times[f"encode@{k}"])
        print(
            f"  encode uniform {k:>3} x{c.blocks} ({k * c.blocks:>4} tokens) {t * 1e3:9.2f} ms   router/encode = {t_router / t:.3f}"
        )


def bench_policies() -> None:
    from evatok_cli.assignments import PAPER_SPACE

    q = np.random.default_rng(0).normal(size=(10_000, len(PAPER_SPACE))).astype(np.float32)
    t0 = time.perf_counter()
    choose_assignments(q, "reward", PAPER_SPACE, 1.2, 0.8)
    t1 = time.perf_counter()
    idx, lam = budget_assignments(q, PAPER_SPACE, 512.0)
    t2 = time.perf_counter()
    mean = PAPER_SPACE.lengths()[idx].mean()
    print(
        f"policies, 10k clips x 625: choose {1e3 * (t1 - t0):.1f} ms, budget 512 {1e3 * (t2 - t1):.0f} ms "
        f"(mean {mean:.1f} tokens, lambda {lam:.4g})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default: 20 tiny, 10 small, 2 paper)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--router",
        nargs="*",
        default=[],
        metavar="FIELD=INT",
        help="replace integer RouterConfig fields of every preset, e.g. input_downsample=2 depth=1",
    )
    args = ap.parse_args()
    overrides = {k: int(v) for k, v in (a.split("=", 1) for a in args.router)}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, float32")
    for name in args.presets:
        bench_preset(name, args.batch, args.reps or {"tiny": 20, "small": 10}.get(name, 2), device, overrides)
    bench_policies()


if __name__ == "__main__":
    main()
