"""Clip cutting: policies, fps resampling, resize + center crop, seeking, sources."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evatok_cli.video import (
    ClipReader,
    ClipSpec,
    VideoRef,
    clip_starts,
    iter_clips,
    parse_clip_policy,
    read_clips,
    resampled_length,
    source_indices,
)

SPEC = ClipSpec()  # 16 x 128 x 128, native fps
N_ALL = {"bigbuckbunny": 8, "bikes": 15, "carphone": 7}  # floor(frames / 16)


@pytest.mark.parametrize("name", sorted(N_ALL))
def test_all_policy_on_real_footage(footage, name):
    clips = read_clips(footage[name], SPEC, "all")
    assert [c.start for c in clips] == [16 * k for k in range(N_ALL[name])]
    for c in clips:
        assert c.frames.shape == (16, 128, 128, 3) and c.frames.dtype == np.uint8
        assert c.frames.std() > 10  # real picture content, not a constant
        assert c.source == str(footage[name])
    assert not np.array_equal(clips[0].frames, clips[1].frames)
    assert np.abs(np.diff(clips[0].frames.astype(np.int16), axis=0)).mean() > 0.5  # frames move


def test_first_policy_decodes_only_one_clip(footage):
    with ClipReader(footage["bikes"], SPEC) as reader:
        (start,) = reader.starts("first")
        clip = reader.read(start)
        assert reader.decoded == 16  # of 250 frames
    assert start == 0
    assert np.array_equal(clip.frames, read_clips(footage["bikes"], SPEC, "all")[0].frames)


def test_evenly_spaced_policy(footage):
    p = footage["bikes"]  # 250 frames: last start 234
    assert [c.start for c in read_clips(p, SPEC, 3)] == [0, 117, 234]
    assert [c.start for c in read_clips(p, SPEC, 1)] == [0]
    many = [c.start for c in read_clips(p, ClipSpec(frames=16, height=16, width=16), 100)]
    assert len(many) == 15 and many[-1] == 234  # capped at 250 // 16, spread over the whole video
    assert min(b - a for a, b in zip(many, many[1:])) >= 16  # never overlapping
    with ClipReader(p, SPEC) as reader:
        assert np.array_equal(read_clips(p, SPEC, 3)[1].frames, reader.read(117).frames)


def test_random_policy_is_seeded(footage):
    p = footage["bikes"]
    a, b = read_clips(p, SPEC, "random", seed=7), read_clips(p, SPEC, "random", seed=7)
    assert len(a) == 1 and a[0].start == b[0].start and np.array_equal(a[0].frames, b[0].frames)
    starts = {read_clips(p, ClipSpec(frames=16, height=16, width=16), "random", seed=s)[0].start for s in range(6)}
    assert len(starts) >= 4 and all(0 <= s <= 234 for s in starts)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert read_clips(p, SPEC, "random", seed=g1)[0].start == read_clips(p, SPEC, "random", seed=g2)[0].start


def test_fps_halving_on_real_footage(footage):
    p = footage["bikes"]  # 25 fps, 250 frames
    half = ClipSpec(fps=12.5)
    with ClipReader(p, half) as reader:
        assert reader.num_frames == 125
    clips = read_clips(p, half, "all")
    assert [c.start for c in clips] == [16 * k for k in range(7)]  # 125 // 16 clips
    native = np.concatenate([c.frames for c in read_clips(p, SPEC, "all")])  # source frames 0..239
    # resampled frame j is source frame 2j: clip at 16 holds source frames 32, 34, ..., 62
    assert np.array_equal(clips[1].frames, native[32:64:2])


@pytest.mark.parametrize(("native", "target", "n"), [(10.0, 25.0, 30), (30.0, 12.0, 60), (30000 / 1001, 15.0, 45)])
def test_fps_resampling_picks_nearest_frame(make_video, read_index, native, target, n):
    p = make_video(f"idx{native:.0f}.mp4", n, fps=native)
    spec = ClipSpec(frames=8, height=32, width=32, fps=target)
    m = resampled_length(n, native, target)
    assert m == math.ceil((n - 0.5) * target / native)
    clips = read_clips(p, spec, "all")
    assert [c.start for c in clips] == list(range(0, m - 7, 8))
    for c in clips:
        got = [read_index(f) for f in c.frames]
        want = [math.floor(j * native / target + 0.5) for j in range(c.start, c.start + 8)]
        assert got == want == source_indices(c.start, 8, native, target)
        assert max(want) < n


def test_clip_geometry_cover_and_center(make_gradient):
    p = make_gradient(width=320, height=240)  # R = x ramp, G = y ramp
    (c,) = read_clips(p, ClipSpec(frames=4, height=128, width=128), "first")
    assert c.frames.shape == (4, 128, 128, 3)
    # 240 -> 128 rows (scale 0.5333): 320 -> 171 columns, crop 21 columns each side.
    r = c.frames[0, :, :, 0].astype(float).mean(axis=0)
    g = c.frames[0, :, :, 1].astype(float).mean(axis=1)
    assert r[0] == pytest.approx(255 * 21.5 / 171, abs=4) and r[-1] == pytest.approx(255 * 149.5 / 171, abs=4)
    assert g[0] == pytest.approx(0, abs=4) and g[-1] == pytest.approx(255, abs=4)  # full height kept
    (w,) = read_clips(p, ClipSpec(frames=4, height=64, width=128), "first")  # wide target: crop rows
    assert w.frames.shape == (4, 64, 128, 3)
    rw = w.frames[0, :, :, 0].astype(float).mean(axis=0)
    gw = w.frames[0, :, :, 1].astype(float).mean(axis=1)
    assert rw[0] == pytest.approx(0, abs=4) and rw[-1] == pytest.approx(255, abs=4)  # full width kept
    assert gw[0] == pytest.approx(255 * 16.5 / 96, abs=4)  # 320x240 -> 128x96, 16 rows cut each side


def test_upscaling_small_video(footage):
    (c,) = read_clips(footage["carphone"], ClipSpec(frames=16, height=160, width=192), "first")
    assert c.frames.shape == (16, 160, 192, 3) and c.frames.std() > 10


def test_seek_gives_the_same_frames(footage, make_video, read_index):
    p = footage["bikes"]  # keyframes at 0, 30, 76, 137, 187, 242
    for start in (60, 150, 200, 234):
        with ClipReader(p, SPEC, seek=True) as fast, ClipReader(p, SPEC, seek=False) as slow:
            assert np.array_equal(fast.read(start).frames, slow.read(start).frames)
            assert fast.decoded < slow.decoded
    q = make_video("gop.mkv", 200, keyint=10)  # B-frames, short GOP, no stated frame count
    spec = ClipSpec(frames=8, height=16, width=16, fps=20.0)
    with ClipReader(q, spec) as reader:
        for start in (0, 70, 130, 152):  # forward jumps, each far enough to seek
            got = [read_index(f) for f in reader.read(start).frames]
            assert got == source_indices(start, 8, 25.0, 20.0)
        assert reader.decoded < 200


def test_reader_can_go_back_and_repeat(footage):
    with ClipReader(footage["carphone"], SPEC) as reader:
        late, early, again = reader.read(100).frames, reader.read(8).frames, reader.read(8).frames
    assert np.array_equal(early, again)
    clips = {c.start: c.frames for c in read_clips(footage["carphone"], SPEC, 20)}
    assert np.array_equal(late, ClipReader(footage["carphone"], SPEC).read(100).frames)
    assert 0 in clips


def test_path_ref_and_bytes_give_the_same_clip(footage):
    p = footage["carphone"]
    a = read_clips(p, SPEC)[0].frames
    b = read_clips(VideoRef.from_path(p), SPEC)[0].frames
    c = read_clips(p.read_bytes(), SPEC)[0]
    assert np.array_equal(a, b) and np.array_equal(a, c.frames) and c.source == "<bytes>"


def test_iter_clips_is_lazy(footage):
    it = iter_clips(footage["bikes"], SPEC, "all")
    first = next(it)
    assert first.start == 0
    assert [c.start for c in it] == [16 * k for k in range(1, 15)]


def test_clip_spec_validation():
    assert ClipSpec(fps="12.5").fps == 12.5 and ClipSpec(fps=" Native ").fps == "native"
    assert ClipSpec().to_dict() == {"frames": 16, "height": 128, "width": 128, "fps": "native"}
    for bad in (
        {"frames": 0},
        {"height": -1},
        {"width": 1.5},
        {"frames": True},
        {"fps": "fast"},
        {"fps": 0},
        {"fps": float("nan")},
    ):
        with pytest.raises(ValueError):
            ClipSpec(**bad)
    with pytest.raises(TypeError):
        ClipSpec(16)  # kw_only


def test_parse_clip_policy():
    assert [parse_clip_policy(s) for s in ("all", "FIRST", " random ", "4", 2)] == ["all", "first", "random", 4, 2]
    for bad in ("0", "-3", "some", "1.5", ""):
        with pytest.raises(ValueError):
            parse_clip_policy(bad)


def test_clip_starts_properties():
    rng = np.random.default_rng(0)
    for n in range(0, 80):
        for f in (1, 4, 16):
            if n < f:
                assert all(clip_starts(n, f, p, rng) == [] for p in ("all", "first", "random", 3))
                continue
            for pol in (1, 2, 3, 5, 50):
                s = clip_starts(n, f, pol)
                assert len(s) == min(pol, n // f) and s[0] == 0
                assert all(b - a >= f for a, b in zip(s, s[1:])) and s[-1] + f <= n
                if len(s) > 1:
                    assert s[-1] == n - f  # spans the whole video
            assert clip_starts(n, f, "all") == list(range(0, n - f + 1, f))
