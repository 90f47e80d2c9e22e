"""Frame-prediction prefixes: the fixed prefix assignment, padding the condition frames, and the
prefix tokens of real footage (block causality: they do not depend on the blocks after them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.prefix import (
    encode_prefix,
    gpt_prefix,
    pad_condition,
    prefix_assignment,
    prefix_blocks_for,
    prefix_record,
    read_condition,
)
from evatok_cli.video import ClipReader, ClipSpec, to_model_input

PAPER_LEVELS = (32, 64, 128, 256, 512)
TINY_LEVELS = (1, 2, 4, 8, 16)


def test_prefix_assignment_specs():
    assert prefix_assignment("paper", PAPER_LEVELS, 2) == (512, 128)  # PAPER §6
    assert prefix_assignment(None, PAPER_LEVELS, 2) == (512, 128)  # the default
    assert prefix_assignment("paper", TINY_LEVELS, 2) == (16, 4)  # mapped by rank: top, two below the top
    assert prefix_assignment("paper", TINY_LEVELS, 3) == (16, 16, 4)
    assert prefix_assignment("paper", (4, 8), 2) == (8, 4)  # fewer than 3 levels: the smallest
    assert prefix_assignment("max", TINY_LEVELS, 2) == (16, 16)
    assert prefix_assignment("8, 2", TINY_LEVELS, 2) == (8, 2) == prefix_assignment([8, 2], TINY_LEVELS, 2)
    for bad, match in (("3,4", "non-levels"), ("16", "1 blocks"), ("big", "paper, max")):
        with pytest.raises(ValueError, match=match):
            prefix_assignment(bad, TINY_LEVELS, 2)
    with pytest.raises(ValueError, match=">= 1"):
        prefix_assignment("paper", TINY_LEVELS, 0)
    assert prefix_blocks_for(5, 4) == 2 and prefix_blocks_for(8, 4) == 2 and prefix_blocks_for(3, 2) == 2
    assert gpt_prefix({"prefix": prefix_record(2, (16, 4))}) == (2, (16, 4)) and gpt_prefix({}) is None


def test_pad_condition_repeats_the_last_real_frame():
    frames = np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3)
    out = pad_condition(frames, 5)
    assert np.array_equal(out[:5], frames[:5]) and all(np.array_equal(out[i], frames[4]) for i in range(5, 8))
    assert np.array_equal(frames, np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3))  # a copy
    with pytest.raises(ValueError):
        pad_condition(frames, 0)


def test_prefix_tokens_of_real_footage(tiny_tokenizer, footage):
    tok = EVATokTokenizer.from_pretrained(tiny_tokenizer).eval()
    c = tok.config
    spec = ClipSpec(frames=c.frames, height=c.height, width=c.width)
    cond = np.stack([read_condition(footage[k], spec, 3) for k in ("bikes", "carphone")])  # (2, F, H, W, 3)
    with ClipReader(footage["bikes"], spec) as r:
        raw = r.read(0).frames
    assert np.array_equal(cond[0][:3], raw[:3]) and np.array_equal(cond[0][3], raw[2])
    video = to_model_input(torch.from_numpy(cond))
    pre = encode_prefix(tok, video, (16, 4))
    assert [bl.tolist() for _, bl in pre] == [[16, 4], [16, 4]] and all(t.numel() == 20 for t, _ in pre)
    # the same tokens as encoding the clip with any assignment that starts with (16, 4): block causality
    for tail in ((16, 16), (1, 8)):
        tokens, _ = tok.encode(video, torch.tensor([[16, 4, *tail]] * 2))
        for (p, _), t in zip(pre, tokens):
            assert torch.equal(p, t[:20])
    # and the frames after the condition do not matter (only the first 2 blocks = 4 frames are seen)
    noisy = video.clone()
    noisy[:, :, 4:] = torch.rand_like(noisy[:, :, 4:]) * 2 - 1
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(pre, encode_prefix(tok, noisy, (16, 4))))
    with pytest.raises(ValueError, match="does not fit"):
        encode_prefix(tok, video, (16, 4, 1, 1, 1))


def test_paper_training_data_encode_router_prefix_then_train(tiny_tokenizer, video_dir, tmp_path):
    """PAPER §6: training clips take the router's best assignment that starts with the prefix assignment
    (`encode --router-prefix 16,4`), and `train gpt --prefix-blocks 2` trains on them."""
    from typer.testing import CliRunner

    from evatok_cli.assign import choose_assignments
    from evatok_cli.cli import app
    from evatok_cli.models.router import Router, router_config
    from evatok_cli.store import open_store
    from evatok_cli.video import list_inputs, read_clips

    torch.manual_seed(0)
    router = Router(router_config("tiny"))
    torch.nn.init.normal_(router.head.weight, std=0.5)
    rdir = router.save_pretrained(tmp_path / "router", preset="tiny", extra={"clip": {"fps": "native"}})
    runner = CliRunner()
    store = tmp_path / "fp.zarr"
    args = ["encode", str(video_dir), "-o", str(store), "--tokenizer", str(tiny_tokenizer), "--router", str(rdir)]
    res = runner.invoke(app, [*args, "--router-prefix", "16,4", "--clips", "first", "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    s = open_store(store)
    assert s.attrs["assignment_policy"]["prefix"] == [16, 4]
    # each clip got the router's best assignment among those starting with (16, 4)
    router = Router.from_pretrained(rdir).eval()
    spec = ClipSpec(frames=8, height=32, width=32)
    videos = [read_clips(r, spec, policy="first")[0].frames for r in list_inputs([str(video_dir)])]
    with torch.no_grad():
        pred = router.predict(to_model_input(torch.from_numpy(np.stack(videos))))
    want = choose_assignments(pred, "classify", router.space, prefix=(16, 4))
    assert sorted(s.assignments().tolist()) == sorted(want.tolist())
    assert all(tuple(bl[:2]) == (16, 4) for bl in s.block_lengths().tolist())
    res = runner.invoke(app, [*args[:3], str(tmp_path / "x.zarr"), *args[4:8], "--router-prefix", "3,4"])
    assert res.exit_code == 1 and "--router-prefix" in res.output
    out = tmp_path / "gpt"
    args = ["train", "gpt", "--tokens", str(store), "--preset", "tiny", "--out", str(out), "--steps", "2"]
    res = runner.invoke(app, [*args, "--batch-size", "2", "--workers", "0", "--prefix-blocks", "2", "--quiet"])
    assert res.exit_code == 0, res.output
