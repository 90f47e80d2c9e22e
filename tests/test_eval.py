"""Evaluation library: protocol presets and clip selection, the numbers a recon report holds (checked
against the metrics computed directly), equal-quality savings, the real-statistics cache of gFVD,
and refusing to compare reports measured differently. Tiny models, random metric weights."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch

from evatok_cli.evaluation import (
    EvalError,
    NotComparable,
    compare_reports,
    equal_quality_tokens,
    evaluate_generation,
    evaluate_reconstruction,
)
from evatok_cli.evaluation.protocols import PROTOCOLS, Protocol, balanced_labels, get_protocol, plan_clips, select_clips
from evatok_cli.evaluation.report import EvalReport, load_report, render_markdown, write_report
from evatok_cli.metrics import FeatureStats, frechet_distance, psnr_frames
from evatok_cli.models.gpt import GPT, gpt_config
from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.video import list_inputs, read_clips, to_model_input

RANDOM = dict(i3d="random:0", lpips_weights="random:1", lpips_net="alex", device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores: one intra-op thread avoids oversubscription (10x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------- protocols
def test_paper_protocols_name_everything():
    rfvd = get_protocol("ucf-rfvd")
    assert (rfvd.frames, rfvd.height, rfvd.width, rfvd.fps) == (16, 128, 128, "native")
    assert rfvd.num_clips == 9537 and rfvd.sampling == "every" and rfvd.clips_per_video == "random"
    assert rfvd.fvd_variant == "styleganv" and rfvd.commands == ("recon",) and "trainlist01" in rfvd.split
    c2v = get_protocol("ucf-c2v-10k")
    assert c2v.num_samples == 10000 and c2v.class_balanced and c2v.commands == ("gen",)
    fp = get_protocol("k600-fp-50k")
    assert fp.cond_frames == 5 and fp.frames == 16 and fp.num_samples == 50000 and fp.task == "frame-prediction"
    sg = get_protocol("fvd2048-16f")
    assert sg.num_clips == sg.num_samples == 2048 and sg.sampling == "subset" and sg.frames == 16
    for p in PROTOCOLS.values():  # data only: a JSON round trip gives the same frozen object
        assert Protocol.from_dict(p.to_dict()) == p and p.reference and p.notes
    assert get_protocol("tiny").test_only and not rfvd.test_only
    tfp = get_protocol("tiny-fp")
    assert tfp.test_only and tfp.task == "frame-prediction" and (tfp.cond_frames, tfp.frames) == (3, 8)
    assert rfvd.reference_tokens == c2v.reference_tokens == 1024 and sg.reference_tokens is None  # "774 (-24.4%)"
    with pytest.raises(ValueError, match="unknown protocol 'ucf'.*ucf-rfvd"):
        get_protocol("ucf")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rfvd.num_clips = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="subset"):
        Protocol(name="x", task="any", commands=("recon",), dataset="d", split="s", sampling="subset")


def test_token_savings_against_max_level_and_the_papers_1024():
    from evatok_cli.assignments import PAPER_SPACE
    from evatok_cli.evaluation.engine import token_summary

    s = token_summary(774.0, PAPER_SPACE, get_protocol("ucf-rfvd"))
    assert s["uniform_tokens"] == 2048 and s["token_savings"] == pytest.approx(1 - 774 / 2048)
    assert s["reference_tokens"] == 1024 and round(100 * s["savings_vs_reference"], 1) == 24.4  # PAPER Table 2
    assert "reference_tokens" not in token_summary(774.0, PAPER_SPACE, get_protocol("fvd2048-16f"))


def test_balanced_labels_for_10k_ucf_samples():
    counts = Counter(balanced_labels(10000, 101))
    assert len(counts) == 101 and counts[0] == 100 and set(counts.values()) == {99, 100}
    assert balanced_labels(3, 0) == [0, 0, 0]  # no classes: the null class


def test_select_clips_every_subset_and_override():
    every = get_protocol("ucf-rfvd")
    idx, why = select_clips(9537, every)
    assert len(idx) == 9537 and why == []
    idx, why = select_clips(100, every)  # not the split: evaluated, but flagged
    assert len(idx) == 100 and "expects 9537" in why[0]
    sub = get_protocol("fvd2048-16f")
    a, why = select_clips(5000, sub)
    b, _ = select_clips(5000, sub)
    assert len(a) == 2048 and why == [] and np.array_equal(a, b) and np.all(np.diff(a) > 0)
    c, _ = select_clips(5000, dataclasses.replace(sub, seed=1))
    assert not np.array_equal(a, c)
    d, why = select_clips(9537, every, override=16)
    assert len(d) == 16 and "--num-clips 16" in why[0]
    e, why = select_clips(10, sub)
    assert len(e) == 10 and "only 10" in why[0]


def test_random_clip_start_depends_on_file_name_not_path(footage, video_dir):
    p = dataclasses.replace(get_protocol("tiny"), clips_per_video="random", seed=3)
    direct = plan_clips(list_inputs([str(footage["bikes"])]), p)[0]
    linked = plan_clips(list_inputs([str(video_dir / "ride" / "bikes.mp4")]), p)[0]
    assert direct == linked and len(direct) == 1
    starts = {
        plan_clips(list_inputs([str(footage["bikes"])]), dataclasses.replace(p, seed=s))[0][0][1] for s in range(8)
    }
    assert len(starts) > 1 and all(0 <= s <= 250 - 8 for s in starts)  # bikes.mp4: 250 frames


# ------------------------------------------------------------------------------ reconstruction
def test_recon_report_matches_direct_computation(tiny_tokenizer, video_dir, tmp_path):
    rep = evaluate_reconstruction(
        tiny_tokenizer,
        [video_dir],
        protocol="tiny",
        assignment="fixed:16,8,2,4",
        metrics=["psnr", "ssim", "lpips", "fvd"],
        stats_dir=tmp_path,
        **RANDOM,
    )
    assert rep.kind == "recon" and rep.protocol["name"] == "tiny" and rep.test_only and not rep.standard
    assert rep.summary["clips"] == 2 == len(rep.per_clip)  # `first` clip of each of the two videos
    assert rep.summary["mean_tokens"] == 30 and rep.summary["uniform_tokens"] == 64
    assert rep.summary["token_savings"] == pytest.approx(1 - 30 / 64)
    for k in ("psnr", "ssim", "lpips", "fvd"):
        assert math.isfinite(rep.summary[k]), k
    # PSNR of the first clip, recomputed outside the evaluation code
    tok = EVATokTokenizer.from_pretrained(tiny_tokenizer)
    clip = read_clips(list_inputs([str(video_dir)])[0], get_protocol("tiny").clip_spec(), policy="first")[0]
    video = to_model_input(torch.from_numpy(clip.frames)[None])
    tokens, lengths = tok.encode(video, torch.tensor([[16, 8, 2, 4]]))
    want = psnr_frames(tok.decode(tokens, lengths), video).mean().item()
    assert rep.per_clip[0]["psnr"] == pytest.approx(want, rel=1e-5)
    assert rep.per_clip[0]["assignment"] == [16, 8, 2, 4] and rep.per_clip[0]["tokens"] == 30
    # FVD = Fréchet distance of the saved statistics (ddof=1: videogpt variant)
    real, fake = FeatureStats.load(tmp_path / "real.safetensors"), FeatureStats.load(tmp_path / "recon.safetensors")
    assert real.count == fake.count == 2
    assert rep.fvd["fvd"] == pytest.approx(frechet_distance(real.mean(), real.cov(1), fake.mean(), fake.cov(1)))
    assert rep.fvd["n_real"] == rep.fvd["n_fake"] == 2
    # weights and provenance
    assert rep.models["tokenizer"]["sha256"] and rep.metric_weights["i3d"]["sha256"] == "random(seed=0)"
    assert rep.metric_weights["lpips"]["backbone_sha256"] == "random(seed=1)"
    assert any("random" in d for d in rep.deviations) and any("tests and CI" in d for d in rep.deviations)
    # JSON round trip + markdown
    paths = write_report(rep, tmp_path / "r.json")
    assert load_report(paths[0]).summary == pytest.approx(rep.summary)
    md = paths[1].read_text()
    assert "TEST ONLY" in md and "rFVD (videogpt)" in md and rep.models["tokenizer"]["sha256"] in md


def test_recon_refuses_a_protocol_of_another_geometry(tiny_tokenizer, video_dir):
    with pytest.raises(EvalError, match="16x128x128 clips but the tokenizer takes 8x32x32"):
        evaluate_reconstruction(tiny_tokenizer, [video_dir], protocol="ucf-rfvd", device="cpu")
    with pytest.raises(EvalError, match="not `eval recon`"):
        evaluate_reconstruction(tiny_tokenizer, [video_dir], protocol="ucf-c2v-10k", device="cpu")
    with pytest.raises(EvalError, match="needs --lpips-weights"):
        evaluate_reconstruction(tiny_tokenizer, [video_dir], metrics=["lpips"], device="cpu")


def test_num_clips_override_is_written_into_the_protocol(tiny_tokenizer, video_dir):
    rep = evaluate_reconstruction(tiny_tokenizer, [video_dir], protocol="tiny", clips="all", num_clips=3, device="cpu")
    assert rep.summary["clips"] == 3 and rep.protocol["num_clips"] == 3 and rep.protocol["sampling"] == "subset"
    assert rep.protocol["clips_per_video"] == "all"
    assert any("--num-clips 3" in d for d in rep.deviations) and any("--clips all" in d for d in rep.deviations)
    assert rep.metric_weights == {"i3d": None, "lpips": None} and "fvd" not in rep.summary


# -------------------------------------------------------------------------------- curve math
def test_equal_quality_tokens():
    uni = [(4, 20.0), (8, 22.0), (16, 24.0), (32, 25.0)]
    assert equal_quality_tokens(uni, 22.0, True) == pytest.approx(8)
    assert equal_quality_tokens(uni, 23.0, True) == pytest.approx(2**3.5)  # interpolated in log2(tokens)
    assert equal_quality_tokens(uni, 26.0, True) is None and equal_quality_tokens(uni, 19.0, True) is None
    lp = [(4, 0.4), (8, 0.3), (16, 0.2)]  # lower is better
    assert equal_quality_tokens(lp, 0.25, False) == pytest.approx(2**3.5)


# --------------------------------------------------------------------------- generation cache
@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = gpt_config("tiny", codebook_size=1024, levels=(1, 2, 4, 8, 16), blocks=4, num_classes=2)
    return GPT(cfg).save_pretrained(tmp_path_factory.mktemp("gpt") / "gpt", preset="tiny")


def test_gen_caches_real_statistics(tiny_gpt, tiny_tokenizer, video_dir, footage, tmp_path):
    kw = dict(protocol="tiny", i3d="random:0", num_samples=3, batch_size=2, cache_dir=tmp_path, device="cpu")
    first = evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir], **kw)
    assert first.data["real_stats_cache"]["hit"] is False and math.isfinite(first.summary["fvd"])
    assert first.summary["samples"] == 3 and [s["class"] for s in first.samples] == [0, 1, 0]
    assert first.settings["cfg_scale"] == 2.5 and any("--num-samples 3" in d for d in first.deviations)
    assert len(list(tmp_path.glob("real-*.safetensors"))) == 1 and len(list(tmp_path.glob("real-*.json"))) == 1
    again = evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir], **kw)
    assert again.data["real_stats_cache"]["hit"] is True
    assert again.summary["fvd"] == pytest.approx(first.summary["fvd"], rel=1e-9)  # same seed, same samples
    assert again.samples == first.samples
    other = evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir, footage["carphone"]], **kw)  # another listing
    assert other.data["real_stats_cache"]["hit"] is False and other.summary["real_clips"] == 3
    with pytest.raises(EvalError, match="16x128x128"):  # frame prediction runs, at the paper's geometry only
        evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir], **{**kw, "protocol": "k600-fp-50k"})


def test_gen_frame_prediction_continues_the_real_clips(tiny_gpt, tiny_tokenizer, video_dir, monkeypatch, tmp_path):
    """tiny-fp (k600-fp-50k at the tiny geometry): sample i continues real clip i mod n from its encoded first frames."""
    import evatok_cli.evaluation.gen as gen_mod

    seen = []
    real_generate = gen_mod.generate

    def spy(model, labels, **kw):
        seen.append((labels.tolist(), kw["prefix"], kw["cfg_scale"]))
        return real_generate(model, labels, **kw)

    monkeypatch.setattr(gen_mod, "generate", spy)
    kw = dict(protocol="tiny-fp", i3d="random:0", num_samples=3, batch_size=2, cache_dir=tmp_path, device="cpu")
    rep = evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir], **kw)
    assert rep.protocol["name"] == "tiny-fp" and rep.protocol["cond_frames"] == 3
    assert math.isfinite(rep.summary["fvd"]) and rep.summary["samples"] == 3 and rep.fvd["n_real"] == 2
    assert rep.settings["cfg_scale"] == 1.0  # PAPER §6: no CFG for K600
    assert rep.settings["prefix"] == {"blocks": 2, "assignment": [16, 4], "cond_frames": 3, "padded_to": 4,
                                      "tokens": 20, "labels": "null class"}  # fmt: skip
    assert [s["class"] for s in rep.samples] == [2, 2, 2]  # the null class of a 2-class GPT
    assert all(s["block_lengths"][:2] == [16, 4] for s in rep.samples)
    assert any("records no prefix training" in d for d in rep.deviations) and not rep.standard
    # the prefixes are the real clips' first 3 frames (the 4th repeating the 3rd), encoded with (16, 4, ...)
    tok = EVATokTokenizer.from_pretrained(tiny_tokenizer).eval()
    clips = [
        read_clips(r, get_protocol("tiny-fp").clip_spec(), policy="first")[0].frames
        for r in list_inputs([str(video_dir)])
    ]
    want = []
    for frames in clips:
        frames = frames.copy()
        frames[3:] = frames[2]
        tokens, _ = tok.encode(to_model_input(torch.from_numpy(frames)[None]), torch.tensor([[16, 4, 8, 8]]))
        want.append(tokens[0][:20])
    prefixes = [p for _, chunk, _ in seen for p in chunk]
    assert len(prefixes) == 3 and all(scale == 1.0 for *_, scale in seen)
    for i, (t, bl) in enumerate(prefixes):
        assert torch.equal(t, want[i % 2]) and bl.tolist() == [16, 4]
    again = evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir], **kw)
    assert again.samples == rep.samples and again.summary["fvd"] == pytest.approx(rep.summary["fvd"], rel=1e-9)
    with pytest.raises(EvalError, match="non-levels"):
        evaluate_generation(tiny_gpt, tiny_tokenizer, [video_dir], **kw, prefix_assignment_spec="3,3")


# ------------------------------------------------------------------------------ comparison
def _report(**over) -> EvalReport:
    base = dict(
        kind="recon",
        protocol=get_protocol("ucf-rfvd").to_dict(),
        standard=True,
        deviations=[],
        test_only=False,
        summary={"clips": 9537, "psnr": 25.0, "lpips": 0.12, "fvd": 13.0, "mean_tokens": 1024.0, "token_savings": 0.0},
        models={"tokenizer": {"path": "t", "sha256": "a" * 64, "preset": "paper"}, "router": None},
        metric_weights={
            "i3d": {"variant": "styleganv", "path": "i3d", "sha256": "b" * 64, "resolution": 224},
            "lpips": {"net": "vgg", "backbone_sha256": "c" * 64, "heads_sha256": "d" * 64},
        },
        data={},
        settings={},
        seed=0,
    )
    return EvalReport(**{**base, **over})


def test_compare_side_by_side_and_refusals():
    a = _report()
    b = _report(summary={**a.summary, "fvd": 13.0, "mean_tokens": 774.0, "token_savings": 0.244})
    table = compare_reports(a, b, names=("uniform", "router"))
    assert "| mean tokens | 1024.00 | 774.00 | -250.00 |" in table and "+24.4%" in table
    other = dataclasses.replace(get_protocol("ucf-rfvd"), num_clips=100, sampling="subset").to_dict()
    with pytest.raises(NotComparable, match="different protocols.*num_clips, sampling"):
        compare_reports(a, _report(protocol=other))
    with pytest.raises(NotComparable, match="different protocols"):
        compare_reports(a, _report(protocol=get_protocol("fvd2048-16f").to_dict()))
    i3d = {**a.metric_weights["i3d"], "sha256": "e" * 64}
    with pytest.raises(NotComparable, match="different I3D weights"):
        compare_reports(a, _report(metric_weights={**a.metric_weights, "i3d": i3d}))
    lp = {**a.metric_weights["lpips"], "heads_sha256": "f" * 64}
    with pytest.raises(NotComparable, match="different LPIPS weights"):
        compare_reports(a, _report(metric_weights={**a.metric_weights, "lpips": lp}))
    with pytest.raises(NotComparable, match="a recon report and a gen report"):
        compare_reports(a, _report(kind="gen"))
    assert "standard" in render_markdown(a) and "NON-STANDARD" not in render_markdown(a)
