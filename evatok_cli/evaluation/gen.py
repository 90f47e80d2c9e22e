"""``evatok eval gen``: gFVD of GPT samples under a protocol, with cached real statistics.

Class-to-video protocols sample class-balanced sequences. Frame-prediction protocols
(``k600-fp-50k``; ``tiny-fp`` for tests) continue real clips: sample i takes the protocol's real
clip ``i mod n`` (n selected clips), its first ``cond_frames`` frames padded to whole blocks and
encoded with the fixed prefix assignment (:mod:`evatok_cli.prefix`); the GPT samples the other
blocks unconditionally (the null class; CFG 1 by default, PAPER §6: no CFG for K600), and the
whole decoded clip is compared with the real clips.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from evatok_cli import __version__
from evatok_cli.checkpoint import open_model
from evatok_cli.config import save_json
from evatok_cli.evaluation.engine import (
    ClipSelection,
    EvalError,
    check_batch,
    finish_report,
    fvd_value,
    load_metric_weights,
    load_tokenizer,
    prepare_clips,
    resolve_protocol,
    token_summary,
)
from evatok_cli.evaluation.protocols import (
    ClipDataset,
    Protocol,
    balanced_labels,
    collate_clips,
)
from evatok_cli.evaluation.report import (
    EvalReport,
)
from evatok_cli.metrics import FeatureStats
from evatok_cli.prefix import encode_prefix, pad_condition, prefix_blocks_for, resolve_prefix
from evatok_cli.runtime import DistEnv, all_gather_objects, broadcast_object, process_group
from evatok_cli.sampling import check_tokenizer, decode_samples, default_cfg_scale, generate
from evatok_cli.video import to_model_input

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/evatok/fvd-stats`` (``~/.cache/evatok/fvd-stats`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evatok" / "fvd-stats"


def real_stats_key(sel: ClipSelection, protocol: Protocol, i3d_info: dict[str, Any]) -> str:
    """Cache key of real statistics: the inputs listing, the selected clips and geometry, the I3D weights."""
    blob = {
        "format": 1,
        "listing_sha256": sel.listing_sha256,
        "clips": [[r.source, s] for _, r, s in sel.items],
        "clip": protocol.clip_spec().to_dict(),
        "i3d": {k: i3d_info[k] for k in ("variant", "sha256", "resolution")},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _real_stats(sel: ClipSelection, fvd, env: DistEnv, *, batch_size: int, workers: int, spec: Any):
    stats = fvd.new_stats()
    failures: list[dict[str, str]] = []
    loader = DataLoader(
        ClipDataset(sel.mine(env), spec),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_clips,
    )
    for batch, bad in loader:
        failures += bad
        if batch["video"] is not None:
            fvd.update(stats, to_model_input(batch["video"]).to(env.device))
    stats.all_reduce()
    return stats, [f for part in all_gather_objects(failures, env) for f in part]


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


def evaluate_generation(
    gpt: str | Path,
    tokenizer: str | Path,
    real: Sequence[str | Path],
    *,
    protocol: str,
    i3d: str | Path,
    i3d_variant: str | None = None,
    num_samples: int | None = None,
    num_clips: int | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: str = "auto",
    ema: bool = True,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    prefix_assignment_spec: str | Sequence[int] | None = None,
    stdin=None,
) -> EvalReport:
    """gFVD of a GPT under a protocol (``evatok eval gen``).

    Samples: sample i gets class ``i mod C`` (classes balanced), or for a frame-prediction protocol
    continues real clip ``i mod n`` with the null class (see the module docstring); samples are drawn in chunks of
    ``batch_size``, chunk c with a generator seeded from ``(seed, c)`` and handed to rank
    ``c mod world_size``, so the samples do not depend on the number of ranks. Each sample is
    decoded by the tokenizer and its I3D features summed; statistics are all-reduced.

    Real statistics: the protocol's clips of ``real``, cached in ``cache_dir`` under
    ``real-<key>.safetensors`` with ``key`` = :func:`real_stats_key` (the inputs listing with file
    sizes, the selected clips, the geometry and the I3D weights sha256). A second run with the same
    inputs reads them instead of decoding the videos again.

    Args:
        gpt: a GPT model directory (or a training output directory).
        tokenizer: the tokenizer the GPT's token stores were written with (checked).
        real: the real videos of the protocol's split.
        protocol: a generation preset (``ucf-c2v-10k``, ``fvd2048-16f``, ``tiny``; frame prediction:
            ``k600-fp-50k``, ``tiny-fp``).
        i3d, i3d_variant: I3D weights (or ``random:SEED`` for tests) and variant (default: protocol's).
        num_samples: generated samples (default: the protocol's; another count is non-standard).
        num_clips: real clips: a seeded subset of this many (non-standard).
        cfg_scale: classifier-free guidance (default: the GPT preset's, PAPER §6).
        temperature, top_k, top_p: sampling (see :func:`evatok_cli.generate.generate`).
        seed: sampler seed (default: the protocol's seed).
        batch_size: samples per chunk (also clips per I3D batch for the real statistics).
        cache_dir: where real statistics are cached (default :func:`default_cache_dir`).
        use_cache: False to recompute (and not write) the real statistics.
        prefix_assignment_spec: frame prediction: the prefix block lengths (``paper``, ``max`` or
            ``k1,...,kP``; default: the GPT's training prefix, else ``paper``).

    Returns:
        The :class:`EvalReport` (complete on rank 0).
    """
    t0 = time.perf_counter()
    with process_group(device) as env:
        check_batch(batch_size, workers)
        if i3d is None:
            raise EvalError("gFVD needs --i3d (i3d_torchscript.pt for the paper's protocols)")
        tok_open, tok, geometry = load_tokenizer(tokenizer, env)
        proto, why = resolve_protocol(protocol, geometry, "gen", clips=None, i3d=i3d, i3d_variant=i3d_variant)
        gpt_open = open_model(gpt, "gpt", device=env.device, ema=ema)
        check_tokenizer(gpt_open, tok_open)
        model, meta = gpt_open.model, gpt_open.meta
        cfg = model.config
        n = proto.num_samples if num_samples is None else int(num_samples)
        if n < 1:
            raise EvalError(f"--num-samples must be >= 1, got {n}")
        if num_samples is not None and num_samples != proto.num_samples:
            why.append(f"--num-samples {num_samples} overrides the protocol's {proto.num_samples} samples")
            proto = dataclasses.replace(proto, num_samples=n)
        fp = proto.task == "frame-prediction"
        default_scale = 1.0 if fp else default_cfg_scale(meta.get("preset"), cfg.num_classes)
        scale = default_scale if cfg_scale is None else float(cfg_scale)
        sampler_seed = proto.seed if seed is None else int(seed)
        w = load_metric_weights(
            ["fvd"],
            proto,
            env,
            i3d=i3d,
            i3d_variant=i3d_variant,
            lpips_weights=None,
            lpips_heads=None,
            lpips_net="vgg",
            batch_size=batch_size,
        )
        fvd = w.fvd

        sel = prepare_clips(real, proto, num_clips, env, stdin)
        real_stats, real_failures, cache_info = _cached_real_stats(
            sel, proto, real, w, env, cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size, workers=workers
        )
        conditions, prefix_info = None, None
        if fp:  # continuation of the protocol's real clips, unconditional (the null class)
            labels = [cfg.num_classes] * n
            conditions, prefix_info = _conditions(sel, proto, tok, meta, prefix_assignment_spec, env, why)
        else:
            labels = balanced_labels(n, cfg.num_classes)  # no classes: the null class (id 0)
        fake, samples = _sample_stats(model, tok, labels, fvd, env, batch_size=batch_size, seed=sampler_seed,
                                      cfg_scale=scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                      conditions=conditions)  # fmt: skip
        deviations = why + sel.deviations + w.deviations
        if real_failures:
            deviations.append(f"{len(real_failures)} real clips failed to decode (first: {real_failures[0]['source']})")
        fvd_res = fvd_value(fvd, real_stats, fake, deviations) if env.is_main else None
        mean_tokens = float(np.mean([s["tokens"] for s in samples])) if samples else None
        per_class = Counter(s["class"] for s in samples)
        real_clips = fvd_res["n_real"] if fvd_res else (real_stats.count if real_stats is not None else None)
        summary = {
            "samples": len(samples),
            "real_clips": real_clips,
            "fvd": fvd_res["fvd"] if fvd_res else None,
            **token_summary(mean_tokens, tok.space, proto),
            "cfg_scale": scale,
        }
        report = EvalReport(
            kind="gen",
            protocol=sel.protocol.to_dict(),
            standard=False,
            deviations=deviations,
            test_only=w.test_only,
            summary=summary,
            models={"tokenizer": tok_open.record(), "gpt": gpt_open.record()},
            metric_weights=w.info,
            data={**sel.record(real, len(sel.items), real_failures), "real_stats_cache": cache_info},
            settings={
                "num_samples": n,
                "cfg_scale": scale,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "sampler_seed": sampler_seed,
                "batch_size": batch_size,
                "ema": ema,
                "device": str(env.device),
                "classes": cfg.num_classes,
                "per_class": {str(k): v for k, v in sorted(per_class.items())},
                "num_clips": num_clips,
                "prefix": prefix_info,
            },
            seed=proto.seed,
            fvd=fvd_res,
            samples=samples,
        )
        return finish_report(report, env, t0)


def _cached_real_stats(sel: ClipSelection, proto: Protocol, real: Sequence[str | Path], w: Any, env: DistEnv, *,
                       cache_dir: str | Path | None, use_cache: bool, batch_size: int,
                       workers: int) -> tuple[Any, list[dict[str, str]], dict[str, Any]]:  # fmt: skip
    """Real FVD statistics, cached on disk (rank 0 decides; every rank computes its share on a miss).

    Returns:
        (statistics (rank 0; None elsewhere on a hit), clips that failed, the report's cache record).
    """
    key = real_stats_key(sel, proto, w.info["i3d"])
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"real-{key[:32]}.safetensors"
    info = {"path": str(path) if use_cache else None, "key": key, "hit": False}
    info["hit"] = hit = bool(broadcast_object(use_cache and env.is_main and path.is_file(), env))
    if hit:  # only rank 0 needs them: it alone computes the FVD
        side = path.with_suffix(".json")
        if not env.is_main:
            return None, [], info
        failures = list(json.loads(side.read_text()).get("failures", [])) if side.is_file() else []
        return FeatureStats.load(path), failures, info
    stats, failures = _real_stats(sel, w.fvd, env, batch_size=batch_size, workers=workers, spec=proto.clip_spec())
    if use_cache and env.is_main:
        cache.mkdir(parents=True, exist_ok=True)
        stats.save(path)
        save_json(path.with_suffix(".json"), {
            "key": key, "protocol": proto.name, "inputs": [str(i) for i in real], "clips": len(sel.items),
            "failures": failures, "i3d": w.info["i3d"], "evatok_version": __version__})  # fmt: skip
    return stats, failures, info


def _conditions(sel: ClipSelection, proto: Protocol, tok: Any, meta: dict[str, Any],
                spec: str | Sequence[int] | None, env: DistEnv,
                why: list[str]) -> tuple[Callable[[list[int]], list[Any]], dict[str, Any]]:  # fmt: skip
    """Frame prediction: ``conditions(sample indices) -> prefixes`` and the report's prefix record.

    Sample i continues clip ``i mod n`` of the selection: its first ``cond_frames`` frames, padded
    to whole blocks by repeating the last one, encoded with the fixed prefix assignment.
    """
    space, tp = tok.space, tok.config.temporal_patch
    P = prefix_blocks_for(proto.cond_frames, tp)
    if not 1 <= P < space.blocks:
        raise EvalError(
            f"protocol {proto.name}: {proto.cond_frames} condition frames fill {P} of {space.blocks} blocks"
        )
    try:
        fixed, mismatch = resolve_prefix(meta, space.levels, P, spec)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if mismatch:
        why.append(mismatch)
    clips = ClipDataset(sel.items, proto.clip_spec())

    def conditions(indices: list[int]) -> list[Any]:
        want = [i % len(clips) for i in indices]
        distinct = sorted(set(want))
        frames = []
        for j in distinct:
            item = clips[j]
            if "error" in item:
                raise EvalError(f"{item['source']}: condition clip at {item['clip_start']}: {item['error']}")
            frames.append(torch.from_numpy(pad_condition(item["video"].numpy(), proto.cond_frames)))
        video = to_model_input(torch.stack(frames)).to(env.device)
        encoded = dict(zip(distinct, encode_prefix(tok, video, fixed)))
        return [encoded[j] for j in want]

    record = {"blocks": P, "assignment": list(fixed), "cond_frames": proto.cond_frames, "padded_to": P * tp,
              "tokens": sum(fixed), "labels": "null class"}  # fmt: skip
    return conditions, record


def _sample_stats(model: Any, tok: Any, labels: Sequence[int], fvd: Any, env: DistEnv, *, batch_size: int,
                  seed: int, cfg_scale: float, temperature: float, top_k: int | None, top_p: float | None,
                  conditions: Callable[[list[int]], list[Any]] | None = None,
                  ) -> tuple[Any, list[dict[str, Any]]]:  # fmt: skip
    """FVD statistics of generated samples (all ranks summed) and a record per sample (all ranks, in order).

    Chunk c of ``batch_size`` labels goes to rank c mod world with a generator seeded by (seed, c),
    so the samples do not depend on the number of ranks.
    """
    chunks = list(range(0, len(labels), batch_size))
    fake = fvd.new_stats()
    samples: list[dict[str, Any]] = []
    for c in range(env.rank, len(chunks), env.world_size):
        lo = chunks[c]
        chunk = labels[lo : lo + batch_size]
        gen = torch.Generator().manual_seed(_chunk_seed(seed, c))
        prefix = None if conditions is None else conditions(list(range(lo, lo + len(chunk))))
        out = generate(model, torch.tensor(chunk), cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=gen, prefix=prefix)  # fmt: skip
        fvd.update(fake, decode_samples(tok, out, env.device))
        samples += [{"index": lo + j, "class": int(label), "tokens": int(tokens.numel()),
                     "block_lengths": [int(k) for k in bl.tolist()]}
                    for j, (label, (tokens, bl)) in enumerate(zip(chunk, out))]  # fmt: skip
    fake.all_reduce()
    return fake, sorted((s for part in all_gather_objects(samples, env) for s in part), key=lambda s: s["index"])
