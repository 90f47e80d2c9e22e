"""Stage 1 and stage 4: training the proxy and the final tokenizer (PAPER §2, §5).

The loss (PAPER Eq. 1-2) is

    L = w_l1 * L1 + w_p * LPIPS + w_adv * adv + VQ + w_ent * entropy (+ w_align * align)

with the perceptual term only when a perceptual loss is given, the adversarial term (transformer
PatchGAN, hinge) only from ``disc_start`` on, and the alignment term only when an alignment hook is
given (a callable ``hook(video, dec_features) -> loss``; the V-JEPA2 teacher plugs in there).

The proxy stage draws a random assignment per clip (uniform per block by default); the final stage
takes each clip's assignment from an assignment policy (a fixed/uniform assignment now; a router
or a labels store once those exist).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evatok_cli.checkpoint import load_model, save_model
from evatok_cli.metrics.pixel import psnr_frames
from evatok_cli.models.discriminator import PatchDiscriminator, d_hinge_loss, g_adversarial_loss, logit_penalty
from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.train.dist import DistEnv, wrap_ddp
from evatok_cli.train.ema import EMA
from evatok_cli.train.schedule import warmup_cosine
from evatok_cli.video.dataset import to_model_input

log = logging.getLogger(__name__)

AssignmentPolicy = Callable[[dict, int], torch.Tensor]
"""(batch, step) -> (B, T) tokens per block for the clips of ``batch``."""


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    """Optimisation and loss settings (PAPER §2 / supplementary H where it speaks)."""

    steps: int
    lr: float = 1e-4  # PAPER: cosine, max 1e-4
    min_lr: float = 1e-6  # PAPER: end 1e-6
    warmup: int = 1000
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    entropy_weight: float = 0.02  # PAPER: gamma = 0.02
    align_weight: float = 0.7  # PAPER: lambda = 0.7
    adv_weight: float = 0.1
    disc_start: int = 20_000
    disc_lr: float = 1e-4
    logit_penalty_weight: float = 1e-3

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def random_assignments(levels: tuple[int, ...], blocks: int, seed: int, rank: int) -> AssignmentPolicy:
    """Proxy stage: every block of every clip gets a level drawn uniformly (PAPER §2, inference)."""
    lv = torch.tensor(levels, dtype=torch.long)

    def policy(batch: dict, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
        b = batch["video"].shape[0]
        return lv[torch.randint(len(levels), (b, blocks), generator=g)]

    return policy


def router_assignments(path: Path, space, clip: tuple[int, int, int], device: torch.device,
                       w_q: float | None = None, w_l: float | None = None) -> AssignmentPolicy:
    """Final stage (PAPER §3.4): a frozen router decides every training clip's assignment."""
    from evatok_cli.route import RouterPolicy

    router = RouterPolicy.load(path, space, clip, device, w_q=w_q, w_l=w_l)

    def policy(batch: dict, step: int) -> torch.Tensor:
        return router(to_model_input(batch["video"]).to(device)).to(torch.long)

    return policy


def fixed_assignment(assignment: tuple[int, ...]) -> AssignmentPolicy:
    """Every clip gets the same assignment (the uniform baseline, or a fixed one)."""
    a = torch.tensor(assignment, dtype=torch.long)

    def policy(batch: dict, step: int) -> torch.Tensor:
        return a.expand(batch["video"].shape[0], -1).clone()

    return policy


@dataclass
class TokenizerTask:
    """The :class:`~evatok_cli.train.loop.TrainTask` of the tokenizer stages."""

    model: EVATokTokenizer
    cfg: TokenizerTrainConfig
    env: DistEnv
    assign: AssignmentPolicy
    preset: str | None = None
    stage: str = "proxy"
    discriminator: PatchDiscriminator | None = None
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    align_hook: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dev = self.env.device
        self.model.to(dev).train()
        self.ddp = wrap_ddp(self.model, self.env)
        params = list(self.model.parameters())
        if isinstance(self.align_hook, torch.nn.Module):
            self.align_hook.to(dev)
            params += [p for p in self.align_hook.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        self.d_ddp = self.d_opt = None
        if self.discriminator is not None:
            self.discriminator.to(dev).train()
            self.d_ddp = wrap_ddp(self.discriminator, self.env)
            self.d_opt = torch.optim.AdamW(self.discriminator.parameters(), lr=self.cfg.disc_lr, betas=self.cfg.betas)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict, step: int) -> dict[str, float]:
        c = self.cfg
        lr = warmup_cosine(step, total=c.steps, warmup=min(c.warmup, c.steps // 10), max_lr=c.lr, min_lr=c.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = lr
        video = to_model_input(batch["video"]).to(self.env.device, non_blocking=True)
        assignments = self.assign(batch, step).to(self.env.device)
        use_gan = self.d_ddp is not None and step >= c.disc_start
        with self.autocast:
            out = self.ddp(video, assignments)
        recon = out.recon.float()
        loss = c.l1_weight * (recon - video).abs().mean() + out.losses["vq"] + c.entropy_weight * out.losses["entropy"]
        metrics: dict[str, float] = {}
        if self.perceptual is not None:
            p = self.perceptual(recon, video)
            loss = loss + c.perceptual_weight * p
            metrics["perceptual"] = p.item()
        if self.align_hook is not None:
            a = self.align_hook(video, out.dec_features)
            loss = loss + c.align_weight * a
            metrics["align"] = a.item()
        if use_gan:
            assert self.d_ddp is not None
            for p in self.discriminator.parameters():  # type: ignore[union-attr]
                p.requires_grad_(False)
            with self.autocast:
                g_adv = g_adversarial_loss(self.d_ddp(recon).float())
            loss = loss + c.adv_weight * g_adv
            metrics["g_adv"] = g_adv.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt.step()
        self.ema.update(self.model)
        if use_gan:
            metrics.update(self._discriminator_step(video, recon.detach(), lr))
        with torch.no_grad():
            psnr = psnr_frames(recon.detach(), video).mean()
        metrics.update(
            loss=loss.item(),
            l1=out.losses["l1"].item(),
            vq=out.losses["vq"].item(),
            entropy=out.losses["entropy"].item(),
            psnr=psnr.item(),
            usage=float(out.stats["usage"]),
            perplexity=float(out.stats["perplexity"]),
            tokens=float(assignments.sum(1).float().mean()),
            grad_norm=float(gnorm),
            lr=lr,
        )
        return metrics

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, lr: float) -> dict[str, float]:
        assert self.d_ddp is not None and self.d_opt is not None and self.discriminator is not None
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        for g in self.d_opt.param_groups:
            g["lr"] = lr * self.cfg.disc_lr / self.cfg.lr
        with self.autocast:
            lr_, lf = self.d_ddp(real).float(), self.d_ddp(fake).float()
        d_loss = d_hinge_loss(lr_, lf)
        total = d_loss + self.cfg.logit_penalty_weight * logit_penalty(lr_, lf)
        self.d_opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.cfg.grad_clip)
        self.d_opt.step()
        return {"d_loss": d_loss.item(), "d_real": lr_.mean().item(), "d_fake": lf.mean().item()}

    # ------------------------------------------------------------------ state
    def batch_size(self, batch: dict) -> int:
        return int(batch["video"].shape[0])

    def save_model(self, path: Path) -> None:
        save_model(path, self.model, self.model.config, kind="tokenizer", preset=self.preset,
                   ema=self.ema.weights_for(self.model), extra={"stage": self.stage, **self.extra_meta})

    def load_model(self, path: Path) -> None:
        loaded = load_model(path, kind="tokenizer", ema=False, map_location=self.env.device)
        self.model.load_state_dict(loaded.state_dict())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"opt": self.opt.state_dict(), "ema": self.ema.state_dict()}
        if self.discriminator is not None and self.d_opt is not None:
            state["disc"] = self.discriminator.state_dict()
            state["disc_opt"] = self.d_opt.state_dict()
        if isinstance(self.align_hook, torch.nn.Module):
            state["align"] = self.align_hook.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])
        if self.discriminator is not None and self.d_opt is not None:
            self.discriminator.load_state_dict(state["disc"])
            self.d_opt.load_state_dict(state["disc_opt"])
        if isinstance(self.align_hook, torch.nn.Module):
            self.align_hook.load_state_dict(state["align"])


def train_tokenizer(
    *,
    stage: str,
    preset: str,
    data: list[str],
    out: Path,
    steps: int,
    batch_size: int = 8,
    assignment: str | None = None,
    router: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    fps: str | float = "native",
    checkpoint_every: int = 1000,
    keep_last: int = 3,
    log_every: int = 10,
    stop_at: int | None = None,
    discriminator: bool = True,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    align_hook: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    stdin=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    **train_overrides: Any,
) -> Path:
    """Train a proxy (random assignments) or final (given assignments) tokenizer; one process or torchrun.

    Args:
        stage: ``proxy`` or ``final``.
        preset: tokenizer preset name (``tiny``, ``small``, ``paper``).
        data: video files, directories, ``-`` (paths on stdin) or WebDataset tars.
        out: output directory; checkpoints are ``out/step-NNNNNNNN/`` model directories.
        assignment: ``random`` (proxy default), ``uniform:K`` or ``fixed:k1,...,kT``.
        router: final stage: a router model directory that assigns every training clip.
        resume: continue from the latest complete checkpoint in ``out``.
        train_overrides: fields of :class:`TokenizerTrainConfig` (``lr``, ``disc_start``, ...).

    Returns:
        The directory of the final checkpoint.
    """
    from evatok_cli.models.discriminator import discriminator_for
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
    from evatok_cli.train import loop
    from evatok_cli.train.data import clip_batches
    from evatok_cli.train.dist import init_distributed, shutdown
    from evatok_cli.video import ClipSpec, list_inputs

    if stage not in ("proxy", "final"):
        raise ValueError(f"stage must be 'proxy' or 'final', got {stage!r}")
    env = init_distributed(device)
    try:
        torch.manual_seed(seed)  # identical initial weights on every rank
        config = tokenizer_config(preset)
        model = EVATokTokenizer(config)
        space = config.space
        if router is not None and assignment is not None:
            raise ValueError("give --router or --assignment, not both")
        if router is not None:
            policy = router_assignments(Path(router), space, (config.frames, config.height, config.width), env.device)
            assignment = f"router:{router}"
        else:
            assignment = assignment or ("random" if stage == "proxy" else None)
            if assignment is None:
                raise ValueError("the final stage needs --router DIR or --assignment uniform:K|fixed:k1,...,kT")
            policy = (
                random_assignments(space.levels, space.blocks, seed, env.rank)
                if assignment == "random"
                else fixed_assignment(space.parse(assignment))
            )
        refs = list_inputs(data, stdin=stdin)
        if not refs:
            raise ValueError(f"no videos found in {', '.join(map(str, data))}")
        spec = ClipSpec(frames=config.frames, height=config.height, width=config.width, fps=fps)
        torch.manual_seed(seed + 1)
        disc = discriminator_for(preset, config.frames, config.height, config.width) if discriminator else None
        if perceptual is None and env.is_main:
            log.info("perceptual (LPIPS) loss off: no LPIPS weights given")
        cfg = TokenizerTrainConfig(steps=steps, **train_overrides)
        task = TokenizerTask(
            model=model, cfg=cfg, env=env, assign=policy, preset=preset, stage=stage, discriminator=disc,
            perceptual=perceptual, align_hook=align_hook,
            extra_meta={"assignment": assignment, "clip_fps": fps, "seed": seed},
        )
        batches = clip_batches(refs, spec, seed=seed, local_batch=batch_size, rank=env.rank,
                               world_size=env.world_size, workers=workers)
        loop_cfg = loop.LoopConfig(steps=steps, checkpoint_every=checkpoint_every, keep_last=keep_last, log_every=log_every,
                                   stop_at=stop_at)
        return loop.run(task, batches, cfg=loop_cfg, out=Path(out), env=env, resume=resume, on_log=on_log)
    finally:
        shutdown(env)
