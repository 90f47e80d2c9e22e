"""A deterministic store-writing job, imported by the store tests and run by them as a real process.

    python tests/store/store_job.py OUT --format zarr --samples 120 --batch 4
    python -m torch.distributed.run --nproc_per_node 2 tests/store/store_job.py OUT --dist

Prints ``committed N`` (this rank's committed samples) whenever that number grows, so a test can
SIGKILL it mid-way. It does what a resumable pipeline does: skip ``writer.done_keys`` and
``writer.failed_sources``, then feed the rest in a fixed order.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.store import Sample, open_writer

SPACE = AssignmentSpace(levels=(32, 64, 128, 256, 512), blocks=4)
EXTRA = {"metric": ("float32", (6,)), "reward": ("float32", ())}


def make_attrs(codebook_size: int = 1024, **more) -> dict:
    return {
        "tokenizer": {"config": {"preset": "tiny", "codebook_size": codebook_size}, "sha256": "0" * 64},
        "space": SPACE.to_dict(),
        "clip": {"frames": 16, "height": 128, "width": 128, "fps": 8},
        "codebook_size": codebook_size,
        **more,
    }


def make_sample(i: int, seed: int = 0, codebook_size: int = 1024, extra: bool = True) -> Sample:
    """Sample number i: random assignment, tokens, key; the same for the same (i, seed)."""
    rng = np.random.default_rng([seed, i])
    a = int(rng.integers(len(SPACE)))
    bl = SPACE.to_tuple(a)
    return Sample(
        key=f"clip{i:05d}_{rng.integers(1 << 30):x}",
        tokens=rng.integers(0, codebook_size, size=sum(bl)),
        block_lengths=bl,
        assignment=a,
        source=f"videos/class{i % 7}/v_{i // 3:04d}.mp4",
        clip_start=int(16 * (i % 3)),
        label=int(i % 7) if i % 5 else -1,
        extra={"metric": rng.random(6, dtype=np.float32), "reward": np.float32(rng.normal())} if extra else {},
    )


def failing_source(i: int) -> bool:
    return i % 37 == 36


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--format", default="zarr", help="zarr, wds, or zarr,wds (writes OUT.zarr and OUT.wds)")
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--commit-every", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--dist", action="store_true", help="torchrun: gloo group, barrier, rank's share")
    ap.add_argument("--kill-rank", type=int, default=-1, help="with --dist: this rank SIGKILLs itself...")
    ap.add_argument("--kill-after", type=int, default=0, help="...once it committed this many samples")
    args = ap.parse_args(argv)

    rank, world, barrier = 0, 1, None
    if args.dist:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world, barrier = dist.get_rank(), dist.get_world_size(), dist.barrier
    formats = args.format.split(",")
    for fmt in formats:
        out = args.out if len(formats) == 1 else f"{args.out}.{fmt}"
        finished = write(out, fmt, args, rank, world, barrier)
        print(f"done rank {rank} {fmt} finished={finished}", flush=True)
    if args.dist:
        import torch.distributed as dist

        dist.destroy_process_group()


def write(out: str, fmt: str, args: argparse.Namespace, rank: int, world: int, barrier) -> bool:
    with open_writer(
        out,
        format=fmt,
        attrs=make_attrs(),
        num_blocks=SPACE.blocks,
        rank=rank,
        world_size=world,
        extra_fields=EXTRA,
        commit_every=args.commit_every,
        samples_per_shard=args.per_shard,
        barrier=barrier,
    ) as w:
        if w.finished:
            print("nothing to do", flush=True)
            return True
        mine = [i for i in range(args.samples) if i % world == rank]
        todo = [i for i in mine if str(i) not in w.failed_sources]
        batch: list[Sample] = []
        last = w.committed
        for i in todo:
            if failing_source(i):
                w.add_failure(str(i), f"synthetic failure of source {i}")
                continue
            s = make_sample(i)
            if s.key in w.done_keys:
                continue
            batch.append(s)
            if len(batch) == args.batch:
                w.append(batch)
                batch = []
                if args.sleep:
                    time.sleep(args.sleep)
            if w.committed != last:
                last = w.committed
                print(f"committed {last}", flush=True)
                if rank == args.kill_rank and last >= args.kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        w.append(batch)
    return w.finished


if __name__ == "__main__":
    sys.exit(main())
