"""The ``evatok search`` job: search every clip of a dataset with a proxy tokenizer into a labels store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from evatok_cli.assignments import label_spread
from evatok_cli.checkpoint import OpenModel, open_model
from evatok_cli.labels import labels_attrs
from evatok_cli.metrics import Metric, get_metric
from evatok_cli.reward import DEFAULT_W_L, DEFAULT_W_Q, CalibrationStats, best_assignments, rewards
from evatok_cli.runtime import DistEnv, all_gather_objects, broadcast_object, process_group
from evatok_cli.search.calibration import calibrate, check_stats, reusable_calibration, stored_attrs
from evatok_cli.search.tree import beam_search, exact_search
from evatok_cli.store import Sample, open_store, open_writer
from evatok_cli.store.lock import acquire as acquire_store_lock
from evatok_cli.video import ClipSpec, absolute_source, clip_key, list_inputs, parse_clip_policy
from evatok_cli.video.dataset import ClipIndexDataset, collate_clips, to_model_input

log = logging.getLogger(__name__)


@dataclass
class SearchSummary:
    """What :func:`search_dataset` did (the same on every rank; counts are job totals)."""

    out: str
    format: str
    clips: int = 0  # clips searched by this run
    resumed: int = 0  # clips an earlier run already stored (or inputs it recorded as failed)
    failures: int = 0  # inputs that failed in this run (recorded in the store, not retried on resume)
    failed: list[dict[str, str]] = field(default_factory=list)  # {source, reason} of those
    mean_best_tokens: float = 0.0  # over the clips searched by this run
    wall_s: float = 0.0
    search_s: float = 0.0
    calibration_s: float = 0.0
    clips_per_s: float = 0.0
    block_evals_per_clip: float = 0.0
    nothing_to_do: bool = False
    world_size: int = 1
    beam: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    spread: dict[str, Any] = field(default_factory=dict)  # assignments.label_spread of this run's labels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def search_dataset(
    tokenizer: str | Path,
    data: Sequence[str],
    out: str | Path,
    *,
    format: str = "zarr",
    metric: str | Metric = "psnr",
    metric_options: dict[str, Any] | None = None,
    w_q: float = DEFAULT_W_Q,
    w_l: float = DEFAULT_W_L,
    calibration: int = 2000,
    stats: str | Path | CalibrationStats | None = None,
    beam: int | None = None,
    clips: str | int = "first",
    fps: str | float | None = None,
    batch_size: int = 8,
    workers: int = 2,
    chunk: int | None = None,
    seed: int = 0,
    device: str = "auto",
    stdin: IO[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> SearchSummary:
    """Search the best assignment of every clip of ``data`` with a proxy tokenizer; write a labels store.

    Args:
        tokenizer: the proxy's model directory (or a training output dir: its latest step).
        data: video files, directories, WebDataset tars or ``-`` (paths on ``stdin``).
        out: the labels store (created, or resumed when it holds an unfinished run of the same search).
        format: "zarr" or "wds".
        metric: "psnr", "ssim", "lpips" or a metric object; ``metric_options`` go to ``get_metric``
            (LPIPS: ``net``, ``backbone``, ``heads`` paths).
        w_q, w_l: reward weights (paper default 1.2 / 0.8).
        calibration: random (clip, assignment) pairs for the metric's mean/std.
        stats: a calibration file / :class:`CalibrationStats` / labels store to take mean/std from.
        beam: beam width, or None for the exact search.
        clips: clip policy per video: "first", "all", "random" or N.
        fps: clip frame rate; default the proxy's training rate (``clip_fps`` in its config.json).
        batch_size: clips per search call; workers: DataLoader decoding workers.
        chunk: branches per block step (default :func:`default_chunk`).
        seed: seeds calibration draws and the "random" clip policy.
        device: "auto", "cpu", "cuda", "cuda:N" (torchrun: one device per local rank).
        on_progress: called with (clips done, clips to do) on this rank after every batch.

    Returns:
        The job's :class:`SearchSummary`.

    Raises:
        ValueError: bad arguments, no videos, unusable calibration. StoreError: ``out`` holds
        something else (another search, another format or world size). CheckpointError: bad proxy.
    """
    if format not in ("zarr", "wds"):
        raise ValueError(f"format must be zarr or wds, got {format!r}")
    if beam is not None and beam < 1:
        raise ValueError(f"--beam must be >= 1, got {beam}")
    if batch_size < 1 or workers < 0 or (chunk is not None and chunk < 1):
        raise ValueError("batch_size and chunk must be >= 1, workers >= 0")
    if stats is None and calibration < 2:
        raise ValueError(f"--calibration needs at least 2 pairs, got {calibration}")
    policy, out, fmt = parse_clip_policy(clips), Path(out), format
    # one writer per store: a second job on the same store is refused before calibrating
    with process_group(device) as env, acquire_store_lock(out, rank=env.rank):
        t0 = time.perf_counter()
        proxy = open_model(tokenizer, "tokenizer", device=env.device, ema=True)
        model, meta, space = proxy.model, proxy.meta, proxy.model.config.space
        if meta.get("stage") not in (None, "proxy"):
            log.warning("%s is a %r tokenizer; the search is meant for a proxy tokenizer", proxy.dir, meta.get("stage"))
        c = model.config
        clip_fps = fps if fps is not None else meta.get("clip_fps", "native")
        spec = ClipSpec(frames=c.frames, height=c.height, width=c.width, fps=clip_fps)
        met = get_metric(metric, **(metric_options or {})) if isinstance(metric, str) else metric
        if isinstance(met, torch.nn.Module):
            met = met.to(env.device)
        refs = list_inputs(data, stdin=stdin)
        if not refs:
            raise ValueError(f"no videos found in {', '.join(map(str, data))}")
        t_cal = time.perf_counter()
        calib = _calibration(stats, proxy, refs, spec, met, out, env, count=calibration, seed=seed,
                             batch_size=batch_size, workers=workers)  # fmt: skip
        summary = SearchSummary(out=str(out), format=fmt, world_size=env.world_size, beam=beam,
                                calibration={"metric": met.name, **calib.attrs()},
                                calibration_s=time.perf_counter() - t_cal)  # fmt: skip
        attrs = labels_attrs(proxy, spec, met, w_q=w_q, w_l=w_l, calibration=calib, beam=beam)
        writer = open_writer(out, format=fmt, attrs=attrs, num_blocks=space.blocks, rank=env.rank,
                             world_size=env.world_size, barrier=env.barrier if env.distributed else None,
                             extra_fields={"metric": ("float32", (len(space),)), "reward": ("float32", ())})  # fmt: skip
        # This rank's share: videos rank, rank + world, ...; skip what an earlier run committed.
        ds = ClipIndexDataset(refs[env.rank :: env.world_size], spec, policy, seed)
        todo = _todo(ds, writer)
        if writer.finished:
            # More inputs into a finished labels store append as new parts; all ranks decide together.
            if not any(all_gather_objects(bool(todo), env)):
                writer.close()
                summary.nothing_to_do, summary.resumed = True, len(open_store(out))
                log.info("%s is already finished; nothing to do", out)
                summary.wall_s = time.perf_counter() - t0
                return summary
            writer.start_append()
        loader = DataLoader(Subset(ds, todo), batch_size=batch_size, num_workers=workers, collate_fn=collate_clips)
        mine = {"clips": 0, "evals": 0, "tokens": 0, "resumed": len(ds) - len(todo), "failed": [], "search_s": 0.0,
                "chosen": []}  # fmt: skip
        t_search, done = time.perf_counter(), 0
        with writer:
            for batch, failures in loader:
                for f in failures:
                    if f["source"] not in writer.failed_sources:
                        writer.add_failure(f["source"], f["error"])
                        mine["failed"].append({"source": f["source"], "reason": f["error"]})
                if batch["key"]:
                    video = to_model_input(batch["video"]).to(env.device)
                    res = (exact_search(model, video, met, chunk=chunk) if beam is None else
                           beam_search(model, video, met, width=beam, calibration=calib, w_q=w_q, w_l=w_l, chunk=chunk))  # fmt: skip
                    samples = _labelled(model, video, batch, res.metric.numpy(), calib, met, w_q=w_q, w_l=w_l)
                    writer.append(samples)
                    mine["clips"] += res.stats.clips
                    mine["evals"] += res.stats.block_evals
                    mine["tokens"] += sum(sum(s.block_lengths) for s in samples)
                    mine["chosen"] += [s.assignment for s in samples]
                done += len(batch["key"]) + len(failures)
                if on_progress is not None:
                    on_progress(done, len(todo))
        mine["search_s"] = time.perf_counter() - t_search
        parts = all_gather_objects(mine, env)
        summary.spread = label_spread(space, [a for p in parts for a in p["chosen"]])
        if summary.spread["collapsed"] and env.is_main:
            log.warning("the labels collapsed: %s (w_q=%g, w_l=%g); a router trained on them learns a constant. %s",
                        summary.spread["reason"], w_q, w_l, summary.spread["suggestion"])  # fmt: skip
        return _job_summary(summary, parts, t0)


def _calibration(stats: str | Path | CalibrationStats | None, proxy: OpenModel, refs: Sequence[Any], spec: ClipSpec,
                 met: Metric, out: Path, env: DistEnv, *, count: int, seed: int, batch_size: int,
                 workers: int) -> CalibrationStats:  # fmt: skip
    """A --stats file, the store's own (resume), or computed collectively (every rank gets the same)."""
    if stats is not None:
        calib = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
        check_stats(calib, met.name, proxy.sha256)
        return calib
    calib = broadcast_object(reusable_calibration(stored_attrs(out), met.name, proxy.sha256, seed, count), env)
    if calib is None:
        calib = calibrate(proxy.model, refs, spec, met, count=count, seed=seed, batch_size=batch_size,
                          workers=workers, rank=env.rank, world_size=env.world_size, proxy_sha256=proxy.sha256)  # fmt: skip
        log.info("calibration: %s mean %.6g std %.6g over %d pairs", met.name, calib.mean, calib.std, calib.count)
    return calib


def _todo(ds: ClipIndexDataset, writer: Any) -> list[int]:
    """Positions of the clips still to search: not committed, and not of a source that failed in an earlier run."""
    todo = []
    for i, (v, start, _err) in enumerate(ds.index):
        source = ds.refs[v].source
        if clip_key(source, max(start, 0)) not in writer.done_keys and source not in writer.failed_sources:
            todo.append(i)
    return todo


def _labelled(model: Any, video: torch.Tensor, batch: dict[str, Any], metric: np.ndarray,
              calib: CalibrationStats, met: Metric, *, w_q: float, w_l: float) -> list[Sample]:  # fmt: skip
    """The labels-store samples of a searched batch: the best assignment's tokens, the metric vector, its reward."""
    space = model.config.space
    reward = rewards(metric, calib, space, w_q, w_l, met.higher_is_better)
    best = best_assignments(reward)
    tokens, _ = model.encode(video, torch.as_tensor(space.table()[best], device=video.device))
    rows = zip(batch["key"], batch["source"], batch["clip_start"].tolist(), best, tokens)
    return [
        Sample(key=key, tokens=tok.cpu().numpy(), block_lengths=space.to_tuple(int(a)), assignment=int(a),
               source=src, clip_start=int(start), label=-1, source_path=absolute_source(src),
               extra={"metric": metric[j].astype(np.float32), "reward": np.float32(reward[j, a])})
        for j, (key, src, start, a, tok) in enumerate(rows)
    ]  # fmt: skip


def _job_summary(summary: SearchSummary, parts: list[dict[str, Any]], t0: float) -> SearchSummary:
    """Job totals from every rank's counts (the same on every rank)."""
    clips = summary.clips = sum(p["clips"] for p in parts)
    summary.resumed = sum(p["resumed"] for p in parts)
    summary.failed = [f for p in parts for f in p["failed"]]
    summary.failures = len(summary.failed)
    summary.mean_best_tokens = sum(p["tokens"] for p in parts) / clips if clips else 0.0
    summary.search_s = max(p["search_s"] for p in parts)
    summary.clips_per_s = clips / summary.search_s if summary.search_s > 0 else 0.0
    summary.block_evals_per_clip = sum(p["evals"] for p in parts) / clips if clips else 0.0
    summary.wall_s = time.perf_counter() - t0
    if clips == 0 and summary.resumed == 0 and summary.failed:
        first = summary.failed[0]
        raise ValueError(
            f"no valid input: all {summary.failures} inputs failed (first: {first['source']}: {first['reason']})"
        )
    return summary
