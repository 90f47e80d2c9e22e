"""AR stage: training the Llama-style GPT on token stores (EVATok §4.1, PAPER §6).

Each store sample becomes the sequence ``[class] [len(k_1)] tok.. ... [len(k_T)] tok..``
(:func:`~evatok_cli.models.gpt.build_sequence`); batches are right-padded and the loss is the
next-token cross-entropy over the length and codebook tokens (padding and the class position are
ignored). Training follows the paper:

- class dropout for classifier-free guidance: each sequence's class is replaced by the null class
  with probability ``class_dropout`` (0.1);
- AdamW with the WSD schedule: constant for the first 80% of the steps, then linear to 0;
- bf16 autocast on CUDA, DDP under torchrun, an EMA of the weights (``ema.safetensors``), which
  ``GPT.from_pretrained`` and ``evatok generate`` use by default.

Frame prediction (``prefix_blocks`` P > 0, PAPER §6 "K600 frame prediction"): every training
sample must start with the fixed prefix assignment (:func:`evatok_cli.prefix.prefix_assignment`;
the paper trains on the router's best assignment that starts with (512, 128)); samples that do not
are refused before training. The loss ignores the prefix (its length tokens and codebook ids are
inputs only, as they are teacher-forced at sampling time); the first target is the length token of
block P + 1.

The data is a function of the step: global item ``i`` is position ``i % N`` of epoch ``i // N``'s
permutation of the N samples of all stores (seeded by ``(seed, epoch)``), item indices are split
over ranks as in the tokenizer stage (:class:`~evatok_cli.train.data.StepSampler`), and class
dropout draws from a generator seeded by ``(seed, step, rank)``. A resumed run therefore equals an
uninterrupted one, for Zarr and WebDataset stores alike (both are read by random access; a
WebDataset sample is one seek into its shard).

The model directory records what ``evatok generate`` needs to check its tokenizer and to name
classes: ``space``, ``codebook_size``, ``class_names``, ``tokenizer`` (sha256, preset), ``clip``,
plus the ``data`` and ``train`` settings (config.json extra fields).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from evatok_cli.checkpoint import latest_step_dir, read_model_meta
from evatok_cli.models.gpt import (
    GPT,
    GPT_PRESETS,
    IGNORE_INDEX,
    GPTConfig,
    build_sequence,
    drop_class,
    gpt_config,
    pad_batch,
)
from evatok_cli.prefix import prefix_assignment as fixed_prefix
from evatok_cli.prefix import prefix_record
from evatok_cli.runtime import process_group
from evatok_cli.store import StoreReader, open_store
from evatok_cli.train import loop
from evatok_cli.train.data import StepSampler
from evatok_cli.train.dist import DistEnv, wrap_ddp
from evatok_cli.train.ema import EMA
from evatok_cli.train.schedule import wsd
from evatok_cli.train.task import ModelTask

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GPTTrainConfig:
    """Optimisation settings (PAPER §6: WSD, constant for 80% then annealed to 0; LlamaGen's AdamW)."""

    steps: int
    lr: float = 1e-4
    warmup: int = 0
    decay_frac: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    class_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or not 0 <= self.decay_frac <= 1:
            raise ValueError(f"need warmup >= 0 and 0 <= decay_frac <= 1, got {self.warmup}, {self.decay_frac}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for the draws of one (step, rank), independent of Python's hash randomisation."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------- data
@dataclass
class TokenStores:
    """Several token stores read as one dataset, with the facts they must agree on.

    Attributes:
        paths: the stores, in order (sample ``i`` of the whole is counted store by store).
        space: ``{"levels": [...], "blocks": T}``.
        codebook_size: C.
        num_classes: N (``len(class_names)`` when the stores name their classes, else max label + 1).
        class_names: class id -> name, or ``None``.
        tokenizer: ``{"sha256", "preset"}`` of the tokenizer that wrote the stores (values may be None).
        clip: ``{"frames", "height", "width", "fps"}`` or ``None``.
        sizes: samples per store.
    """

    paths: list[Path]
    space: dict[str, Any]
    codebook_size: int
    num_classes: int
    class_names: list[str] | None
    tokenizer: dict[str, Any]
    clip: dict[str, Any] | None
    sizes: list[int]
    _readers: list[StoreReader] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return sum(self.sizes)

    def readers(self) -> list[StoreReader]:
        # Forked DataLoader workers inherit the readers; pickled ones (spawn) reopen them.
        if not self._readers:
            self._readers = [open_store(p) for p in self.paths]
        return self._readers

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": []}

    def locate(self, i: int) -> tuple[int, int]:
        """(store index, row) of sample ``i`` of the whole."""
        for s, n in enumerate(self.sizes):
            if i < n:
                return s, i
            i -= n
        raise IndexError(i)

    def record(self) -> dict[str, Any]:
        """What a model directory keeps about its training data (config.json extra fields)."""
        return {
            "space": self.space,
            "codebook_size": self.codebook_size,
            "class_names": self.class_names,
            "tokenizer": self.tokenizer,
            "clip": self.clip,
        }


def open_token_stores(paths: Sequence[str | Path]) -> TokenStores:
    """Open finished token stores and check that they can be trained on together.

    Raises:
        ValueError: no stores, an empty store, or stores that disagree on the space, the codebook,
            the tokenizer or the class names (one line naming the store and the field).
        StoreError: a path is not a finished token store.
    """
    if not paths:
        raise ValueError("no token stores given (--tokens STORE)")
    readers = [open_store(p) for p in paths]
    first = readers[0]

    def facts(r: StoreReader) -> dict[str, Any]:
        tok = r.attrs.get("tokenizer") or {}
        return {
            "space": r.attrs["space"],
            "codebook_size": int(r.attrs["codebook_size"]),
            "tokenizer sha256": tok.get("sha256"),
            "class names (attrs labels)": r.attrs.get("labels"),
        }

    ref = facts(first)
    for p, r in zip(paths[1:], readers[1:]):
        f = facts(r)
        for k in ref:
            if f[k] != ref[k]:
                raise ValueError(
                    f"{p}: its {k} ({f[k]!r}) differs from {paths[0]}'s ({ref[k]!r}); "
                    "train on stores written by one tokenizer with one label mapping"
                )
    for p, r in zip(paths, readers):
        if len(r) == 0:
            raise ValueError(f"{p}: the store holds no samples")
    names = ref["class names (attrs labels)"]
    top = max(int(r.labels().max()) for r in readers)
    low = min(int(r.labels().min()) for r in readers)
    if low < -1:
        raise ValueError(f"labels must be class ids >= 0 or -1 (none), found {low}")
    if names is not None:
        names = [str(n) for n in names]
        if top >= len(names):
            raise ValueError(f"a sample has label {top} but the stores name only {len(names)} classes")
    num_classes = len(names) if names is not None else top + 1
    tok = first.attrs.get("tokenizer") or {}
    return TokenStores(
        paths=[Path(p) for p in paths], space=dict(ref["space"]), codebook_size=ref["codebook_size"],
        num_classes=num_classes, class_names=names,
        tokenizer={"sha256": tok.get("sha256"), "preset": tok.get("preset")},
        clip=first.attrs.get("clip"), sizes=[len(r) for r in readers], _readers=readers,
    )  # fmt: skip


class SequenceStream(Dataset):
    """Map-style: stream index -> one GPT training sequence, a function of the index only.

    Index ``i`` is position ``i % N`` of epoch ``i // N``'s permutation of the N samples (seeded
    by ``(seed, epoch)``). Items: ``{"seq": LongTensor (1 + T + L,), "tokens": L, "loss_from": n}``:
    targets at positions < ``loss_from`` are ignored (1, the class, without a prefix; with a
    ``prefix`` of block lengths (P,), ``1 + P + sum(prefix)``: the prefix is not a target).
    """

    def __init__(self, data: TokenStores, cfg: GPTConfig, seed: int, prefix: Sequence[int] | None = None) -> None:
        self.data, self.cfg, self.seed = data, cfg, seed
        self.prefix = tuple(int(k) for k in prefix) if prefix else ()
        self.loss_from = 1 + len(self.prefix) + sum(self.prefix)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return 2**62

    def position(self, i: int) -> int:
        """Which sample of the whole the stream's index ``i`` is."""
        n = len(self.data)
        epoch, p = divmod(int(i), n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._perm[1][p])

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, row = self.data.locate(self.position(i))
        sample = self.data.readers()[s][row]
        tokens = torch.from_numpy(np.asarray(sample.tokens).astype(np.int64))
        label = int(sample.label)
        bl = np.asarray(sample.block_lengths).astype(np.int64)
        if self.prefix and tuple(int(k) for k in bl[: len(self.prefix)]) != self.prefix:
            raise ValueError(
                f"sample {sample.key}: block lengths {bl.tolist()} do not start with the prefix {self.prefix}"
            )
        seq = build_sequence(tokens, bl, None if label < 0 else label, self.cfg)
        return {"seq": seq, "tokens": int(tokens.numel()), "loss_from": self.loss_from}


def check_prefix(data: TokenStores, prefix: Sequence[int]) -> None:
    """Refuse stores holding samples that do not start with the prefix assignment (one line per store)."""
    want = np.asarray([int(k) for k in prefix], dtype=np.int64)
    for path, reader in zip(data.paths, data.readers()):
        bl = reader.block_lengths()[:, : len(want)].astype(np.int64)
        bad = np.flatnonzero((bl != want[None, :]).any(axis=1))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{path}: {bad.size} of {len(reader)} samples do not start with the prefix assignment "
                f"{tuple(want.tolist())} (first: {reader.keys[i]} with {tuple(bl[i].tolist())}); encode the "
                f"training clips with assignments that start with it (evatok encode --router R --router-prefix "
                f"{','.join(map(str, want.tolist()))}, or --assignment fixed:{','.join(map(str, want.tolist()))},...)"
            )


def collate_sequences(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``targets`` (B, L) from :func:`pad_batch`, ``lengths`` (B,), ``tokens`` (B,).

    Targets before an item's ``loss_from`` (the class, and a frame-prediction prefix) are ignored.
    """
    input_ids, targets, lengths = pad_batch([it["seq"] for it in items])
    for b, it in enumerate(items):
        targets[b, : int(it.get("loss_from", 1))] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "targets": targets,
        "lengths": lengths,
        "tokens": torch.tensor([it["tokens"] for it in items], dtype=torch.long),
    }


def sequence_batches(
    stream: SequenceStream, *, local_batch: int, rank: int, world_size: int, workers: int = 0
) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """``batches(start_step)`` for :func:`evatok_cli.train.loop.run` (rank-sharded, step-indexed)."""

    def batches(start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        return iter(
            DataLoader(
                stream,
                batch_size=local_batch,
                num_workers=workers,
                collate_fn=collate_sequences,
                sampler=StepSampler(start_step, local_batch, rank, world_size),
                prefetch_factor=4 if workers > 0 else None,
            )
        )

    return batches


# ----------------------------------------------------------------------------------------- task
@dataclass
class GPTTask(ModelTask):
    """The :class:`~evatok_cli.train.loop.TrainTask` of the AR stage."""

    kind: ClassVar[str] = "gpt"

    model: GPT
    cfg: GPTTrainConfig
    env: DistEnv
    seed: int = 0
    preset: str | None = None
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dev = self.env.device
        self.model.to(dev).train()
        self.ddp = wrap_ddp(self.model, self.env)
        # LlamaGen's split: weight decay on matrices and embeddings, none on norm gains
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        )

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        c, dev = self.cfg, self.env.device
        lr = wsd(step, total=c.steps, max_lr=c.lr, warmup=c.warmup, decay_frac=c.decay_frac)
        for g in self.opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, self.env.rank))
        idx = drop_class(batch["input_ids"], c.class_dropout, self.model.config, gen).to(dev, non_blocking=True)
        targets = batch["targets"].to(dev, non_blocking=True)
        with self.autocast:
            _, loss = self.ddp(idx, targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt.step()
        self.ema.update(self.model, step)
        lengths = batch["lengths"].float()
        return {
            "loss": float(loss.item()),
            "grad_norm": float(gnorm),
            "lr": lr,
            "tokens": float(batch["tokens"].float().mean()),
            "pad_frac": float(1.0 - lengths.sum() / (lengths.max() * lengths.numel())),
        }

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])


# ---------------------------------------------------------------------------------------- entry
def steps_for_epochs(epochs: float, samples: int, global_batch: int) -> int:
    """Optimisation steps that cover ``epochs`` passes over ``samples`` (at least 1)."""
    return max(1, math.ceil(epochs * samples / global_batch))


def _check_resume(out: Path, record: dict[str, Any], samples: int) -> None:
    """A resumed run must train on the same kind of data it started with."""
    latest = latest_step_dir(out)
    if latest is None:
        return
    meta = read_model_meta(latest)
    for k in ("space", "codebook_size", "class_names", "prefix"):
        if meta.get(k) != record[k]:
            raise ValueError(
                f"{out}: was trained on stores with another {k} ({meta.get(k)!r}, now {record[k]!r}); "
                "resume with the same --tokens"
            )
    if meta.get("data", {}).get("samples") != samples:
        raise ValueError(
            f"{out}: was trained on {meta.get('data', {}).get('samples')} samples, --tokens now hold "
            f"{samples}; resume with the same --tokens (the data order depends on them)"
        )


def train_gpt(
    *,
    tokens: Sequence[str | Path],
    preset: str,
    out: Path,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 32,
    resume: bool = False,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    checkpoint_every: int = 1000,
    keep_last: int = 3,
    log_every: int = 10,
    stop_at: int | None = None,
    dropout: float = 0.0,
    token_dropout: float = 0.0,
    model_overrides: dict[str, Any] | None = None,
    prefix_blocks: int = 0,
    prefix_assignment: str | Sequence[int] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    **train_overrides: Any,
) -> Path:
    """Train a class-conditional GPT on token stores; one process or torchrun (DDP).

    Args:
        tokens: token stores (``evatok encode`` output; Zarr or WebDataset). Several stores must
            share the space, codebook, tokenizer and class names.
        preset: GPT preset (``tiny``, ``gpt-b``, ``gpt-l``, ``gpt-l-plus``); the vocabulary and the
            sequence length come from the stores.
        out: output directory; checkpoints are ``out/step-NNNNNNNN/`` model directories.
        steps, epochs: training length, exactly one of them (epochs are converted to steps with the
            global batch ``batch_size * world_size``).
        batch_size: sequences per step per process.
        resume: continue from the latest complete checkpoint in ``out``.
        dropout: residual dropout after attention and dropout on the FFN output (the model's
            ``resid_dropout`` and ``ffn_dropout``, LlamaGen's ``--dropout-p``); 0 = none (the paper is silent).
        token_dropout: dropout on the input token embeddings (``token_dropout``); 0 = none.
        model_overrides: fields of :class:`~evatok_cli.models.gpt.GPTConfig` to change from the preset
            (win over ``dropout``/``token_dropout``).
        prefix_blocks: frame prediction: P > 0 trains on sequences whose first P blocks use the
            fixed prefix assignment, with the loss on the prefix masked out (0: class-to-video).
        prefix_assignment: the prefix assignment (``paper``, ``max`` or ``k1,...,kP``; default
            ``paper``, see :func:`evatok_cli.prefix.prefix_assignment`); recorded as ``prefix``.
        train_overrides: fields of :class:`GPTTrainConfig` (``lr``, ``warmup``, ``class_dropout``, ...).

    Returns:
        The directory of the final checkpoint.

    Raises:
        ValueError: bad options, or stores that cannot be trained on together.
    """
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r} (known: {', '.join(GPT_PRESETS)})")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = open_token_stores(tokens)
    blocks = int(data.space["blocks"])
    if not 0 <= prefix_blocks < blocks:
        raise ValueError(f"prefix blocks must be in [0, {blocks}) (a prefix leaves at least one block to predict)")
    prefix = fixed_prefix(prefix_assignment, data.space["levels"], prefix_blocks) if prefix_blocks else ()
    if prefix:
        check_prefix(data, prefix)
    drops = {"resid_dropout": dropout, "ffn_dropout": dropout, "token_dropout": token_dropout}
    config = gpt_config(
        preset,
        codebook_size=data.codebook_size,
        levels=data.space["levels"],
        blocks=int(data.space["blocks"]),
        num_classes=data.num_classes,
        **{**drops, **(model_overrides or {})},
    )
    with process_group(device) as env:
        if steps is None:
            assert epochs is not None
            steps = steps_for_epochs(epochs, len(data), batch_size * env.world_size)
        cfg = GPTTrainConfig(steps=steps, **train_overrides)
        record = {**data.record(), "prefix": prefix_record(prefix_blocks, prefix) if prefix else None}
        if resume:
            _check_resume(Path(out), record, len(data))
        torch.manual_seed(seed)  # identical initial weights on every rank
        model = GPT(config)
        if env.is_main:
            log.info(
                "gpt %s: %.2fM parameters, vocabulary %d, %d samples in %d store(s), %d classes, %d steps",
                preset,
                model.num_params() / 1e6,
                config.vocab_size,
                len(data),
                len(data.paths),
                data.num_classes,
                steps,
            )
        meta = {
            **record,
            "data": {"stores": [str(p) for p in data.paths], "samples": len(data)},
            "train": {
                **asdict(cfg),
                "batch_size": batch_size,
                "world_size": env.world_size,
                "seed": seed,
                "epochs": epochs,
            },
        }
        task = GPTTask(model=model, cfg=cfg, env=env, seed=seed, preset=preset, extra_meta=meta)
        stream = SequenceStream(data, config, seed, prefix)
        batches = sequence_batches(
            stream, local_batch=batch_size, rank=env.rank, world_size=env.world_size, workers=workers
        )
        loop_cfg = loop.LoopConfig(
            steps=steps, checkpoint_every=checkpoint_every, keep_last=keep_last, log_every=log_every, stop_at=stop_at
        )
        return loop.run(task, batches, cfg=loop_cfg, out=Path(out), env=env, resume=resume, on_log=on_log)
