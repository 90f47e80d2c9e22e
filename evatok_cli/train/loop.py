"""One plain training loop for every stage (tokenizer, router, GPT); distribution is injected.

The loop knows nothing about models or losses: a :class:`TrainTask` does one optimisation step on
one batch and can save/restore itself. The loop owns the step counter, the checkpoints (atomic,
resumable, keep-last-k), the JSONL metrics file and the throughput numbers. Data is a function of
the step (``batches(start_step)`` yields the batch of each step in order), so a resumed run sees
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from evatok_cli.train import checkpoints as ckpt
from evatok_cli.train.dist import DistEnv, all_reduce_mean

log = logging.getLogger(__name__)


class TrainTask(Protocol):
    """What a stage provides to the loop."""

    def train_step(self, batch: Any, step: int) -> dict[str, float]:
        """Forward, backward and optimizer step(s) on ``batch``; returns scalar metrics."""
        ...

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch`` on this rank (for samples/s)."""
        ...

    def save_model(self, path: Path) -> None:
        """Write a model directory (config.json + model.safetensors [+ ema.safetensors])."""
        ...

    def load_model(self, path: Path) -> None:
        """Load the raw (non-EMA) weights of a model directory written by :meth:`save_model`."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything else to resume exactly: optimizers, EMA, discriminators (tensors + containers)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(kw_only=True)
class LoopConfig:
    """Loop settings shared by every stage."""

    steps: int
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    stop_at: int | None = None  # exit after this many steps (a checkpoint is written), as if interrupted

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")


class ResumeError(Exception):
    """The output directory and the --resume flag disagree; the message says what to do."""


def prepare_output(out: Path, *, resume: bool, env: DistEnv) -> int:
    """Check/prepare ``out`` and return the step to start from (0, or the last saved step + 1)."""
    out = Path(out)
    latest = ckpt.latest_step_dir(out)
    if latest is None:
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_incomplete(out)
        env.barrier()
        return 0
    if not resume:
        raise ResumeError(
            f"{out}: already holds checkpoints (latest {latest.name}); pass --resume to continue, or choose another --out"
        )
    return int(ckpt.read_state(latest)["step"]) + 1


def restore(task: TrainTask, out: Path, env: DistEnv) -> int:
    """Load the latest complete step of ``out`` into ``task`` and the RNGs; returns its step."""
    latest = ckpt.latest_step_dir(out)
    if latest is None:
        raise ResumeError(f"{out}: no complete checkpoint to resume from")
    _check_same_config(task, latest)
    task.load_model(latest)
    state = torch.load(latest / ckpt.TRAIN_STATE_NAME, map_location=env.device, weights_only=True)
    task.load_state_dict(state)
    ckpt.load_rng(latest, env.rank)
    step = int(ckpt.read_state(latest)["step"])
    log.info("resumed from %s (step %d)", latest, step)
    return step


def _check_same_config(task: TrainTask, step_dir: Path) -> None:
    """A checkpoint resumes only into the model configuration it was trained with (one line otherwise)."""
    cfg = getattr(getattr(task, "model", None), "config", None)
    saved_file = step_dir / "config.json"
    if not dataclasses.is_dataclass(cfg) or not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text()).get("config")
    if not isinstance(saved, dict):
        return
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]
    if diff:
        raise ResumeError(
            f"{step_dir}: trained with another model configuration ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}); resume with the preset and options it was trained with, "
            "or start a new --out"
        )


def save(task: TrainTask, out: Path, step: int, env: DistEnv, keep_last: int, extra: dict[str, Any]) -> Path:
    """Checkpoint ``step``: rank 0 writes the model and state, every rank its RNG, state.json last."""
    d = ckpt.step_dir(out, step)
    if env.is_main:
        task.save_model(d)
        torch.save(task.state_dict(), d / ckpt.TRAIN_STATE_NAME)
    env.barrier()
    ckpt.save_rng(d, env.rank)
    env.barrier()
    if env.is_main:
        ckpt.write_state(d, {"step": step, "world_size": env.world_size, "time": time.time(), **extra})
        ckpt.prune(out, keep_last)
    env.barrier()
    return d


def run(
    task: TrainTask,
    batches: Callable[[int], Iterator[Any]],
    *,
    cfg: LoopConfig,
    out: Path,
    env: DistEnv,
    resume: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train ``task`` for ``cfg.steps`` steps (steps are 0-based; the last saved step is steps-1).

    Returns the directory of the final checkpoint. Metrics go to ``out/metrics.jsonl`` (rank 0)
    and to ``on_log`` every ``cfg.log_every`` steps.
    """
    out = Path(out)
    start = prepare_output(out, resume=resume, env=env)
    if start > 0:
        restore(task, out, env)
    last = ckpt.latest_step_dir(out)
    if start >= cfg.steps:
        log.info("%s: already trained for %d steps; nothing to do", out, start)
        assert last is not None
        return last
    metrics_file = out / "metrics.jsonl"
    t_last, samples = time.perf_counter(), 0
    acc: dict[str, float] = {}
    n_acc = 0
    it = batches(start)
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    for step in range(start, end):
        batch = next(it)
        m = task.train_step(batch, step)
        samples += task.batch_size(batch)
        for k, v in m.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        n_acc += 1
        if (step + 1) % cfg.log_every == 0 or step == end - 1:
            now = time.perf_counter()
            rec = all_reduce_mean({k: v / n_acc for k, v in acc.items()}, env)
            rec = {"step": step, **rec, "samples_per_s": samples * env.world_size / max(now - t_last, 1e-9)}
            if env.is_main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                log.debug("step %d %s", step, rec)
                if on_log is not None:
                    on_log(rec)
            t_last, samples, acc, n_acc = now, 0, {}, 0
        if (step + 1) % cfg.checkpoint_every == 0 or step == end - 1:
            last = save(task, out, step, env, cfg.keep_last, {"steps_total": cfg.steps})
    assert last is not None
    return last
