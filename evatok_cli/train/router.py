"""Stage 3: training the router on the searched labels (EVATok §3.3, PAPER §4).

Each labelled clip is decoded at its (source, clip_start) from the videos given with ``--data``;
the target comes from the labels store (``evatok_cli.route.load_labels``):

- ``classify`` head: cross-entropy on the best assignment (PAPER: one joint class per clip). With
  ``w_q``/``w_l`` other than the store's, the best assignment is recomputed from the stored metric
  vectors. With ``soft_tau`` the target is the distribution softmax(R / tau) over the explored
  assignments instead of the one-hot argmax.
- ``reward`` head: mean squared error to the per-assignment quality z-scores Q (m^T,), masking the
  assignments the search did not explore (NaN); the trade-off is chosen when routing. With
  ``quality="per-clip"`` the target is Q minus the clip's mean over its explored assignments: every
  routing policy (argmax of w_q*Q - w_l*Lz, budgets) compares assignments of one clip, or marginal
  gains across clips, and neither depends on a per-clip offset; the head then spends nothing on
  predicting how hard a clip is overall, which dominates Q (across-clip spread >> within-clip).

``flip`` mirrors a random half of each batch left-right (the labels stay the clip's: a mirrored
clip costs the tokenizer about the same), against overfitting small label sets.

Clip order is a function of the step (epoch permutations seeded by (seed, epoch)), so a resumed
run sees exactly the clips of an uninterrupted one. Small label sets (``preload``) are decoded once
into memory; larger ones are decoded on the fly by DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from evatok_cli.labels import LabelClipDataset, Labels, concat_labels, label_clips, load_labels
from evatok_cli.models.router import HEADS, Router, router_config
from evatok_cli.reward import DEFAULT_W_L, DEFAULT_W_Q
from evatok_cli.runtime import process_group
from evatok_cli.train import loop
from evatok_cli.train.data import StepSampler
from evatok_cli.train.dist import DistEnv, wrap_ddp
from evatok_cli.train.ema import EMA
from evatok_cli.train.schedule import warmup_cosine
from evatok_cli.train.task import ModelTask
from evatok_cli.video import ClipSpec, VideoError, VideoRef, list_inputs
from evatok_cli.video.dataset import to_model_input

log = logging.getLogger(__name__)

PRELOAD_BYTES = 1 << 30  # label sets whose decoded clips fit in this are decoded once, into memory
MAX_ATTEMPTS = 32


@dataclass(kw_only=True)
class RouterTrainConfig:
    """Optimisation settings (the paper trains 50k steps at batch 128; PAPER §4)."""

    steps: int
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup: int = 500
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    flip: bool = False  # mirror a random half of each batch left-right (a label-preserving augmentation)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class RouterTargets:
    """Per-label-row training targets (rows of the labels store)."""

    best: torch.Tensor  # (N,) int64 argmax assignment at (w_q, w_l)
    quality: torch.Tensor | None = None  # (N, m^T) float32 Q, NaN where unexplored (reward head)
    soft: torch.Tensor | None = None  # (N, m^T) float32 softmax(R / tau) (classify head, soft targets)
    lengths_z: torch.Tensor | None = None  # (m^T,) for the reward head's routed accuracy
    w_q: float = DEFAULT_W_Q
    w_l: float = DEFAULT_W_L


QUALITY_TARGETS = ("calibrated", "per-clip")


def make_targets(
    labels: Labels,
    head: str,
    *,
    w_q: float | None = None,
    w_l: float | None = None,
    soft_tau: float | None = None,
    quality: str = "calibrated",
) -> RouterTargets:
    """Targets of every labels row for ``head`` (see the module docstring)."""
    if quality not in QUALITY_TARGETS:
        raise ValueError(f"quality must be one of {QUALITY_TARGETS}, got {quality!r}")
    w_q, w_l = labels.weights(w_q, w_l)
    t = RouterTargets(best=torch.from_numpy(labels.best_assignments(w_q, w_l)), w_q=w_q, w_l=w_l)
    if head == "reward":
        q = labels.quality().astype(np.float64)
        if quality == "per-clip":
            explored = ~np.isnan(q)
            mean = np.where(explored, q, 0.0).sum(1, keepdims=True) / np.maximum(explored.sum(1, keepdims=True), 1)
            q = q - mean
        t.quality = torch.from_numpy(q.astype(np.float32))
        t.lengths_z = torch.from_numpy(labels.space.lengths_z().astype(np.float32))
    elif soft_tau is not None:
        if not soft_tau > 0:
            raise ValueError(f"soft_tau must be > 0, got {soft_tau}")
        r = torch.from_numpy(labels.rewards(w_q, w_l)) / soft_tau
        t.soft = torch.softmax(torch.nan_to_num(r, nan=-torch.inf), dim=1).float()
    return t


def classify_loss(logits: torch.Tensor, best: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on the argmax label, or against soft target distributions (B, m^T)."""
    if soft is None:
        return F.cross_entropy(logits.float(), best)
    return -(soft * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def reward_loss(q_hat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the explored (non-NaN) entries of the quality targets."""
    mask = ~torch.isnan(q)
    err = (q_hat.float() - torch.nan_to_num(q)) ** 2
    return (err * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class RouterTask(ModelTask):
    """The :class:`~evatok_cli.train.loop.TrainTask` of the router stage."""

    kind: ClassVar[str] = "router"

    model: Router
    cfg: RouterTrainConfig
    env: DistEnv
    targets: RouterTargets
    preset: str | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dev = self.env.device
        self.model.to(dev).train()
        self.ddp = wrap_ddp(self.model, self.env)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay
        )
        self.ema = EMA(self.model, self.cfg.ema_decay)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        )

    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        c, t, dev = self.cfg, self.targets, self.env.device
        lr = warmup_cosine(step, total=c.steps, warmup=min(c.warmup, c.steps // 10), max_lr=c.lr, min_lr=c.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        video = to_model_input(batch["video"]).to(dev, non_blocking=True)
        if c.flip:  # the same clips flip on a resumed run: the choice is a function of the step
            mirror = torch.rand(video.shape[0], generator=torch.Generator().manual_seed(step)) < 0.5
            video = torch.where(mirror.to(dev)[:, None, None, None, None], video.flip(-1), video)
        rows = batch["row"]
        best = t.best[rows].to(dev)
        with self.autocast:
            out = self.ddp(video).float()  # (B, m^T)
        if self.model.config.head == "classify":
            loss = classify_loss(out, best, None if t.soft is None else t.soft[rows].to(dev))
            routed = out.argmax(1)
        else:
            assert t.quality is not None and t.lengths_z is not None
            loss = reward_loss(out, t.quality[rows].to(dev))
            routed = (t.w_q * out - t.w_l * t.lengths_z.to(dev)).argmax(1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt.step()
        self.ema.update(self.model, step)
        return {
            "loss": loss.item(),
            "top1": float((routed == best).float().mean()),
            "grad_norm": float(gnorm),
            "lr": lr,
        }

    def batch_size(self, batch: dict) -> int:
        return int(batch["video"].shape[0])


# ----------------------------------------------------------------------------------------- data
class LabelledClipStream:
    """Map-style: stream index -> a labelled clip ``{"video": uint8 (F, H, W, 3), "row": int}``.

    Index i is position ``i % n`` of epoch ``i // n``'s permutation (seeded by (seed, epoch)). A clip
    that fails to decode is replaced by the next one of the permutation (deterministically).
    """

    def __init__(
        self, items: Sequence[tuple[int, VideoRef, int]], spec: ClipSpec, seed: int, clips: torch.Tensor | None = None
    ) -> None:
        if not items:
            raise ValueError("no labelled clips to train on")
        self.items = list(items)
        self.clips = clips  # (n, F, H, W, 3) uint8 when preloaded, aligned with items
        self.reader = LabelClipDataset(self.items, spec)
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return 2**62

    def _position(self, i: int) -> int:
        n = len(self.items)
        epoch, p = divmod(i, n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._perm[1][p])

    def __getitem__(self, i: int) -> dict:
        for k in range(MAX_ATTEMPTS):
            j = self._position(i + k)
            if self.clips is not None:
                return {"video": self.clips[j], "row": self.items[j][0]}
            item = self.reader[j]
            if "error" not in item:
                return {"video": item["video"], "row": item["row"]}
            log.warning("skipping clip %s@%d: %s", item["source"], item["clip_start"], item["error"])
        raise VideoError(self.items[0][1].source, f"no decodable labelled clip after {MAX_ATTEMPTS} attempts")


def preload_clips(
    items: Sequence[tuple[int, VideoRef, int]], spec: ClipSpec
) -> tuple[list[tuple[int, VideoRef, int]], torch.Tensor]:
    """Decode every item once (in source order); failures are dropped with a warning."""
    reader = LabelClipDataset(items, spec)
    keep, frames = [], []
    for j in range(len(reader)):
        item = reader[j]
        if "error" in item:
            log.warning("skipping clip %s@%d: %s", item["source"], item["clip_start"], item["error"])
            continue
        keep.append(items[j])
        frames.append(item["video"])
    if not keep:
        raise ValueError("none of the labelled clips could be decoded")
    return keep, torch.stack(frames)


def _collate(items: list[dict]) -> dict:
    return {"video": torch.stack([it["video"] for it in items]), "row": torch.tensor([it["row"] for it in items])}


def label_batches(
    stream: LabelledClipStream, *, local_batch: int, rank: int, world_size: int, workers: int
) -> Callable[[int], Iterator[dict]]:
    """``batches(start_step)`` for :func:`evatok_cli.train.loop.run`: ``video`` (B, F, H, W, 3), ``row`` (B,)."""

    def batches(start_step: int) -> Iterator[dict]:
        w = 0 if stream.clips is not None else workers
        return iter(
            DataLoader(
                stream,
                batch_size=local_batch,
                sampler=StepSampler(start_step, local_batch, rank, world_size),
                num_workers=w,
                collate_fn=_collate,
                prefetch_factor=4 if w > 0 else None,
            )
        )

    return batches


# ---------------------------------------------------------------------------------------- entry
def train_router(
    *,
    labels: str | Path | Sequence[str | Path],
    data: list[str],
    head: str,
    preset: str,
    out: Path,
    steps: int,
    batch_size: int = 32,
    reward_form: str = "joint",
    quality: str = "calibrated",
    soft_tau: float | None = None,
    w_q: float | None = None,
    w_l: float | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    checkpoint_every: int = 1000,
    keep_last: int = 3,
    log_every: int = 10,
    stop_at: int | None = None,
    preload: bool | None = None,
    stdin=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    **train_overrides: Any,
) -> Path:
    """Train a router on a labels store; one process or torchrun (DDP).

    Args:
        labels: the labels store written by ``evatok search``, or several stores of one search setup
            (same proxy, calibration and weights: e.g. a later batch searched with ``--stats``), read as one.
        data: video files, directories, ``-`` (paths on stdin) or WebDataset tars holding the labels'
            sources (matched by path, real path, or unique file name; unmatched sources are skipped).
        head: ``classify`` or ``reward``.
        preset: router preset (``tiny``, ``small``, ``paper``); clip geometry and space come from the labels.
        out: output directory; checkpoints are ``out/step-NNNNNNNN/`` model directories.
        reward_form: reward head: ``joint`` (one output per assignment) or ``blocks`` (one per block
            and level, averaged over blocks; :class:`~evatok_cli.models.router.RouterConfig`).
        quality: reward head targets: ``calibrated`` (the paper's z-scored Q) or ``per-clip`` (Q minus
            the clip's mean; the same routing, no across-clip offset to learn).
        soft_tau: classify head: soft targets softmax(R / tau) instead of the argmax label.
        w_q, w_l: reward weights for the classify targets (default: the labels store's); for the reward
            head they only set the routing defaults recorded in the checkpoint (and the logged top-1).
        resume: continue from the latest complete checkpoint in ``out``.
        preload: decode all clips into memory first (default: when they fit in 1 GiB).
        train_overrides: fields of :class:`RouterTrainConfig` (``lr``, ``warmup``, ``ema_decay``, ...).

    Returns:
        The directory of the final checkpoint.

    Raises:
        ValueError: bad head/options, not a labels store, or no labelled clip could be read.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if soft_tau is not None and head != "classify":
        raise ValueError("soft_tau (soft targets) applies to the classify head only")
    if quality != "calibrated" and head != "reward":
        raise ValueError("quality targets other than 'calibrated' apply to the reward head only")
    cfg = RouterTrainConfig(steps=steps, **train_overrides)
    paths = [labels] if isinstance(labels, (str, Path)) else list(labels)
    lab = concat_labels([load_labels(p) for p in paths])
    spec = lab.clip_spec()
    space = lab.space
    config = router_config(
        preset,
        frames=spec.frames,
        height=spec.height,
        width=spec.width,
        levels=space.levels,
        blocks=space.blocks,
        head=head,
        reward_form=reward_form,
    )
    targets = make_targets(lab, head, w_q=w_q, w_l=w_l, soft_tau=soft_tau, quality=quality)
    refs = list_inputs(data, stdin=stdin)
    if not refs:
        raise ValueError(f"no videos found in {', '.join(map(str, data))}")
    items, skipped = label_clips(lab, refs, spec)
    if not items:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"none of the {len(lab)} labelled clips of {lab.path} can be read from --data{first}")
    if preload is None:
        preload = len(items) * spec.frames * spec.height * spec.width * 3 <= PRELOAD_BYTES
    clips = None
    if preload:
        items, clips = preload_clips(items, spec)
    with process_group(device) as env:
        if env.is_main:
            log.info(
                "router %s (%s head): %d labelled clips (%d skipped), %d assignments",
                preset,
                head,
                len(items),
                len(lab) - len(items),
                len(space),
            )
        torch.manual_seed(seed)  # identical initial weights on every rank
        model = Router(config)
        meta = {
            "labels": {
                "path": lab.path,
                "metric": lab.metric_name,
                "higher_is_better": lab.higher_is_better,
                "w_q": targets.w_q,
                "w_l": targets.w_l,
                "soft_tau": soft_tau,
                "quality": quality,
                "clips": len(items),
            },
            "clip": spec.to_dict(),
            "seed": seed,
            "flip": cfg.flip,
        }
        task = RouterTask(model=model, cfg=cfg, env=env, targets=targets, preset=preset, extra_meta=meta)
        stream = LabelledClipStream(items, spec, seed, clips)
        batches = label_batches(
            stream, local_batch=batch_size, rank=env.rank, world_size=env.world_size, workers=workers
        )
        loop_cfg = loop.LoopConfig(
            steps=steps, checkpoint_every=checkpoint_every, keep_last=keep_last, log_every=log_every, stop_at=stop_at
        )
        return loop.run(task, batches, cfg=loop_cfg, out=Path(out), env=env, resume=resume, on_log=on_log)
