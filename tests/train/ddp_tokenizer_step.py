"""torchrun helper: one DDP tokenizer step on real footage; each rank dumps its weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.train.data import clip_batches
from evatok_cli.train.dist import init_distributed, shutdown
from evatok_cli.train.tokenizer import TokenizerTask, TokenizerTrainConfig, random_assignments
from evatok_cli.video import ClipSpec, list_inputs


def main() -> None:
    videos, dump = sys.argv[1], Path(sys.argv[2])
    env = init_distributed("cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checked_evatok import install

    install(env.device)  # tensor collectives NCCL would reject raise
    torch.manual_seed(0)
    cfg = tokenizer_config("tiny")
    model = EVATokTokenizer(cfg)
    task = TokenizerTask(
        model=model,
        cfg=TokenizerTrainConfig(steps=2, warmup=0, lr=1e-3),
        env=env,
        assign=random_assignments(cfg.levels, cfg.blocks, 0, env.rank),
    )
    spec = ClipSpec(frames=cfg.frames, height=cfg.height, width=cfg.width)
    batch = next(
        clip_batches(list_inputs([videos]), spec, seed=0, local_batch=1, rank=env.rank, world_size=env.world_size)(0)
    )
    task.train_step(batch, 0)
    dump.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["__batch__"] = batch["video"].clone()
    torch.save(state, dump / f"rank{env.rank}.pt")
    shutdown(env)


if __name__ == "__main__":
    main()
