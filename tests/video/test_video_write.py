"""write_mp4 / encode_mp4: round trips through the reader, odd sizes, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from evatok_cli.video import ClipReader, ClipSpec, encode_mp4, probe, read_clips, write_mp4


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", ["bigbuckbunny", "bikes", "carphone"])
def test_round_trip_psnr_on_real_clips(footage, tmp_path, name):
    clips = read_clips(footage[name], ClipSpec(), 2)
    frames = np.concatenate([c.frames for c in clips])  # 32 frames of two distant clips
    out = write_mp4(tmp_path / f"{name}.mp4", frames, fps=25)
    info = probe(out)
    assert (info.frames, info.width, info.height, info.codec, info.fps) == (32, 128, 128, "h264", 25.0)
    back = np.concatenate([c.frames for c in read_clips(out, ClipSpec(), "all")])
    assert back.shape == frames.shape
    assert psnr(frames, back) > 30
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.mp4"]  # no temporary left behind


def test_odd_size_is_padded_to_even(footage, tmp_path):
    src = read_clips(footage["bikes"], ClipSpec(frames=16, height=61, width=97), "first")[0].frames
    out = write_mp4(tmp_path / "odd.mp4", src, fps=25)
    info = probe(out)
    assert (info.width, info.height, info.frames) == (98, 62, 16)
    with ClipReader(out, ClipSpec(frames=16, height=62, width=98)) as r:  # same size: no rescale
        back = r.read(0).frames
    assert psnr(src, back[:, :61, :97]) > 30
    assert psnr(back[:, 60], back[:, 61]) > 30  # the padding row repeats the last row


def test_encode_mp4_bytes_and_ntsc_rate(footage):
    frames = read_clips(footage["carphone"], ClipSpec(frames=16, height=64, width=64))[0].frames
    data = encode_mp4(frames, fps=30000 / 1001)
    assert data[4:8] == b"ftyp"
    info = probe(data)
    assert info.frames == 16 and info.fps == pytest.approx(30000 / 1001, rel=1e-9)
    assert psnr(frames, read_clips(data, ClipSpec(frames=16, height=64, width=64))[0].frames) > 30


def test_bad_frames_are_rejected_and_leave_nothing(tmp_path):
    for bad in (np.zeros((4, 8, 8), np.uint8), np.zeros((4, 8, 8, 3), np.float32), np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError):
            write_mp4(tmp_path / "x.mp4", bad)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path):
    p = tmp_path / "v.mp4"
    a = np.full((4, 16, 16, 3), 40, np.uint8)
    write_mp4(p, a)
    write_mp4(p, np.concatenate([a, a]))
    assert probe(p).frames == 8 and [q.name for q in tmp_path.iterdir()] == ["v.mp4"]
