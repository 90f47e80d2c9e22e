"""Every broken input is a VideoError with a reason that says what is wrong."""

from __future__ import annotations

import pickle
from fractions import Fraction

import av
import numpy as np
import pytest

from evatok_cli.video import ClipReader, ClipSpec, VideoError, probe, read_clips, write_mp4

SPEC = ClipSpec(frames=16, height=32, width=32)


def _reason(fn, *args, **kw) -> VideoError:
    with pytest.raises(VideoError) as e:
        fn(*args, **kw)
    return e.value


def _all_entry_points_fail(path, needle: str) -> None:
    """probe, read_clips and ClipReader all raise VideoError(path, reason containing needle)."""
    for fn in (probe, lambda p: read_clips(p, SPEC, "all"), lambda p: ClipReader(p, SPEC)):
        err = _reason(fn, path)
        assert err.path == str(path)
        assert needle in err.reason, err.reason
        assert str(err) == f"{path}: {err.reason}"


def test_video_error_format_and_pickle():
    e = VideoError("a/b.mp4", "not found")
    assert str(e) == "a/b.mp4: not found" and (e.path, e.reason) == ("a/b.mp4", "not found")
    back = pickle.loads(pickle.dumps(e))
    assert (back.path, back.reason, str(back)) == (e.path, e.reason, str(e))


def test_missing_file(tmp_path):
    _all_entry_points_fail(tmp_path / "nope.mp4", "not found")


def test_directory(tmp_path):
    (tmp_path / "d.mp4").mkdir()
    _all_entry_points_fail(tmp_path / "d.mp4", "is a directory")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "zero.mp4"
    p.write_bytes(b"")
    _all_entry_points_fail(p, "empty file (0 bytes)")
    assert "empty file" in _reason(probe, b"").reason


def test_text_file_named_mp4(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_text("these are not the frames you are looking for\n" * 20)
    _all_entry_points_fail(p, "not a video file")


@pytest.mark.parametrize("cut", ["half", "1KB"])
def test_truncated_mp4_index_at_end(footage, tmp_path, cut):
    data = footage["bikes"].read_bytes()  # ffmpeg default layout: 'moov' index after the data
    p = tmp_path / f"cut-{cut}.mp4"
    p.write_bytes(data[: len(data) // 2] if cut == "half" else data[:1024])
    _all_entry_points_fail(p, "corrupt or truncated MP4/MOV file")


def test_truncated_mp4_index_first(footage, tmp_path):
    # A faststart file cut short opens fine (its index is intact) but its data ends early: clips
    # before the cut decode, the first clip that needs a missing frame fails with "truncated".
    frames = np.concatenate([c.frames for c in read_clips(footage["bikes"], ClipSpec(height=64, width=64), "all")])
    full = write_mp4(tmp_path / "full.mp4", frames, fps=25).read_bytes()
    p = tmp_path / "cut.mp4"
    p.write_bytes(full[: len(full) // 2])
    assert probe(p).frames == 240  # the index still states every frame
    with ClipReader(p, ClipSpec(height=64, width=64)) as reader:
        assert reader.read(0).frames.shape == (16, 64, 64, 3)
        err = _reason(reader.read, 224)
    assert "truncated or corrupt" in err.reason and "states 240" in err.reason
    assert "truncated" in _reason(read_clips, p, SPEC, "all").reason


def test_too_short_for_one_clip(make_video):
    p = make_video("three.mp4", 3)
    assert probe(p).frames == 3
    err = _reason(read_clips, p, SPEC, "first")
    assert err.reason == "too short: 3 frames, a clip needs 16"
    p20 = make_video("twenty.mp4", 20, fps=25)
    err = _reason(read_clips, p20, ClipSpec(frames=16, height=32, width=32, fps=12.5))
    assert err.reason == "too short: 20 frames (10 after resampling to 12.5 fps), a clip needs 16"


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "aac"), (".mka", "mp2")])
def test_audio_only(tmp_path, suffix, codec):
    p = tmp_path / f"audio{suffix}"
    with av.open(str(p), mode="w") as c:
        s = c.add_stream(codec, rate=16000)
        s.layout = "mono"
        for i in range(8):
            f = av.AudioFrame.from_ndarray(
                np.zeros((1, 1152), np.float32 if codec == "aac" else np.int16),
                format="fltp" if codec == "aac" else "s16",
                layout="mono",
            )
            f.sample_rate, f.pts, f.time_base = 16000, i * 1152, Fraction(1, 16000)
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    _all_entry_points_fail(p, "no video stream (found: 1 audio)")


def test_video_stream_without_frames(tmp_path):
    p = tmp_path / "empty.avi"
    with av.open(str(p), mode="w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
    _all_entry_points_fail(p, "no frames")


def test_no_bare_exceptions_from_bytes():
    for junk in (b"\x00" * 5000, b"RIFF\x00\x00\x00\x00AVI LIST" + b"\x01" * 100, b"\x1a\x45\xdf\xa3" + b"\x00" * 64):
        err = _reason(probe, junk)
        assert err.path == "<bytes>" and err.reason
