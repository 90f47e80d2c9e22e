"""LPIPS: metric properties on seeded random weights, the torchvision / lpips weight-file formats."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from evatok_cli.metrics import METRICS, get_metric
from evatok_cli.metrics.lpips import LPIPS, AlexNetFeatures, VGG16Features

# torchvision's conv indices in `vgg16().features` / `alexnet().features`, written out by hand.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
ALEX_CONVS = (0, 3, 6, 8, 10)
HEAD_KEYS = [f"lin{i}.model.1.weight" for i in range(5)]


def _video(seed: int, b=1, f=4, h=32, w=32) -> torch.Tensor:
    """Smooth-ish random video in [-1, 1] (low-res noise upsampled), (B, 3, F, H, W)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b * f, 3, h // 4, w // 4, generator=g) * 2 - 1
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x.view(b, f, 3, h, w).transpose(1, 2).contiguous()


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module", params=["vgg", "alex"])
def model(request) -> LPIPS:
    return LPIPS.random(request.param, seed=0)


def test_identity_symmetry_positivity_and_noise_ordering(model):
    x = _video(1, b=2)
    small, large = _noisy(x, 0.05, 2), _noisy(x, 0.4, 3)
    assert torch.equal(model(x, x, 2), torch.zeros(2, 2))
    d_small, d_large = model(small, x, 2), model(large, x, 2)
    assert d_small.shape == (2, 2)
    assert torch.allclose(model(x, small, 2), d_small, rtol=1e-5, atol=1e-7)
    assert (d_small > 0).all() and (d_large > d_small).all()
    assert model.name == "lpips" and model.higher_is_better is False
    assert all((model.heads[i].model[1].weight >= 0).all() for i in range(5))


def test_per_block_is_mean_of_frames(model):
    x = _video(4, f=4)
    y = _noisy(x, 0.2, 5)
    per_frame = model.frames(y, x)
    assert torch.allclose(model(y, x, 2), per_frame.view(1, 2, 2).mean(-1), atol=1e-7)
    # frames are independent images: scoring frame 3 alone gives the same value
    alone = model.images(y[:, :, 3], x[:, :, 3])
    assert torch.allclose(alone, per_frame[:, 3], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="blocks"):
        model(y, x, 3)


def test_loss_gradients_reach_recon_only(model):
    x = _video(6)
    recon = _noisy(x, 0.2, 7).requires_grad_(True)
    target = x.clone().requires_grad_(True)
    model.train()  # a parent's .train() must not unfreeze it
    assert not model.training
    loss = model.loss(recon, target)
    loss.backward()
    assert loss.item() > 0 and recon.grad is not None
    assert torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # flat black frames give all-zero early features: gradients stay finite (no 0/0 in the norm)
    black = torch.full((1, 3, 2, 32, 32), -1.0)
    r = (black + 0.01).requires_grad_(True)
    model.loss(r, black).backward()
    assert torch.isfinite(r.grad).all()


def test_small_frames_are_upsampled_to_32():
    m = LPIPS.random("alex", seed=1)
    x = _video(8, h=16, w=16)
    y = _noisy(x, 0.2, 9)
    up = lambda v: F.interpolate(v[0].transpose(0, 1), size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    assert torch.allclose(m.frames(y, x)[0], m.images(up(y), up(x)), rtol=1e-5, atol=1e-7)


def _torchvision_like_state(net: str, seed: int) -> dict[str, torch.Tensor]:
    """A full-model torchvision-format state dict: random features + (small dummy) classifier keys."""
    g = torch.Generator().manual_seed(seed)
    convs = VGG16_CONVS if net == "vgg" else ALEX_CONVS
    shapes = (VGG16Features() if net == "vgg" else AlexNetFeatures()).features
    sd = {}
    for i in convs:
        conv = shapes[i]
        sd[f"features.{i}.weight"] = torch.randn(conv.weight.shape, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(conv.bias.shape, generator=g) * 0.01
    sd["classifier.1.weight"] = torch.zeros(4, 4)  # the full model's head: ignored by LPIPS
    sd["classifier.1.bias"] = torch.zeros(4)
    return sd


@pytest.mark.parametrize(
    "net,convs,channels",
    [("vgg", VGG16_CONVS, (64, 128, 256, 512, 512)), ("alex", ALEX_CONVS, (64, 192, 384, 256, 256))],
)
def test_torchvision_and_lpips_files_load_strictly(tmp_path, net, convs, channels):
    expected = sorted(f"features.{i}.{p}" for i in convs for p in ("weight", "bias"))
    sd = _torchvision_like_state(net, seed=3)
    backbone = tmp_path / f"{net}-torchvision.pth"
    torch.save(sd, backbone)
    heads_sd = {k: torch.rand(1, c, 1, 1) for k, c in zip(HEAD_KEYS, channels)}
    heads = tmp_path / f"{net}.pth"
    torch.save(heads_sd, heads)

    m = get_metric("lpips", net=net, backbone=str(backbone), heads=str(heads))
    assert isinstance(m, LPIPS) and METRICS["lpips"] is LPIPS
    assert sorted(m.backbone.state_dict()) == expected
    assert sorted(m.heads.state_dict()) == HEAD_KEYS
    for k in expected:
        assert torch.equal(m.backbone.state_dict()[k], sd[k])
    for k in HEAD_KEYS:
        assert torch.equal(m.heads.state_dict()[k], heads_sd[k])
    assert m.sources == {"backbone": str(backbone), "heads": str(heads)}
    x = _video(10)
    assert m(_noisy(x, 0.2, 11), x, 4).shape == (1, 1)

    if net == "vgg":
        return  # the error paths below are the same code for both nets (and saving VGG is slow)
    # a missing conv, or a heads file in another layout, is an error naming the file
    torch.save({k: v for k, v in sd.items() if k != f"features.{convs[-1]}.bias"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        LPIPS(net, backbone=tmp_path / "bad.pth", heads=heads)
    torch.save({f"lin{i}.weight": v for i, v in enumerate(heads_sd.values())}, tmp_path / "bad_heads.pth")
    with pytest.raises(ValueError, match="bad_heads.pth"):
        LPIPS(net, backbone=backbone, heads=tmp_path / "bad_heads.pth")


def test_heads_found_in_installed_lpips_package_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('lpips must not be imported')\n")
    heads_sd = {k: torch.rand(1, c, 1, 1) for k, c in zip(HEAD_KEYS, (64, 192, 384, 256, 256))}
    torch.save(heads_sd, pkg / "weights" / "v0.1" / "alex.pth")
    torch.save(_torchvision_like_state("alex", 4), tmp_path / "alexnet-owt-7be5be79.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    m = LPIPS("alex", backbone=tmp_path / "alexnet-owt-7be5be79.pth")
    assert "lpips" not in sys.modules
    assert m.sources["heads"] == str(pkg / "weights" / "v0.1" / "alex.pth")
    assert torch.equal(m.heads.lin2.model[1].weight, heads_sd["lin2.model.1.weight"])
    # the package has no vgg.pth: the error says what to pass
    torch.save(_torchvision_like_state("vgg", 5), tmp_path / "vgg16-397923af.pth")
    with pytest.raises(FileNotFoundError, match="heads=PATH"):
        LPIPS("vgg", backbone=tmp_path / "vgg16-397923af.pth")


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        get_metric("lpips")
    missing = tmp_path / "nowhere" / "alexnet.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LPIPS("alex", backbone=missing, heads=missing)
    torch.save(_torchvision_like_state("alex", 6), tmp_path / "alex_tv.pth")
    with pytest.raises(FileNotFoundError, match="heads"):
        LPIPS("alex", backbone=tmp_path / "alex_tv.pth", heads=tmp_path / "no_heads.pth")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        LPIPS("squeeze", backbone=tmp_path / "alex_tv.pth")
    # the existing metric names keep working
    assert get_metric("psnr").name == "psnr" and get_metric("ssim").name == "ssim"


def test_random_is_seeded():
    a, b, c = LPIPS.random("alex", 7), LPIPS.random("alex", 7), LPIPS.random("alex", 8)
    ka = a.backbone.state_dict()
    assert all(torch.equal(v, b.backbone.state_dict()[k]) for k, v in ka.items())
    assert not torch.equal(ka["features.0.weight"], c.backbone.state_dict()["features.0.weight"])
