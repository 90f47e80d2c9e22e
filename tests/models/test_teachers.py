"""Teachers (V-JEPA2, VideoMAE) and the semantic terms, on tiny random-config ``transformers`` models.

The models are built from ``transformers`` config classes with seeded random weights, saved with
``save_pretrained`` to a temporary directory and loaded back through ``load_teacher`` (no weights
can be downloaded here, and none may be: ``HF_HUB_OFFLINE=1`` and sockets refuse to connect).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest
import torch

from evatok_cli.models.semantic import (
    AlignmentHook,
    AlignmentProjector,
    SemanticDiscriminator,
    alignment_loss,
    default_disc_layers,
)
from evatok_cli.models.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherError,
    VideoMAETeacher,
    VJEPA2Teacher,
    load_teacher,
    sample_frames,
)


def _transformers():
    try:
        import transformers
    except ImportError:
        pytest.fail("transformers is not installed: pip install evatok[semantic] (the teacher tests need it)")
    return transformers


def make_vjepa2(path):
    """A tiny V-JEPA2: 64x64 input, 8x8 patches, tubelet 2, 2 layers of width 32."""
    tr = _transformers()
    torch.manual_seed(0)
    cfg = tr.VJEPA2Config(
        crop_size=64,
        patch_size=8,
        tubelet_size=2,
        frames_per_clip=16,
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        mlp_ratio=2.0,
        pred_hidden_size=16,
        pred_num_attention_heads=2,
        pred_num_hidden_layers=1,
        num_pooler_layers=1,
    )
    tr.VJEPA2Model(cfg).save_pretrained(path)
    return path


def make_videomae(path):
    """A tiny VideoMAE pre-training checkpoint (as MCG-NJU/videomae-base): 4 frames of 32x32, 3 layers."""
    tr = _transformers()
    torch.manual_seed(1)
    cfg = tr.VideoMAEConfig(
        image_size=32,
        patch_size=16,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    tr.VideoMAEForPreTraining(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)})
    )
    return path


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {"vjepa2": make_vjepa2(root / "vjepa2"), "videomae": make_videomae(root / "videomae")}


@pytest.fixture(scope="module")
def teachers(teacher_dirs):
    return {k: load_teacher(p, k) for k, p in teacher_dirs.items()}


def test_load_is_local_frozen_and_offline(teacher_dirs, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a teacher load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    vj, vm = load_teacher(teacher_dirs["vjepa2"], "vjepa2"), load_teacher(teacher_dirs["videomae"], "videomae")
    assert isinstance(vj, VJEPA2Teacher) and isinstance(vm, VideoMAETeacher)
    for t in (vj, vm):
        assert not t.model.training
        assert all(not p.requires_grad for p in t.parameters())
    assert (vj.hidden_size, vj.num_layers, vj.image_size, vj.grid(16)) == (32, 2, 64, (8, 8, 8))
    assert (vm.hidden_size, vm.num_layers, vm.image_size, vm.grid(16)) == (32, 3, 32, (2, 2, 2))


def test_input_pipeline_maps_clip_to_teacher_input(teachers):
    # (B, 3, 16, H, W) in [-1, 1], frame i a constant grey level, so sampling and range are checkable
    b, f, h, w = 2, 16, 40, 56
    levels = torch.linspace(-1, 1, f)
    video = levels.view(1, 1, f, 1, 1).expand(b, 3, f, h, w).clone()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)

    x = teachers["vjepa2"].preprocess(video)
    assert x.shape == (b, 16, 3, 64, 64)  # (B, F', C, S, S): V-JEPA2 keeps the clip's 16 frames
    pixels = x * std + mean  # back to [0, 1]
    torch.testing.assert_close(pixels[:, :, 0, 0, 0], ((levels + 1) / 2).expand(b, f))

    x = teachers["videomae"].preprocess(video)
    assert x.shape == (b, 4, 3, 32, 32)  # VideoMAE: its own 16 -> here 4 frames, tubelet 2
    pixels = x * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    idx = sample_frames(16, 4)
    assert idx.tolist() == [0, 5, 10, 15]
    torch.testing.assert_close(pixels[:, :, 1, 7, 9], ((levels[idx] + 1) / 2).expand(b, 4))
    # random footage-like pixels stay in [0, 1] after the antialiased resize
    rnd = teachers["videomae"].preprocess(torch.rand(1, 3, 16, 128, 128) * 2 - 1) * std + mean
    assert rnd.min() >= -1e-5 and rnd.max() <= 1 + 1e-5
    # short clips repeat frames up to the tubelet / the teacher's frame count
    assert teachers["vjepa2"].preprocess(video[:, :, :3]).shape[1] == 4
    assert teachers["videomae"].preprocess(video[:, :, :2]).shape[1] == 4
    assert sample_frames(2, 4).tolist() == [0, 0, 1, 1]


def test_features_are_the_models_outputs(teachers):
    torch.manual_seed(0)
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    vj, vm = teachers["vjepa2"], teachers["videomae"]
    (f,) = vj(video)
    assert f.shape == (2, 4, 8, 8, 32) and not f.requires_grad
    ref = vj.model(pixel_values_videos=vj.preprocess(video), skip_predictor=True).last_hidden_state
    torch.testing.assert_close(f, ref.view(2, 4, 8, 8, 32))
    assert vj.last_time_s > 0
    f1, f3 = vm(video, layers=(1, 3))
    hs = vm.model(pixel_values=vm.preprocess(video), output_hidden_states=True).hidden_states
    torch.testing.assert_close(f1, hs[1].view(2, 2, 2, 2, 32))
    torch.testing.assert_close(f3, hs[3].view(2, 2, 2, 2, 32))
    with pytest.raises(ValueError, match="layers 1..3"):
        vm(video, layers=(4,))


def test_gradients_reach_the_input_but_not_the_teacher(teachers):
    vm = teachers["videomae"]
    before = {n: p.clone() for n, p in vm.model.named_parameters()}
    video = (torch.rand(1, 3, 8, 32, 32) * 2 - 1).requires_grad_()
    (f,) = vm(video, layers=(2,), grad=True)
    f.square().mean().backward()
    assert video.grad is not None and video.grad.abs().sum() > 0
    for n, p in vm.model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n]), n


def test_errors_are_one_line_and_name_the_path(teacher_dirs, tmp_path):
    cases = {
        tmp_path / "nope": "is not a directory",
        tmp_path: "has no config.json",
        teacher_dirs["videomae"]: "'videomae' model, expected 'vjepa2'",
    }
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    shutil.copy(teacher_dirs["vjepa2"] / "config.json", cfg_only / "config.json")
    cases[cfg_only] = "has no weights"
    for path, msg in cases.items():
        with pytest.raises(TeacherError, match=msg) as e:
            load_teacher(path, "vjepa2")
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(TeacherError, match="unknown teacher kind"):
        load_teacher(teacher_dirs["vjepa2"], "dino")
    # weights of another shape (a different model under the same name) are refused, not re-initialised
    odd = tmp_path / "odd"
    shutil.copytree(teacher_dirs["vjepa2"], odd)
    meta = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**meta, "hidden_size": 48, "num_attention_heads": 3}))
    with pytest.raises(TeacherError, match=str(odd)):
        load_teacher(odd, "vjepa2")


def test_missing_transformers_says_what_to_install(teacher_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(TeacherError, match=r"pip install evatok\[semantic\]"):
        load_teacher(teacher_dirs["videomae"], "videomae")


def test_normalisation_comes_from_the_preprocessor_config(teacher_dirs, tmp_path):
    d = tmp_path / "vm"
    shutil.copytree(teacher_dirs["videomae"], d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    x = load_teacher(d, "videomae").preprocess(torch.full((1, 3, 4, 32, 32), 0.25))
    torch.testing.assert_close(x, torch.full_like(x, 0.25))  # ((0.25 + 1) / 2 - 0.5) / 0.5


# ------------------------------------------------------------------------------- semantic terms
def test_projector_depatchifies_onto_the_teacher_grid():
    dt, r = 3, (2, 1, 2)
    proj = AlignmentProjector(dt * 4, dt, (2, 3, 2), (4, 3, 4))
    assert proj.ratio == r
    proj.mlp = torch.nn.Identity()  # look at the rearrangement alone
    x = torch.randn(2, 2, 3, 2, dt * 4)
    y = proj(x)
    assert y.shape == (2, 4, 3, 4, dt)
    for t, i, j, k, q in [(0, 0, 0, 0, 0), (1, 1, 2, 1, 1), (0, 1, 1, 0, 1)]:
        sub = x[:, t, j, k].view(2, *r, dt)  # the r sub-vectors of decoder patch (t, j, k)
        torch.testing.assert_close(y[:, t * 2 + i, j, k * 2 + q], sub[:, i, 0, q])
    # no integer ratio: one vector per decoder patch, resized trilinearly
    odd = AlignmentProjector(8, dt, (4, 4, 4), (2, 3, 3))
    assert odd.ratio is None and odd(torch.randn(1, 4, 4, 4, 8)).shape == (1, 2, 3, 3, dt)


def test_alignment_hook_trains_phi_only(teachers):
    from evatok_cli.models.tokenizer import tokenizer_config

    vj = teachers["vjepa2"]
    hook = AlignmentHook.for_tokenizer(vj, tokenizer_config("tiny"))  # decoder grid 4x4x4, teacher 4x8x8
    assert hook.proj.ratio == (1, 2, 2)
    assert all(k.startswith("proj.") for k in hook.state_dict())  # the teacher is never saved
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    dec = torch.randn(2, 4, 4, 4, 96, requires_grad=True)
    loss = hook(video, dec)
    assert -1 <= loss.item() <= 1 and hook.last_metrics["align_teacher_s"] > 0
    loss.backward()
    assert dec.grad is not None and all(p.grad is not None for p in hook.parameters())
    assert all(p.grad is None for p in vj.parameters())
    # perfect alignment is -1
    (target,) = vj(video)
    assert alignment_loss(2 * target, target).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="dec_feature_layer=0"):
        hook(video, None)


def test_semantic_discriminator_heads_and_guards(teachers):
    assert default_disc_layers(12) == (3, 6, 9, 12) and default_disc_layers(2) == (1, 2)
    vm = teachers["videomae"]
    sd = SemanticDiscriminator(vm)
    assert sd.layers == (1, 2, 3)
    assert {n.split(".")[0] for n, _ in sd.named_parameters()} == {"heads"}
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    feats = sd.features(video, grad=False)
    assert [f.shape for f in feats] == [(2, 8, 32)] * 3  # (B, t'*h'*w', D) per layer
    logits = sd(feats)
    assert logits.shape == (2, 24) and torch.isfinite(logits).all()
    # the parameter-free norm makes the heads blind to the feature scale (deep layers grow large)
    sd.eval()
    torch.testing.assert_close(sd([100 * f for f in feats]), sd(feats), rtol=1e-3, atol=1e-3)
    sd.train()
    reg = sd.lecam(torch.full((2, 24), 3.0), torch.full((2, 24), -3.0))
    assert reg.item() == pytest.approx(18.0)  # relu(3 - 0)^2 + relu(0 + 3)^2
    assert sd.ema_real.item() == pytest.approx(0.03) and sd.ema_fake.item() == pytest.approx(-0.03)
    with pytest.raises(ValueError, match="outside"):
        SemanticDiscriminator(vm, layers=(0, 2))
