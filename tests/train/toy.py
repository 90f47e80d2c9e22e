"""A toy regression task implementing the TrainTask protocol (used by the loop tests and torchrun)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from evatok_cli.checkpoint import load_model, register_model_kind, save_model
from evatok_cli.train import loop
from evatok_cli.train.dist import init_distributed, shutdown, unwrap, wrap_ddp
from evatok_cli.train.ema import EMA
from evatok_cli.train.schedule import warmup_cosine


@dataclass(kw_only=True)
class ToyConfig:
    dim: int = 8


@register_model_kind("toy", ToyConfig)
class Toy(torch.nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.net = torch.nn.Sequential(torch.nn.Linear(config.dim, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


class ToyTask:
    def __init__(self, env, steps: int) -> None:
        torch.manual_seed(0)
        self.raw = Toy(ToyConfig()).to(env.device)
        self.model = wrap_ddp(self.raw, env)
        self.opt = torch.optim.AdamW(self.raw.parameters(), lr=1e-2)
        self.ema = EMA(self.raw, 0.9)
        self.steps = steps

    def train_step(self, batch, step):
        for g in self.opt.param_groups:
            g["lr"] = warmup_cosine(step, total=self.steps, warmup=2, max_lr=1e-2, min_lr=1e-4)
        x, y = batch
        noise = torch.randn_like(y) * 0.01  # uses the RNG: resume must restore it
        loss = torch.nn.functional.mse_loss(self.model(x), y + noise)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.ema.update(self.raw)
        return {"loss": loss.item()}

    def batch_size(self, batch):
        return len(batch[0])

    def save_model(self, path):
        save_model(path, self.raw, self.raw.config, kind="toy", ema=self.ema.weights_for(self.raw))

    def load_model(self, path):
        self.raw.load_state_dict(load_model(path, kind="toy", ema=False).state_dict())

    def state_dict(self):
        return {"opt": self.opt.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])
        self.ema.load_state_dict(state["ema"])


def batches(rank: int):
    def gen(start):
        step = start
        while True:
            g = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(16, 8, generator=g)
            yield x, x.sum(dim=1, keepdim=True).sin()
            step += 1

    return gen


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    env = init_distributed("cpu")
    task = ToyTask(env, a.steps)
    loop.run(
        task,
        batches(env.rank),
        cfg=loop.LoopConfig(steps=a.steps, checkpoint_every=a.every, log_every=1),
        out=Path(a.out),
        env=env,
        resume=a.resume,
    )
    flat = torch.cat([p.detach().flatten() for p in unwrap(task.model).parameters()])
    sys.stdout.write(json.dumps({"rank": env.rank, "weights": flat.tolist()}) + "\n")
    shutdown(env)


if __name__ == "__main__":
    main()
