"""Stage 1 and stage 4: training the proxy and the final tokenizer (PAPER §2, §5).

The loss (PAPER Eq. 1-2) is

    L = w_l1 * L1 + w_p * LPIPS + w_adv * adv + VQ + w_ent * entropy (+ w_align * align)

with the perceptual term only when a perceptual loss is given (else preset ``paper`` refuses to start
and the others warn, unless it is turned off on purpose: ``check_perceptual``), the adversarial term (transformer
PatchGAN, hinge) only from ``disc_start`` on, and the alignment term only when an alignment hook is
given (a callable ``hook(video, dec_features) -> loss``; the V-JEPA2 teacher plugs in there). A
frozen-VideoMAE semantic discriminator (``semantic_disc``, PAPER §5) joins or replaces the PatchGAN
(``disc``: patchgan, semantic or both) with its own start step and weight; docs/training.md.

The proxy stage draws a random assignment per clip (uniform per block by default); the final stage
takes each clip's assignment from an assignment policy (a fixed/uniform assignment now; a router
or a labels store once those exist).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from evatok_cli.assign import RouterPolicy, router_label
from evatok_cli.checkpoint import (
    EMA_NAME,
    CheckpointError,
    latest_step_dir,
    load_model,
    read_model_meta,
    resolve_model_dir,
    weights_sha256,
)
from evatok_cli.config import config_to_dict
from evatok_cli.metrics.lpips import LPIPS
from evatok_cli.metrics.pixel import psnr_frames
from evatok_cli.models.discriminator import (
    PatchDiscriminator,
    d_hinge_loss,
    discriminator_for,
    g_adversarial_loss,
    logit_penalty,
)
from evatok_cli.models.semantic import AlignmentHook, SemanticDiscriminator
from evatok_cli.models.teachers import load_teacher
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.runtime import process_group
from evatok_cli.train import loop
from evatok_cli.train.data import clip_batches
from evatok_cli.train.dist import DistEnv, wrap_ddp
from evatok_cli.train.ema import EMA
from evatok_cli.train.schedule import warmup_cosine
from evatok_cli.train.task import ModelTask
from evatok_cli.video import ClipSpec, list_inputs
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
    disc: str = "patchgan"  # "patchgan", "semantic" (frozen VideoMAE, PAPER §5) or "both"
    semantic_disc_start: int = 20_000
    semantic_disc_weight: float = 0.1  # fixed generator weight of the semantic discriminator
    lecam_weight: float = 1e-3  # LeCam regulariser of the semantic discriminator (semantic.py)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.disc not in ("patchgan", "semantic", "both"):
            raise ValueError(f"disc must be 'patchgan', 'semantic' or 'both', got {self.disc!r}")


def random_assignments(levels: tuple[int, ...], blocks: int, seed: int, rank: int) -> AssignmentPolicy:
    """Proxy stage: every block of every clip gets a level drawn uniformly (PAPER §2, inference)."""
    lv = torch.tensor(levels, dtype=torch.long)

    def policy(batch: dict, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFFFFFF)
        b = batch["video"].shape[0]
        return lv[torch.randint(len(levels), (b, blocks), generator=g)]

    return policy


def router_assignments(
    path: str | Path | Sequence[str | Path],
    space,
    clip: tuple[int, int, int],
    device: torch.device,
    w_q: float | None = None,
    w_l: float | None = None,
) -> AssignmentPolicy:
    """Final stage (PAPER §3.4): a frozen router decides every training clip's assignment."""
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
class TokenizerTask(ModelTask):
    """The :class:`~evatok_cli.train.loop.TrainTask` of the tokenizer stages."""

    kind: ClassVar[str] = "tokenizer"

    model: EVATokTokenizer
    cfg: TokenizerTrainConfig
    env: DistEnv
    assign: AssignmentPolicy
    preset: str | None = None
    stage: str = "proxy"
    discriminator: PatchDiscriminator | None = None
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    align_hook: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    semantic_disc: SemanticDiscriminator | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dev = self.env.device
        if self.cfg.disc != "patchgan" and self.semantic_disc is None:
            raise ValueError(f"disc={self.cfg.disc!r} needs a semantic discriminator (semantic_disc)")
        if self.cfg.disc == "patchgan" and self.semantic_disc is not None:
            raise ValueError("a semantic discriminator was given but disc='patchgan' (use 'semantic' or 'both')")
        if self.cfg.disc == "semantic":
            self.discriminator = None  # the semantic discriminator replaces the PatchGAN
        self.model.to(dev).train()
        self.ddp = wrap_ddp(self.model, self.env)
        params = list(self.model.parameters())
        self.align_ddp = self.align_hook
        if isinstance(self.align_hook, torch.nn.Module):
            self.align_hook.to(dev)
            params += [p for p in self.align_hook.parameters() if p.requires_grad]
            if any(p.requires_grad for p in self.align_hook.parameters()):
                self.align_ddp = wrap_ddp(self.align_hook, self.env)  # phi's gradients are averaged too
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        self.d_ddp = self.d_opt = None
        if self.discriminator is not None:
            self.discriminator.to(dev).train()
            self.d_ddp = wrap_ddp(self.discriminator, self.env)
            self.d_opt = torch.optim.AdamW(self.discriminator.parameters(), lr=self.cfg.disc_lr, betas=self.cfg.betas)
        self.sd_ddp = self.sd_opt = None
        if self.semantic_disc is not None:
            self.semantic_disc.to(dev).train()
            self.sd_ddp = wrap_ddp(self.semantic_disc, self.env)
            self.sd_opt = torch.optim.AdamW(self.semantic_disc.parameters(), lr=self.cfg.disc_lr, betas=self.cfg.betas)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        )

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
            a = self.align_ddp(video, out.dec_features)
            loss = loss + c.align_weight * a
            metrics["align"] = a.item()
            metrics.update(getattr(self.align_hook, "last_metrics", {}))
        use_sem = self.semantic_disc is not None and step >= c.semantic_disc_start
        if use_sem:
            g_sem, fake_feats = self._semantic_generator_term(recon, metrics)
            loss = loss + c.semantic_disc_weight * g_sem
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
        self.ema.update(self.model, step)
        if use_gan:
            metrics.update(self._discriminator_step(video, recon.detach(), lr))
        if use_sem:
            self._semantic_discriminator_step(video, fake_feats, lr, metrics)
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

    def _semantic_generator_term(self, recon: torch.Tensor, metrics: dict[str, float]) -> tuple[torch.Tensor, list]:
        # Gradients flow through the frozen VideoMAE into recon; the heads are frozen for this term.
        assert self.semantic_disc is not None
        self.semantic_disc.requires_grad_(False)
        feats = self.semantic_disc.features(recon, grad=True)
        with self.autocast:
            g_sem = g_adversarial_loss(self.semantic_disc(feats).float())
        metrics.update(g_sem=g_sem.item(), sem_teacher_s=self.semantic_disc.teacher.last_time_s)
        return g_sem, [f.detach() for f in feats]  # reused as the fakes of the discriminator step

    def _semantic_discriminator_step(
        self, real: torch.Tensor, fake_feats: list, lr: float, metrics: dict[str, float]
    ) -> None:
        sd, c = self.semantic_disc, self.cfg
        assert sd is not None and self.sd_ddp is not None and self.sd_opt is not None
        sd.requires_grad_(True)
        for g in self.sd_opt.param_groups:
            g["lr"] = lr * c.disc_lr / c.lr
        real_feats = sd.features(real, grad=False)
        n = real.shape[0]
        with self.autocast:  # one forward over [real; fake] (one DDP forward per backward)
            logits = self.sd_ddp([torch.cat([r, f]) for r, f in zip(real_feats, fake_feats)]).float()
        lr_, lf = logits[:n], logits[n:]
        d_loss = d_hinge_loss(lr_, lf)
        lecam = sd.lecam(lr_, lf)
        self.sd_opt.zero_grad(set_to_none=True)
        (d_loss + c.lecam_weight * lecam).backward()
        torch.nn.utils.clip_grad_norm_(sd.parameters(), c.grad_clip)
        self.sd_opt.step()
        metrics.update(
            d_sem_loss=d_loss.item(),
            d_sem_real=lr_.mean().item(),
            d_sem_fake=lf.mean().item(),
            lecam=lecam.item(),
            sem_teacher_s=metrics["sem_teacher_s"] + sd.teacher.last_time_s,
        )

    # ------------------------------------------------------------------ state
    def batch_size(self, batch: dict) -> int:
        return int(batch["video"].shape[0])

    def model_meta(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.extra_meta}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.discriminator is not None and self.d_opt is not None:
            state["disc"] = self.discriminator.state_dict()
            state["disc_opt"] = self.d_opt.state_dict()
        if isinstance(self.align_hook, torch.nn.Module):
            state["align"] = self.align_hook.state_dict()
        if self.semantic_disc is not None and self.sd_opt is not None:
            state["semantic_disc"] = self.semantic_disc.state_dict()
            state["semantic_disc_opt"] = self.sd_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.discriminator is not None and self.d_opt is not None:
            self.discriminator.load_state_dict(state["disc"])
            self.d_opt.load_state_dict(state["disc_opt"])
        if isinstance(self.align_hook, torch.nn.Module):
            self.align_hook.load_state_dict(state["align"])
        if self.semantic_disc is not None and self.sd_opt is not None:
            self.semantic_disc.load_state_dict(state["semantic_disc"])
            self.sd_opt.load_state_dict(state["semantic_disc_opt"])


def alignment_hook(path: str | Path, config, env: DistEnv) -> AlignmentHook:
    """The V-JEPA2 alignment hook (PAPER Eq. 2) for a tokenizer config, teacher loaded from ``path``."""
    if config.dec_feature_layer == 0:
        raise ValueError("the alignment loss needs a decoder layer: set align_layer (--align-layer) >= 1")
    return AlignmentHook.for_tokenizer(load_teacher(path, "vjepa2", device=env.device), config)


def semantic_discriminator(path: str | Path, env: DistEnv) -> SemanticDiscriminator:
    """The VideoMAE semantic discriminator (PAPER §5), teacher loaded from ``path``."""
    return SemanticDiscriminator(load_teacher(path, "videomae", device=env.device))


def check_perceptual(preset: str, has_perceptual: bool, wanted: bool = True) -> str | None:
    """The perceptual (LPIPS) term cannot go missing silently (PAPER Eq. 1: it is part of L_vqgan).

    Returns None when a perceptual loss is given or was turned off on purpose (``wanted`` False,
    ``--no-lpips``); else one warning line for the caller to log. At preset ``paper`` it raises
    instead: a paper-scale run without LPIPS would train a different model for days.
    """
    if has_perceptual or not wanted:
        return None
    fix = "give --lpips-backbone PATH (torchvision VGG16 weights; docs/training.md) or --no-lpips to train without it"
    if preset == "paper":
        raise ValueError(f"preset paper trains with the LPIPS perceptual loss (PAPER Eq. 1): {fix}")
    return f"no perceptual (LPIPS) loss: {fix}"


# Config fields that do not shape the weights: an --init source may differ in them.
_WEIGHT_NEUTRAL = frozenset({"dec_feature_layer", "nearest_chunk"})


def init_weights(model: EVATokTokenizer, init: str | Path, preset: str) -> dict[str, Any]:
    """Load the weights of tokenizer ``init`` (EMA when present) into ``model``: ``--init``.

    ``init`` is a model directory or a training output directory (its latest step); its config must
    be ``model``'s (up to fields that do not shape the weights). Returns the ``init_from`` record
    kept in the run's config.json: path, preset, weights sha256 (of its ``model.safetensors``, the
    identity used everywhere) and which weights were loaded.
    """
    src = resolve_model_dir(init)
    try:
        meta = read_model_meta(src)
    except CheckpointError as e:
        raise ValueError(f"--init: {e}") from None
    if meta.get("model_kind") != "tokenizer":
        raise ValueError(f"--init {src}: is a {meta.get('model_kind')!r} model, not a tokenizer")
    theirs, ours = meta.get("config") or {}, config_to_dict(model.config)
    diff = [k for k in sorted(set(theirs) | set(ours)) if k not in _WEIGHT_NEUTRAL and theirs.get(k) != ours.get(k)]
    if diff:
        shown = ", ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in diff[:4])
        raise ValueError(
            f"--init {src}: its tokenizer (preset {meta.get('preset') or '?'}) does not match preset "
            f"{preset!r}: {shown}{', ...' if len(diff) > 4 else ''}; train with --preset "
            f"{meta.get('preset') or 'of that model'} or start from another model"
        )
    try:
        loaded = load_model(src, kind="tokenizer", ema=True)
    except CheckpointError as e:
        raise ValueError(f"--init: {e}") from None
    model.load_state_dict(loaded.state_dict())
    return {
        "path": str(src),
        "preset": meta.get("preset"),
        "sha256": weights_sha256(src),
        "weights": "ema" if (src / EMA_NAME).is_file() else "model",
    }


def _init_record(
    init: str | Path | None, model: EVATokTokenizer, preset: str, out: Path, resume: bool, env: DistEnv
) -> dict[str, Any] | None:
    """``--init`` before step 0; a checkpoint found by ``--resume`` wins (its ``init_from`` is kept)."""
    latest = latest_step_dir(out) if resume else None
    if latest is not None:
        if init is not None and env.is_main:
            log.info("--init %s ignored: resuming from %s", init, latest)
        return read_model_meta(latest).get("init_from")
    if init is None:
        return None
    record = init_weights(model, init, preset)
    if env.is_main:
        log.info(
            "initialised from %s (%s weights, sha256 %s)", record["path"], record["weights"], record["sha256"][:12]
        )
    return record


def train_tokenizer(
    *,
    stage: str,
    preset: str,
    data: list[str],
    out: Path,
    steps: int,
    batch_size: int = 8,
    assignment: str | None = None,
    router: str | Path | Sequence[str | Path] | None = None,
    router_w_q: float | None = None,
    router_w_l: float | None = None,
    init: str | Path | None = None,
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
    codebook_size: int | None = None,
    patch_depth: int | None = None,
    dec_locality_bias: float | None = None,
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    perceptual_loss: bool = True,
    lpips_backbone: str | Path | None = None,
    lpips_heads: str | Path | None = None,
    lpips_net: str = "vgg",
    align_hook: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    align_teacher: str | Path | None = None,
    disc_teacher: str | Path | None = None,
    align_layer: int | None = None,
    disc: str | None = None,
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
        router: final stage: a router model directory that assigns every training clip (several: an
            ensemble of reward-head routers, :func:`evatok_cli.assign.open_router`).
        router_w_q, router_w_l: a reward-head router's trade-off (default: the weights of its labels).
        init: start from this tokenizer's weights (EMA when present; a model directory or a training
            output directory) with a fresh optimizer and schedule; same preset. Ignored (logged)
            when ``resume`` finds a checkpoint. Recorded as ``init_from`` in config.json.
        resume: continue from the latest complete checkpoint in ``out``.
        codebook_size: VQ codebook entries instead of the preset's (PAPER §2: 16384; 8192 for the
            UCF/K600 final tokenizers); recorded in the saved config like every field.
        patch_depth, dec_locality_bias: the architecture's two extras (docs/tokenizer.md) instead of
            the preset's (0 and 0 in ``paper``: the paper's linear patch embedding, plain cross-attention).
        perceptual: a perceptual loss ``(recon, video) -> loss``; else built from ``lpips_backbone``.
        perceptual_loss: False trains without the perceptual term on purpose (``--no-lpips``). When
            True and no perceptual loss is given, preset ``paper`` raises at once and the others
            log one warning (:func:`check_perceptual`).
        align_teacher: a local V-JEPA2 model directory: adds the alignment loss (``align_weight``).
        disc_teacher: a local VideoMAE model directory: adds the semantic discriminator.
        align_layer: decoder layer (1-based) that is aligned (default: the preset's ``dec_feature_layer``).
        disc: ``patchgan``, ``semantic`` or ``both`` (default: ``both`` with a disc teacher, else ``patchgan``).
        train_overrides: fields of :class:`TokenizerTrainConfig` (``lr``, ``disc_start``,
            ``semantic_disc_start``, ``semantic_disc_weight``, ...).

    Returns:
        The directory of the final checkpoint.
    """
    if stage not in ("proxy", "final"):
        raise ValueError(f"stage must be 'proxy' or 'final', got {stage!r}")
    has_perceptual = perceptual is not None or lpips_backbone is not None
    if not perceptual_loss and has_perceptual:
        raise ValueError("the perceptual loss is off (--no-lpips) but LPIPS weights were given (--lpips-backbone)")
    missing_lpips = check_perceptual(preset, has_perceptual, perceptual_loss)  # before any process group or data
    with process_group(device) as env:
        torch.manual_seed(seed)  # identical initial weights on every rank
        overrides: dict[str, Any] = {} if align_layer is None else {"dec_feature_layer": align_layer}
        extras = {"codebook_size": codebook_size, "patch_depth": patch_depth, "dec_locality_bias": dec_locality_bias}
        overrides.update({k: v for k, v in extras.items() if v is not None})
        config = tokenizer_config(preset, **overrides)
        model = EVATokTokenizer(config)
        init_from = _init_record(init, model, preset, Path(out), resume, env)
        space = config.space
        if router is not None and assignment is not None:
            raise ValueError("give --router or --assignment, not both")
        if router is None and (router_w_q is not None or router_w_l is not None):
            raise ValueError("--w-q/--w-l set a router's trade-off: give --router too")
        if router is not None:
            policy = router_assignments(
                router, space, (config.frames, config.height, config.width), env.device, router_w_q, router_w_l
            )
            assignment = f"router:{router_label(router)}"
            if router_w_q is not None or router_w_l is not None:
                assignment += f" (w_q {router_w_q}, w_l {router_w_l})"
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
        disc_mode = disc or ("both" if disc_teacher is not None else "patchgan")
        if disc_mode not in ("patchgan", "semantic", "both"):
            raise ValueError(f"disc must be patchgan, semantic or both, got {disc_mode!r}")
        if disc_mode != "patchgan" and disc_teacher is None:
            raise ValueError(f"--disc {disc_mode} needs --disc-teacher DIR (a VideoMAE model directory)")
        if disc_mode == "patchgan" and disc_teacher is not None:
            raise ValueError("--disc patchgan does not use --disc-teacher (choose semantic or both)")
        if disc_teacher is not None and not discriminator:
            raise ValueError("a disc teacher was given but the adversarial loss is off (--no-disc)")
        if align_hook is not None and align_teacher is not None:
            raise ValueError("give align_hook or align_teacher, not both")
        use_patchgan = discriminator and disc_mode != "semantic"
        disc = discriminator_for(preset, config.frames, config.height, config.width) if use_patchgan else None
        if align_teacher is not None:
            align_hook = alignment_hook(align_teacher, config, env)
        semantic = semantic_discriminator(disc_teacher, env) if disc_teacher is not None else None
        if perceptual is None and lpips_backbone is not None:
            perceptual = LPIPS(net=lpips_net, backbone=lpips_backbone, heads=lpips_heads).to(env.device).loss
        if missing_lpips is not None and env.is_main:
            log.warning(missing_lpips)
        elif perceptual is None and env.is_main:
            log.info("perceptual (LPIPS) loss off (--no-lpips)")
        cfg = TokenizerTrainConfig(steps=steps, disc=disc_mode, **train_overrides)
        task = TokenizerTask(
            model=model,
            cfg=cfg,
            env=env,
            assign=policy,
            preset=preset,
            stage=stage,
            discriminator=disc,
            perceptual=perceptual,
            align_hook=align_hook,
            semantic_disc=semantic,
            extra_meta={
                "assignment": assignment,
                "clip_fps": fps,
                "seed": seed,
                **({"init_from": init_from} if init_from is not None else {}),
                **({"align_teacher": str(align_teacher)} if align_teacher is not None else {}),
                **({"disc_teacher": str(disc_teacher)} if disc_teacher is not None else {}),
            },
        )
        batches = clip_batches(
            refs, spec, seed=seed, local_batch=batch_size, rank=env.rank, world_size=env.world_size, workers=workers
        )
        loop_cfg = loop.LoopConfig(
            steps=steps, checkpoint_every=checkpoint_every, keep_last=keep_last, log_every=log_every, stop_at=stop_at
        )
        return loop.run(task, batches, cfg=loop_cfg, out=Path(out), env=env, resume=resume, on_log=on_log)
