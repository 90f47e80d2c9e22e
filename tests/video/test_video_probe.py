"""probe() on real footage and on containers that state no frame count."""

from __future__ import annotations

import pytest

from evatok_cli.video import VideoInfo, VideoRef, probe

REAL = {
    # name: (frames, fps, width, height, codec)
    "bigbuckbunny": (132, 25.0, 1280, 720, "h264"),
    "bikes": (250, 25.0, 640, 272, "h264"),
    "carphone": (120, 30000 / 1001, 176, 144, "h264"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_probe_real_footage(footage, name):
    frames, fps, width, height, codec = REAL[name]
    info = probe(footage[name])
    assert isinstance(info, VideoInfo)
    assert (info.frames, info.width, info.height, info.codec) == (frames, width, height, codec)
    assert info.fps == pytest.approx(fps, rel=1e-9)
    assert info.duration == pytest.approx(frames / fps)
    assert info.path == str(footage[name])
    d = info.to_dict()
    assert d["frames"] == frames and set(d) == {"path", "frames", "fps", "width", "height", "duration", "codec"}


def test_probe_accepts_ref_path_and_bytes(footage):
    p = footage["carphone"]
    by_path, by_ref, by_bytes = probe(str(p)), probe(VideoRef.from_path(p)), probe(p.read_bytes())
    assert by_path.frames == by_ref.frames == by_bytes.frames == 120
    assert by_bytes.path == "<bytes>"


@pytest.mark.parametrize(
    ("suffix", "codec", "expected_codec"), [(".mkv", "libx264", "h264"), (".webm", "libvpx-vp9", "vp9")]
)
def test_probe_counts_packets_when_container_states_no_count(make_video, suffix, codec, expected_codec):
    # Matroska/WebM do not store a frame count: probe demuxes and counts packets instead.
    path = make_video(f"counted{suffix}", 37, fps=30, codec=codec)
    import av

    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # the container really states nothing
    info = probe(path)
    assert (info.frames, info.codec, info.width, info.height) == (37, expected_codec, 64, 48)
    assert info.fps == pytest.approx(30.0)
