"""FVD: the Fréchet distance against closed forms, exact running statistics (also across torchrun
ranks), the I3D state-dict layout, and both feature-network variants on seeded random weights.

Run as a script (``torchrun --nproc_per_node 2 test_fvd.py OUT``) it is the distributed worker of
``test_all_reduce_under_torchrun``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evatok_cli.metrics.fvd import FVD, FeatureStats, frechet_distance, resize_frames, sqrtm_psd
from evatok_cli.metrics.i3d import I3D

HERE = Path(__file__).resolve()


def _dyadic_feats(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Features k/8 with |k| <= 64: every sum and product is exact in float64, whatever the order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, (n, d), generator=g).double() / 8


def _random_cov(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # torch inputs of any float dtype work too
    got = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(s1)), torch.tensor(mu2), torch.tensor(np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_full_covariance_matches_independent_eigvals():
    rng = np.random.default_rng(1)
    d = 40
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    c1, c2 = _random_cov(d, rng), _random_cov(d, rng)
    # independent: tr sqrt(C1 C2) from the (real, positive) eigenvalues of the non-symmetric product
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)
    # symmetric in its two arguments
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(expected, rel=1e-10)
    r = sqrtm_psd(c1).numpy()
    assert np.allclose(r @ r, c1, atol=1e-10) and np.allclose(r, r.T)


def test_frechet_of_a_set_with_itself_is_zero_even_rank_deficient():
    for n, d in ((500, 16), (10, 32), (4, 400)):  # the last two covariances are rank-deficient
        stats = FeatureStats(d).update(torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * 3 + 1)
        mu, cov = stats.mean(), stats.cov()
        scale = float(torch.trace(cov))
        assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-12 * scale
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- statistics


def test_stats_merge_is_exact_and_moments_match_numpy(tmp_path):
    feats = _dyadic_feats(101, 7)
    one = FeatureStats(7, {"variant": "t"}).update(feats)
    a = FeatureStats(7, {"variant": "t"}).update(feats[:40])
    b = FeatureStats(7, {"variant": "t"}).update(feats[40:])
    merged = a.merge(b)
    assert merged.count == one.count == 101
    assert torch.equal(merged.sum, one.sum) and torch.equal(merged.outer, one.outer)
    x = feats.numpy()
    assert np.allclose(one.mean().numpy(), x.mean(0), rtol=0, atol=1e-13)
    assert np.allclose(one.cov().numpy(), np.cov(x, rowvar=False), rtol=0, atol=1e-12)
    assert np.allclose(one.cov(ddof=0).numpy(), np.cov(x, rowvar=False, bias=True), rtol=0, atol=1e-12)

    back = FeatureStats.load(one.save(tmp_path / "real.safetensors"))
    assert back.count == 101 and back.meta == {"variant": "t"}
    assert torch.equal(back.sum, one.sum) and torch.equal(back.outer, one.outer)
    again = FeatureStats.from_dict(one.to_dict())
    assert torch.equal(again.outer, one.outer) and again.meta == one.meta
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left behind

    with pytest.raises(ValueError, match="merge"):
        one.merge(FeatureStats(7, {"variant": "other"}))
    with pytest.raises(ValueError, match="expected features"):
        one.update(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="ddof"):
        FeatureStats(7).update(feats[:1]).cov()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stats = FeatureStats(5, {"variant": "t"}).update(_dyadic_feats(64, 5, seed=3)[rank::world])
    stats.all_reduce()
    if rank == 0:
        stats.save(out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "reduced.safetensors"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(HERE), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    reduced = FeatureStats.load(out)
    one = FeatureStats(5, {"variant": "t"}).update(_dyadic_feats(64, 5, seed=3))
    assert reduced.count == 64 and reduced.meta == one.meta
    assert torch.equal(reduced.sum, one.sum) and torch.equal(reduced.outer, one.outer)
    # without a process group all_reduce is a no-op
    assert torch.equal(FeatureStats(5).update(_dyadic_feats(4, 5)).all_reduce().sum, _dyadic_feats(4, 5).sum(0))


# ----------------------------------------------------------------------------- I3D


def _expected_i3d_keys() -> list[str]:
    unit = ["conv3d.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    keys = [f"{stem}.{u}" for stem in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3") for u in unit]
    for block in ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c"):
        keys += [f"Mixed_{block}.{br}.{u}" for br in ("b0", "b1a", "b1b", "b2a", "b2b", "b3b") for u in unit]
    return sorted(keys + ["logits.conv3d.weight", "logits.conv3d.bias"])


def test_i3d_state_dict_layout_and_shapes():
    with torch.device("meta"):  # layout and shapes only
        net = I3D()
    sd = net.state_dict()
    assert sorted(sd) == _expected_i3d_keys()
    assert sd["Conv3d_1a_7x7.conv3d.weight"].shape == (64, 3, 7, 7, 7)
    assert sd["Mixed_3b.b1b.conv3d.weight"].shape == (128, 96, 3, 3, 3)
    assert sd["Mixed_5c.b0.conv3d.weight"].shape == (384, 832, 1, 1, 1)
    assert sd["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1) and sd["logits.conv3d.bias"].shape == (400,)
    assert sum(p.numel() for p in net.parameters()) == 12_697_264  # Inception-v1 I3D, 400 classes
    # a 16x224x224 clip reaches Mixed_5c as 2x7x7 (shape only, on the meta device)
    assert net.features(torch.empty(1, 3, 16, 224, 224, device="meta")).shape == (1, 1024, 2, 7, 7)


def test_i3d_head_equals_reference_pool_then_time_mean(monkeypatch):
    net = I3D.random(seed=1)
    for t in (2, 4):
        fmap = torch.randn(2, 1024, t, 7, 7, generator=torch.Generator().manual_seed(t))
        monkeypatch.setattr(net, "features", lambda x, fmap=fmap: fmap)
        ref = net.logits(F.avg_pool3d(fmap, (2, 7, 7), stride=1)).squeeze(4).squeeze(3).mean(dim=2)
        assert torch.allclose(net(torch.empty(0)), ref, atol=1e-5)


def test_i3d_checkpoint_round_trip_through_fvd(tmp_path):
    net = I3D.random(seed=2)
    again = I3D.random(seed=2).state_dict()
    assert all(torch.equal(v, again[k]) and torch.isfinite(v).all() for k, v in net.state_dict().items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    sd = net.state_dict()
    path = tmp_path / "i3d_pretrained_400.pt"
    # old checkpoints carry no `num_batches_tracked`; they load strictly all the same
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, path)
    fvd = FVD.load(path, variant="videogpt", resolution=16)
    assert fvd.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(v, fvd.net.state_dict()[k]) for k, v in sd.items() if "num_batches" not in k)
    videos = torch.rand(2, 3, 2, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = FVD(net, "videogpt", weights_sha256="x", resolution=16)
    feats = fvd.features(videos)
    assert feats.shape == (2, 400) and torch.allclose(feats, ref.features(videos), atol=1e-6)

    torch.save({k: v for k, v in sd.items() if not k.startswith("logits")}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        FVD.load(tmp_path / "bad.pt", variant="videogpt")
    with pytest.raises(FileNotFoundError, match="i3d_pretrained_400.pt"):
        FVD.load(tmp_path / "missing.pt", variant="videogpt")
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        FVD.load(tmp_path / "missing.pt", variant="styleganv")
    with pytest.raises(ValueError, match="unknown FVD variant"):
        FVD.load(path, variant="tf")


# ----------------------------------------------------------------------------- FVD end to end


def test_fvd_random_i3d_end_to_end():
    fvd = FVD.random(seed=0, resolution=16, batch_size=4)
    g = torch.Generator().manual_seed(1)
    real_videos = torch.rand(4, 3, 2, 32, 32, generator=g) * 2 - 1
    noisy = (real_videos + 0.5 * torch.randn(real_videos.shape, generator=g)).clamp(-1, 1)
    real, same, fake = fvd.new_stats(), fvd.new_stats(), fvd.new_stats()
    for half in (real_videos[:3], real_videos[3:]):
        fvd.update(real, half)
    fvd.update(same, real_videos)
    fvd.update(fake, noisy)
    # batching changes only float32 round-off in the network
    assert real.count == same.count and torch.allclose(
        real.outer, same.outer, rtol=0, atol=1e-5 * float(real.outer.abs().max())
    )
    zero, pos = fvd.compute(real, same), fvd.compute(real, fake)
    assert abs(zero.fvd) < 1e-4 * float(torch.trace(real.cov())) and pos.fvd > 1e-3
    assert abs(fvd.compute(real, real).fvd) < 1e-9 * float(torch.trace(real.cov()))
    assert pos.to_dict() == {
        "fvd": pos.fvd,
        "variant": "videogpt",
        "weights_sha256": "random(seed=0)",
        "resolution": 16,
        "feature_dim": 400,
        "n_real": 4,
        "n_fake": 4,
    }
    other = FVD.random(seed=0, resolution=32)
    with pytest.raises(ValueError, match="statistics made with"):
        other.compute(real, fake)


def test_resize_frames_short_side_then_centre_crop():
    x = torch.rand(1, 3, 2, 20, 40) * 2 - 1
    out = resize_frames(x, 10)
    assert out.shape == (1, 3, 2, 10, 10)
    full = F.interpolate(x[0].transpose(0, 1), size=(10, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(out[0].transpose(0, 1), full[..., 5:15])
    sq = torch.rand(2, 3, 3, 16, 16)
    ref = F.interpolate(sq.transpose(1, 2).reshape(6, 3, 16, 16), size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(resize_frames(sq, 24), ref.view(2, 3, 3, 24, 24).transpose(1, 2))


class _ToyDetector(torch.nn.Module):
    """Stands in for StyleGAN-V's i3d_torchscript.pt: same call signature, checks its input convention."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)

    def forward(
        self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False
    ) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("called with the wrong flags")
        if x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224 or x.min() < -1.0 or x.max() > 1.0:
            raise RuntimeError("expected (B, 3, T, 224, 224) in [-1, 1]")
        return self.proj(x.mean(dim=(2, 3, 4)))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # StyleGAN-V's file is TorchScript
def test_styleganv_torchscript_variant(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_ToyDetector()), str(path))
    fvd = FVD.load(path, variant="styleganv", feature_dim=8)
    assert fvd.ddof == 0 and fvd.meta["variant"] == "styleganv"
    videos = torch.rand(3, 3, 2, 32, 32, generator=torch.Generator().manual_seed(2)) * 2.4 - 1.2  # clamped
    feats = fvd.features(videos)
    assert feats.shape == (3, 8)
    stats = fvd.new_stats()
    fvd.update(stats, videos)
    fvd.update(stats, videos.flip(0))
    assert fvd.compute(stats, stats).fvd == pytest.approx(0.0, abs=1e-9)
    wrong = FVD.load(path, variant="styleganv")  # default feature_dim 400 != 8
    with pytest.raises(ValueError, match="returned"):
        wrong.features(videos)


if __name__ == "__main__":
    _dist_worker(sys.argv[1])
