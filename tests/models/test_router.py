"""Router model: config validation, presets (paper size on the meta device), heads, batch invariance, save/load."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from evatok_cli.checkpoint import CheckpointError, load_model
from evatok_cli.config import config_from_dict, config_to_dict
from evatok_cli.models.router import ROUTER_PRESETS, Router, RouterConfig, router_config
from evatok_cli.models.tokenizer import TOKENIZER_PRESETS


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_paper_preset_size_on_meta():
    with torch.device("meta"):
        model = Router(ROUTER_PRESETS["paper"])
    n = model.num_parameters()
    assert 0.9 * 19.9e6 <= n <= 1.1 * 19.9e6, n  # PAPER §4: ViT-S, 19.9M
    c = model.config
    assert (c.dim, c.depth, c.heads, c.num_assignments) == (384, 12, 6, 625)
    assert (c.frames, c.height, c.width) == (16, 128, 128)
    # the paper's router sees the full clip: no pooling, 4x8x8 patches, 4x16x16 = 1024 tokens
    assert (c.input_downsample, c.temporal_patch, c.spatial_patch, c.num_patches) == (1, 4, 8, 1024)
    with torch.device("meta"):  # the pooled variant is an option of ours, same size within +-10%
        pooled = Router(router_config("paper", input_downsample=4))
    assert 0.9 * 19.9e6 <= pooled.num_parameters() <= 1.1 * 19.9e6 and pooled.config.num_patches == 64


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_presets_match_tokenizer_presets(name):
    r, t = ROUTER_PRESETS[name], TOKENIZER_PRESETS[name]
    assert (r.frames, r.height, r.width, r.levels, r.blocks) == (t.frames, t.height, t.width, t.levels, t.blocks)
    assert r.num_assignments == 625


@pytest.mark.parametrize(
    "bad",
    [
        dict(head="softmax"),
        dict(frames=7),
        dict(height=30),
        dict(dim=30, heads=4),
        dict(levels=(2, 1)),
        dict(depth=0),
        dict(mlp_ratio=0.0),
        dict(input_downsample=0),
        dict(input_downsample=4),
    ],  # 32 is not a multiple of 16 * 4
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        router_config("tiny", **bad)
    with pytest.raises(KeyError, match="unknown router preset"):
        router_config("huge")


def test_config_json_round_trip():
    cfg = router_config("tiny", head="reward")
    assert config_from_dict(RouterConfig, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert cfg.space.blocks == 4 and len(cfg.space) == 625


@pytest.mark.parametrize("head", ["classify", "reward"])
def test_forward_shapes_and_grad(head):
    torch.manual_seed(0)
    model = Router(router_config("tiny", head=head))
    x = torch.rand(3, 3, 8, 32, 32) * 2 - 1
    out = model(x)
    assert out.shape == (3, 625)
    torch.testing.assert_close(out, torch.zeros_like(out) + model.head.bias)  # zero-initialised head
    torch.nn.init.normal_(model.head.weight)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="expected video"):
        model(torch.rand(1, 3, 8, 32, 16))


def test_predict_batch_invariant_and_deterministic():
    torch.manual_seed(0)
    model = Router(router_config("tiny")).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.rand(4, 3, 8, 32, 32) * 2 - 1
    full = model.predict(x)
    assert not full.requires_grad and full.dtype == torch.float32
    torch.testing.assert_close(model.predict(x[2:3]), full[2:3], rtol=1e-5, atol=1e-5)
    assert torch.equal(model.predict(x), full)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Router(router_config("tiny", head="reward"))
    torch.nn.init.normal_(model.head.weight)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    path = model.save_pretrained(tmp_path / "r", preset="tiny", ema=ema, extra={"labels": {"w_q": 1.4, "w_l": 0.6}})
    meta = json.loads((path / "config.json").read_text())
    assert meta["model_kind"] == "router" and meta["preset"] == "tiny" and meta["config"]["head"] == "reward"
    assert meta["config"]["levels"] == [1, 2, 4, 8, 16] and meta["labels"]["w_q"] == 1.4
    raw = Router.from_pretrained(path, ema=False)
    assert raw.config == model.config and not raw.training
    for k, v in model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v), k
    assert torch.equal(Router.from_pretrained(path).head.bias, model.head.bias + 1)  # EMA by default
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    assert torch.equal(raw.predict(x), model.eval().predict(x))
    assert isinstance(load_model(path, kind="router"), Router)
    with pytest.raises(CheckpointError, match="expected 'tokenizer'"):
        load_model(path, kind="tokenizer")


def test_replace_geometry_and_space():
    cfg = router_config(
        "small", frames=8, height=32, width=32, levels=(4, 8), blocks=2, spatial_patch=8, temporal_patch=2
    )
    assert cfg.num_assignments == 4 and cfg.grid == (4, 4, 4)
    assert dataclasses.replace(cfg, head="reward").head == "reward"
    assert Router(cfg)(torch.zeros(1, 3, 8, 32, 32)).shape == (1, 4)


def test_input_downsample_pools_before_the_patches():
    """input_downsample=2 on 8x32x32 clips = the same weights on the 2x2 area-pooled 8x16x16 clips."""
    torch.manual_seed(0)
    pooled = Router(router_config("tiny", input_downsample=2, spatial_patch=8)).eval()
    assert pooled.config.grid == (4, 2, 2) and pooled.config.num_patches == 16
    torch.nn.init.normal_(pooled.head.weight)
    plain = Router(router_config("tiny", height=16, width=16, spatial_patch=8))
    plain.load_state_dict(pooled.state_dict())
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    want = plain.eval().predict(torch.nn.functional.avg_pool3d(x, (1, 2, 2)))
    torch.testing.assert_close(pooled.predict(x), want, rtol=1e-5, atol=1e-5)


def test_config_saved_before_input_downsample_loads(tmp_path):
    """A config.json written before the field existed (a router trained earlier) loads unpooled."""
    torch.manual_seed(0)
    model = Router(router_config("small"))
    torch.nn.init.normal_(model.head.weight)
    path = model.save_pretrained(tmp_path / "r", preset="small")
    meta = json.loads((path / "config.json").read_text())
    del meta["config"]["input_downsample"]
    (path / "config.json").write_text(json.dumps(meta))
    old = Router.from_pretrained(path)
    assert old.config.input_downsample == 1 and old.config == model.config
    x = torch.rand(1, 3, 16, 64, 64) * 2 - 1
    assert torch.equal(old.predict(x), model.eval().predict(x))
    assert config_from_dict(RouterConfig, {"head": "reward"}).input_downsample == 1
