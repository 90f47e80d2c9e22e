"""Benchmark the EVATok tokenizer on CPU: throughput, peak memory, cost of ragged (adaptive) batches.

For each preset (default ``tiny`` and ``small``) and the smallest, middle and largest uniform
assignment it measures encode and decode clips/s (median of ``--repeats`` timed runs after a warm-up)
and the peak resident-memory increase of one encode / one decode (each in a fresh child process:
Linux VmHWM after resetting it through /proc/self/clear_refs, with glibc returning freed blocks
over 64 KiB to the OS so that earlier calls do not hide the peak).

It then compares a *mixed* batch (clips with different assignments, lengths paired so that the
batch's mean length equals the middle uniform length) against the uniform batch of that same mean
length, for encode, decode and a training step (forward + backward), and reports the padding
fraction of the mixed batch and of uniformly random batches. Mixed and uniform runs are
interleaved so that the ratios come from the same conditions.

Usage::

    python bench/tokenizer.py                      # tiny + small, batch 8, 1 thread
    python bench/tokenizer.py --presets tiny --batch 16 --threads 2 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from evatok_cli.models import TOKENIZER_PRESETS, EVATokTokenizer
from evatok_cli.models.attention import padding_fraction


def _video(model: EVATokTokenizer, batch: int, seed: int = 0) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, c.frames, c.height, c.width, generator=g) * 2 - 1


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _mixed_assignments(model: EVATokTokenizer, batch: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random assignments, in pairs whose lengths sum to 2*target (mean length = target)."""
    table = model.space.table()
    lengths = table.sum(1)
    by_length: dict[int, np.ndarray] = {int(L): np.flatnonzero(lengths == L) for L in np.unique(lengths)}
    rows = []
    while len(rows) < batch:
        i = int(rng.integers(len(table)))
        partner = by_length.get(2 * target - int(lengths[i]))
        if partner is None or lengths[i] == target:
            continue
        rows += [i, int(rng.choice(partner))]
    if batch % 2:  # an odd batch gets one uniform clip of the target length
        rows[batch - 1] = model.space.to_index(model.space.uniform(target // model.config.blocks))
    return table[rows[:batch]]


def _child_memory(preset: str, op: str, level: int, batch: int, threads: int) -> float:
    """Peak RSS increase (MiB) of one encode or decode in a fresh process (Linux VmHWM, reset first)."""
    code = f"""
import torch
from evatok_cli.models import TOKENIZER_PRESETS, EVATokTokenizer
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
torch.set_num_threads({threads}); torch.manual_seed(0)
m = EVATokTokenizer(TOKENIZER_PRESETS[{preset!r}]).eval(); c = m.config
v = torch.rand({batch}, 3, c.frames, c.height, c.width) * 2 - 1
a = torch.full(({batch}, c.blocks), {level})
tok, bl = m.encode(v, a) if {op!r} == 'decode' else (None, None)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
before = status('VmRSS')
m.encode(v, a) if {op!r} == 'encode' else m.decode(tok, bl)
print(status('VmHWM') - before)
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return max(0.0, float(out.stdout.strip().splitlines()[-1]))


def bench_preset(name: str, batch: int, repeats: int, threads: int, memory: bool) -> dict:
    torch.manual_seed(0)
    model = EVATokTokenizer(TOKENIZER_PRESETS[name]).eval()
    c = model.config
    levels = c.levels
    picks = [levels[0], levels[len(levels) // 2], levels[-1]]
    video = _video(model, batch)
    rows = []
    for k in picks:
        a = torch.full((batch, c.blocks), k)
        tokens, lengths = model.encode(video, a)
        enc = _time(lambda: model.encode(video, a), repeats)
        dec = _time(lambda: model.decode(tokens, lengths), repeats)
        row = {
            "level": k,
            "tokens_per_clip": k * c.blocks,
            "encode_clips_s": batch / enc,
            "decode_clips_s": batch / dec,
        }
        if memory:
            row["encode_peak_mib"] = _child_memory(name, "encode", k, batch, threads)
            row["decode_peak_mib"] = _child_memory(name, "decode", k, batch, threads)
        rows.append(row)

    # Mixed (adaptive) batch vs uniform batch of the same mean length.
    mid = picks[1]
    rng = np.random.default_rng(0)
    mixed = torch.from_numpy(_mixed_assignments(model, batch, mid * c.blocks, rng))
    uniform = torch.full((batch, c.blocks), mid)
    assert float(mixed.sum(1).float().mean()) == mid * c.blocks
    train_model = EVATokTokenizer(c).train()

    def step(a: torch.Tensor) -> None:
        out = train_model(video, a)
        (out.losses["l1"] + out.losses["vq"]).backward()

    results: dict[str, list[float]] = {
        f"{op}_{kind}": [] for op in ("encode", "decode", "train") for kind in ("mixed", "uniform")
    }
    toks = {kind: model.encode(video, a) for kind, a in (("mixed", mixed), ("uniform", uniform))}
    for _ in range(repeats):  # interleaved
        for kind, a in (("mixed", mixed), ("uniform", uniform)):
            results[f"encode_{kind}"].append(_time(lambda: model.encode(video, a), 1))
            results[f"decode_{kind}"].append(_time(lambda: model.decode(*toks[kind]), 1))
            results[f"train_{kind}"].append(_time(lambda: step(a), 1))
    med = {k: statistics.median(v) for k, v in results.items()}
    random_batches = [torch.from_numpy(model.space.sample(rng, batch)) for _ in range(200)]
    return {
        "preset": name,
        "params_m": model.num_parameters() / 1e6,
        "rows": rows,
        "mixed": mixed.tolist(),
        "mean_length": mid * c.blocks,
        "ratio_encode": med["encode_mixed"] / med["encode_uniform"],
        "ratio_decode": med["decode_mixed"] / med["decode_uniform"],
        "ratio_train": med["train_mixed"] / med["train_uniform"],
        "padding_mixed": padding_fraction(mixed),
        "padding_random": float(np.mean([padding_fraction(b) for b in random_batches])),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(TOKENIZER_PRESETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, CPU, {args.threads} thread(s), batch {args.batch}, median of {args.repeats}")
    all_results = []
    for name in args.presets:
        r = bench_preset(name, args.batch, args.repeats, args.threads, not args.no_memory)
        all_results.append(r)
        print(f"\n## {name} ({r['params_m']:.2f}M params)")
        head = f"{'level':>6} {'tok/clip':>8} {'enc clips/s':>12} {'dec clips/s':>12}"
        if not args.no_memory:
            head += f" {'enc peak MiB':>13} {'dec peak MiB':>13}"
        print(head)
        for row in r["rows"]:
            line = (
                f"{row['level']:>6} {row['tokens_per_clip']:>8} "
                f"{row['encode_clips_s']:>12.1f} {row['decode_clips_s']:>12.1f}"
            )
            if not args.no_memory:
                line += f" {row['encode_peak_mib']:>13.1f} {row['decode_peak_mib']:>13.1f}"
            print(line)
        print(
            f"mixed batch (mean length {r['mean_length']}) / uniform batch, time ratio: "
            f"encode {r['ratio_encode']:.2f}, decode {r['ratio_decode']:.2f}, train step {r['ratio_train']:.2f}"
        )
        print(
            f"padding fraction: mixed batch {r['padding_mixed']:.3f}, "
            f"uniformly random batches of {args.batch} {r['padding_random']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=2)


if __name__ == "__main__":
    main()
