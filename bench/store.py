"""Token store throughput: Zarr vs WebDataset, write and read, and bytes on disk per token.

    python bench/store.py                      # 10k samples of ~800 tokens (400-1200)
    python bench/store.py --samples 2000 --out /tmp/bench

Samples follow a realistic assignment mix: the paper's space (K = {32..512}, T = 4), lengths
400-1200, weighted like a router's output around 800 tokens; tokens are uniform over a 16384-entry
codebook (VQ codes are close to incompressible, so this is the honest case for zstd). Everything
is measured in one run so the zarr/wds ratios are comparable on a noisy machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from evatok_cli.assignments import PAPER_SPACE
from evatok_cli.store import Sample, open_store, open_writer
from evatok_cli.store.zarr_format import ZarrReader

CODEBOOK = 16384


def make_samples(n: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    lengths = PAPER_SPACE.lengths()
    ok = np.flatnonzero((lengths >= 400) & (lengths <= 1200))
    w = np.exp(-0.5 * ((lengths[ok] - 800) / 200.0) ** 2)
    picks = rng.choice(ok, size=n, p=w / w.sum())
    out = []
    for i, a in enumerate(picks):
        bl = PAPER_SPACE.to_tuple(int(a))
        out.append(
            Sample(
                key=f"v_{i // 8:05d}_c{i % 8:02d}",
                tokens=rng.integers(0, CODEBOOK, size=sum(bl), dtype=np.int64),
                block_lengths=bl,
                assignment=int(a),
                source=f"/data/ucf101/class{i % 101:03d}/v_{i // 8:05d}.avi",
                clip_start=16 * (i % 8),
                label=i % 101,
            )
        )
    return out


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_format(fmt: str, root: Path, samples: list[Sample], batch: int, n_random: int, seed: int) -> dict:
    attrs = {
        "tokenizer": {"config": {"preset": "bench"}, "sha256": "0" * 64},
        "space": PAPER_SPACE.to_dict(),
        "clip": {"frames": 16, "height": 128, "width": 128, "fps": 8},
        "codebook_size": CODEBOOK,
    }
    path = root / f"store.{fmt}"
    total = sum(len(s.tokens) for s in samples)
    t = time.perf_counter()
    with open_writer(path, format=fmt, attrs=attrs, num_blocks=PAPER_SPACE.blocks) as w:
        for j in range(0, len(samples), batch):
            w.append(samples[j : j + batch])
    t_write = time.perf_counter() - t

    t = time.perf_counter()
    r = open_store(path)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    seq = 0
    for s in r:
        seq += len(s.tokens)
    t_seq = time.perf_counter() - t
    assert seq == total

    idx = np.random.default_rng(seed).integers(0, len(r), size=n_random)
    r = open_store(path)  # cold caches
    t = time.perf_counter()
    rnd = sum(len(r[int(i)].tokens) for i in idx)
    t_rnd = time.perf_counter() - t
    # Without the zarr chunk cache (what a store much larger than the cache sees); wds has none.
    r = ZarrReader(path, cache_bytes=0) if fmt == "zarr" else open_store(path)
    t = time.perf_counter()
    for i in idx:
        r[int(i)]
    t_nocache = time.perf_counter() - t
    return {
        "format": fmt,
        "write tok/s": total / t_write,
        "open s": t_open,
        "seq read tok/s": total / t_seq,
        "random read samples/s": n_random / t_rnd,
        "random read tok/s": rnd / t_rnd,
        "random, no cache smp/s": n_random / t_nocache,
        "bytes/token": disk_bytes(path) / total,
        "files": sum(1 for f in path.rglob("*") if f.is_file()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=64, help="samples per append() call")
    ap.add_argument("--random", type=int, default=1000, help="random-access reads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    samples = make_samples(args.samples, args.seed)
    lengths = np.array([len(s.tokens) for s in samples])
    print(
        f"{len(samples)} samples, {lengths.sum()} tokens (mean {lengths.mean():.0f}, "
        f"min {lengths.min()}, max {lengths.max()}), batch {args.batch}, codebook {CODEBOOK}"
    )
    root = Path(tempfile.mkdtemp(prefix="evatok-bench-", dir=args.out))
    try:
        rows = [bench_format(f, root, samples, args.batch, args.random, args.seed) for f in ("zarr", "wds")]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cols = [c for c in rows[0] if c != "format"]
    print(f"{'metric':<24}" + "".join(f"{r['format']:>14}" for r in rows) + f"{'zarr/wds':>12}")
    for c in cols:
        z, w = rows[0][c], rows[1][c]
        fmt = (lambda v: f"{v:14,.0f}") if abs(z) >= 100 else (lambda v: f"{v:14.3f}")
        print(f"{c:<24}{fmt(z)}{fmt(w)}{z / w:12.2f}")


if __name__ == "__main__":
    main()
