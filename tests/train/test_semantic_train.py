"""The full recipe's teacher terms in tokenizer training, on real footage and tiny random teachers.

V-JEPA2 alignment only, VideoMAE semantic discriminator only, and both (beside the PatchGAN): each
runs a training step through ``TokenizerTask`` / ``train_tokenizer``; gradients reach phi and the
discriminator heads but never the teachers; the terms are finite and logged; the CLI passes the new
options through. Teachers are tiny random-config ``transformers`` models saved to a temporary
directory (``HF_HUB_OFFLINE=1``: nothing is downloaded).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest
import torch
from typer.testing import CliRunner

from evatok_cli.cli import app
from evatok_cli.models.teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherError
from evatok_cli.train.tokenizer import TokenizerTrainConfig, train_tokenizer

COMMON = dict(preset="tiny", batch_size=1, workers=0, log_every=1, warmup=1, lr=1e-3, checkpoint_every=100)


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    try:
        import transformers as tr
    except ImportError:
        pytest.fail("transformers is not installed: pip install evatok[semantic] (the teacher tests need it)")
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    tr.VJEPA2Model(
        tr.VJEPA2Config(
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
    ).save_pretrained(root / "vjepa2")
    tr.VideoMAEForPreTraining(
        tr.VideoMAEConfig(
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
    ).save_pretrained(root / "videomae")
    (root / "videomae" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)})
    )
    return {"vjepa2": root / "vjepa2", "videomae": root / "videomae"}


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_step_all_terms_gradients_reach_phi_and_heads_not_teachers(teacher_dirs, video_dir):
    from evatok_cli.models.discriminator import discriminator_for
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
    from evatok_cli.train.data import clip_batches
    from evatok_cli.train.dist import DistEnv
    from evatok_cli.train.tokenizer import TokenizerTask, alignment_hook, fixed_assignment, semantic_discriminator
    from evatok_cli.video import ClipSpec, list_inputs

    env = DistEnv()
    torch.manual_seed(0)
    config = tokenizer_config("tiny")
    hook = alignment_hook(teacher_dirs["vjepa2"], config, env)
    sd = semantic_discriminator(teacher_dirs["videomae"], env)
    teachers = {"vjepa2": hook.teacher.model, "videomae": sd.teacher.model}
    before = {k: {n: p.clone() for n, p in m.named_parameters()} for k, m in teachers.items()}
    phi0 = [p.clone() for p in hook.parameters()]
    heads0 = [p.clone() for p in sd.parameters()]
    task = TokenizerTask(
        model=EVATokTokenizer(config),
        env=env,
        assign=fixed_assignment((4, 4, 4, 4)),
        preset="tiny",
        cfg=TokenizerTrainConfig(steps=2, warmup=1, disc="both", disc_start=0, semantic_disc_start=0),
        discriminator=discriminator_for("tiny", 8, 32, 32),
        align_hook=hook,
        semantic_disc=sd,
    )
    spec = ClipSpec(frames=config.frames, height=config.height, width=config.width)
    batch = next(clip_batches(list_inputs([str(video_dir)]), spec, seed=0, local_batch=2)(0))  # real footage
    m = task.train_step(batch, 1)
    for k in ("align", "g_sem", "d_sem_loss", "d_sem_real", "d_sem_fake", "lecam", "g_adv", "d_loss", "loss"):
        assert math.isfinite(m[k]), k
    assert -1 <= m["align"] <= 1
    assert m["align_teacher_s"] > 0 and m["sem_teacher_s"] > 0  # the teachers' cost is reported
    for k, model in teachers.items():  # teachers: untouched, no gradient
        for n, p in model.named_parameters():
            assert p.grad is None and not p.requires_grad and torch.equal(p, before[k][n]), (k, n)
    assert all(p.grad is not None for p in hook.parameters())  # phi learned from L_align ...
    assert any(not torch.equal(a, b) for a, b in zip(phi0, hook.parameters()))
    assert all(p.grad is not None for p in sd.parameters())  # ... and the heads from the D step
    assert any(not torch.equal(a, b) for a, b in zip(heads0, sd.parameters()))
    # the train state carries phi, the heads and their optimiser, never a teacher weight
    state = task.state_dict()
    assert set(state["align"]) == {k for k, _ in hook.named_parameters()}
    assert all(k.startswith(("heads.", "ema_")) for k in state["semantic_disc"])
    assert "semantic_disc_opt" in state
    # the semantic discriminator's generator term alone reaches the tokenizer through the frozen VideoMAE
    recon = torch.zeros(1, 3, 8, 32, 32, requires_grad=True)
    g, _ = task._semantic_generator_term(recon, {})
    g.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["align", "semantic"])  # "both": the resume test below
def test_train_tokenizer_with_each_term(mode, teacher_dirs, video_dir, tmp_path):
    kw: dict = {}
    if mode in ("align", "both"):
        kw["align_teacher"] = teacher_dirs["vjepa2"]
    if mode in ("semantic", "both"):
        kw.update(disc_teacher=teacher_dirs["videomae"], disc=mode, semantic_disc_start=1)
    out = train_tokenizer(
        stage="proxy", data=[str(video_dir)], out=tmp_path / mode, steps=2, disc_start=1, **COMMON, **kw
    )
    recs = _curve(tmp_path / mode)
    assert [r["step"] for r in recs] == [0, 1]
    last = recs[-1]
    assert ("align" in last) == (mode != "semantic")
    assert ("g_sem" in last and "d_sem_loss" in last) == (mode != "align")
    assert ("d_loss" in last) == (mode != "semantic")  # "semantic" replaces the PatchGAN
    assert "g_sem" not in recs[0]  # the semantic discriminator starts at semantic_disc_start
    assert all(math.isfinite(v) for r in recs for v in r.values())
    meta = json.loads((out / "config.json").read_text())
    assert ("disc_teacher" in meta) == (mode != "align")


@pytest.mark.slow
def test_both_teachers_and_resume_equals_uninterrupted(teacher_dirs, video_dir, tmp_path):
    kw = dict(
        align_teacher=teacher_dirs["vjepa2"],
        disc_teacher=teacher_dirs["videomae"],
        semantic_disc_start=0,
        disc_start=1,
        steps=2,
        stage="proxy",
        data=[str(video_dir)],
        **COMMON,
    )
    out = train_tokenizer(out=tmp_path / "full", **kw)  # default disc with a disc teacher: both
    recs = _curve(tmp_path / "full")
    assert {"align", "g_sem", "d_sem_loss", "lecam", "sem_teacher_s", "align_teacher_s"} <= recs[0].keys()
    assert "d_loss" not in recs[0] and "d_loss" in recs[1]  # the PatchGAN beside it, from its own start
    assert all(math.isfinite(v) for r in recs for v in r.values())
    meta = json.loads((out / "config.json").read_text())
    assert meta["align_teacher"] == str(teacher_dirs["vjepa2"]) and meta["disc_teacher"] == str(
        teacher_dirs["videomae"]
    )
    train_tokenizer(out=tmp_path / "part", stop_at=1, **kw)
    train_tokenizer(out=tmp_path / "part", resume=True, **kw)  # phi, heads, LeCam EMAs, optimisers restored
    a, b = _curve(tmp_path / "full"), _curve(tmp_path / "part")
    assert [r["step"] for r in b] == [0, 1]
    for k in ("loss", "align", "g_sem", "d_sem_loss", "lecam", "d_loss"):
        assert a[-1][k] == pytest.approx(b[-1][k], rel=1e-4, abs=1e-5), k


def test_errors(teacher_dirs, video_dir, tmp_path):
    run = dict(stage="proxy", data=[str(video_dir)], out=tmp_path / "x", steps=1, **COMMON)
    with pytest.raises(ValueError, match="needs --disc-teacher"):
        train_tokenizer(disc="semantic", **run)
    with pytest.raises(ValueError, match="--no-disc"):
        train_tokenizer(disc_teacher=teacher_dirs["videomae"], discriminator=False, **run)
    with pytest.raises(ValueError, match="does not use --disc-teacher"):
        train_tokenizer(disc_teacher=teacher_dirs["videomae"], disc="patchgan", **run)
    with pytest.raises(ValueError, match="align-layer"):
        train_tokenizer(align_teacher=teacher_dirs["vjepa2"], align_layer=0, **run)
    with pytest.raises(TeacherError, match=str(tmp_path / "missing")):
        train_tokenizer(align_teacher=tmp_path / "missing", **run)
    with pytest.raises(ValueError, match="disc must be"):
        TokenizerTrainConfig(steps=1, disc="dino")
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
    from evatok_cli.train.dist import DistEnv
    from evatok_cli.train.tokenizer import TokenizerTask, fixed_assignment

    task = dict(model=EVATokTokenizer(tokenizer_config("tiny")), env=DistEnv(), assign=fixed_assignment((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="needs a semantic discriminator"):
        TokenizerTask(cfg=TokenizerTrainConfig(steps=1, disc="both"), **task)


def test_cli_passes_the_teacher_options(tmp_path, teacher_dirs, video_dir):
    runner = CliRunner()
    with mock.patch("evatok_cli.train.tokenizer.train_tokenizer", return_value=tmp_path / "step") as call:
        res = runner.invoke(
            app,
            [
                "train",
                "tokenizer",
                "--data",
                "v/",
                "--out",
                str(tmp_path),
                "--preset",
                "tiny",
                "--align-teacher",
                "w/vjepa2",
                "--disc-teacher",
                "w/videomae",
                "--align-weight",
                "0.5",
                "--align-layer",
                "2",
                "--disc",
                "semantic",
                "--semantic-disc-start",
                "7",
                "--semantic-disc-weight",
                "0.3",
                "--quiet",
            ],
        )
    assert res.exit_code == 0, res.output
    kw = call.call_args.kwargs
    assert kw["align_teacher"] == Path("w/vjepa2") and kw["disc_teacher"] == Path("w/videomae")
    assert (kw["align_weight"], kw["align_layer"], kw["disc"]) == (0.5, 2, "semantic")
    assert (kw["semantic_disc_start"], kw["semantic_disc_weight"]) == (7, 0.3)
    with mock.patch("evatok_cli.train.tokenizer.train_tokenizer") as call:
        res = runner.invoke(app, ["train", "tokenizer", "--data", "v/", "--out", str(tmp_path), "--disc", "dino"])
    assert res.exit_code == 2 and not call.called
    # a missing teacher directory: a one-line error naming it, exit 1
    res = runner.invoke(
        app,
        [
            "train",
            "tokenizer",
            "--data",
            str(video_dir),
            "--out",
            str(tmp_path / "o"),
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--disc-teacher",
            str(tmp_path / "no-videomae"),
            "--quiet",
        ],
    )
    assert res.exit_code == 1 and str(tmp_path / "no-videomae") in res.output and "Traceback" not in res.output
