"""The tiny tokenizer learns on real footage: it overfits one clip, and more tokens reconstruct better.

Clips are decoded with PyAV directly (not through evatok_cli.video) so that these tests exercise
the model alone. Training is plain Adam on L1 + MSE + VQ (+ 0.02 entropy) losses.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from evatok_cli.models import TOKENIZER_PRESETS, EVATokTokenizer

log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _frames(path: Path, n: int, width: int, height: int) -> torch.Tensor:
    """First n frames resized to width x height: (3, n, height, width) float in [-1, 1]."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.reformat(width=width, height=height, format="rgb24").to_ndarray())
            if len(frames) == n:
                break
    assert len(frames) == n, f"{path} has fewer than {n} frames"
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


def _psnr(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB of [-1, 1] videos (peak-to-peak 2)."""
    mse = ((recon.clamp(-1, 1) - video) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse)


def _loss(out) -> torch.Tensor:
    return out.losses["l1"] + out.losses["mse"] + out.losses["vq"] + 0.02 * out.losses["entropy"]


@pytest.mark.slow
def test_tiny_overfits_one_real_clip(footage):
    cfg = TOKENIZER_PRESETS["tiny"]
    clip = _frames(footage["carphone"], cfg.frames, cfg.width, cfg.height)[None]  # (1, 3, 8, 32, 32)
    torch.manual_seed(0)
    model = EVATokTokenizer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    a = torch.tensor([[16, 16, 16, 16]])
    t0 = time.perf_counter()
    for step in range(400):
        out = model(clip, a)
        opt.zero_grad()
        _loss(out).backward()
        opt.step()
        if float(_psnr(out.recon.detach(), clip)) >= 28.5:
            break
    elapsed = time.perf_counter() - t0
    model.eval()
    tokens, lengths = model.encode(clip, a)
    psnr = float(_psnr(model.decode(tokens, lengths), clip))
    log.info("overfit: %.2f dB after %d steps, %.1f s", psnr, step + 1, elapsed)
    assert psnr >= 28.0, (psnr, step)
    assert elapsed < 60.0, elapsed


@pytest.mark.slow
def test_more_tokens_reconstruct_better(footage):
    cfg = TOKENIZER_PRESETS["tiny"]
    # Three real clips at a little more than the model's size; training samples random 8x32x32 crops.
    videos = [
        _frames(footage["carphone"], 48, 58, 48),
        _frames(footage["bikes"], 48, 94, 40),
        _frames(footage["bigbuckbunny"], 48, 71, 40),
    ]
    rng = np.random.default_rng(0)

    def crops(n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            v = videos[rng.integers(len(videos))]
            f, y, x = (int(rng.integers(s - c + 1)) for s, c in zip(v.shape[1:], (cfg.frames, cfg.height, cfg.width)))
            out.append(v[:, f : f + cfg.frames, y : y + cfg.height, x : x + cfg.width])
        return torch.stack(out)

    held_out = crops(16)
    torch.manual_seed(0)
    model = EVATokTokenizer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):  # the proxy recipe: a random assignment per clip
        out = model(crops(4), torch.from_numpy(model.space.sample(rng, 4)))
        opt.zero_grad()
        _loss(out).backward()
        opt.step()
    model.eval()
    psnr = []
    for k in cfg.levels:
        tokens, lengths = model.encode(held_out, torch.full((len(held_out), cfg.blocks), k))
        psnr.append(float(_psnr(model.decode(tokens, lengths), held_out).mean()))
    log.info("PSNR by uniform level %s: %s", cfg.levels, [round(p, 2) for p in psnr])
    assert psnr[-1] >= psnr[0] + 1.0, psnr
    assert psnr[2] > psnr[0], psnr
