"""Real files' frame counts: containers that state more frames than decode (issue 15).

Files are made with PyAV: a faststart mp4 (index first) whose data is cut off at a packet, so the
container still states every frame but the last ones (or the second half) never decode."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from cut_files import cut_at_packet, faststart_mp4

from evatok_cli.video import ClipSpec, VideoError, clip_key, probe, read_clips
from evatok_cli.video.clips import ClipReader
from evatok_cli.video.dataset import ClipIndexDataset, collate_clips

SPEC = ClipSpec(frames=8, height=32, width=32)


def decoded(path: Path) -> int:
    n = 0
    try:
        with av.open(str(path)) as c:
            for _ in c.decode(video=0):
                n += 1
    except av.error.FFmpegError:
        pass
    return n


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("counts")
    full = faststart_mp4(d / "full.mp4", 24)
    return {
        "full": full,
        "one_short": cut_at_packet(full, d / "one_short.mp4", 23),  # states 24, decodes 23
        "half": cut_at_packet(faststart_mp4(d / "long.mp4", 48), d / "half.mp4", 26),  # states 48, decodes 26
        "tiny": cut_at_packet(full, d / "tiny.mp4", 6),  # states 24, decodes 6 < one clip
    }


def test_the_files_state_more_than_decodes(files):
    assert (probe(files["one_short"]).frames, decoded(files["one_short"])) == (24, 23)
    assert (probe(files["half"]).frames, decoded(files["half"])) == (48, 26)


def test_a_clip_past_the_real_end_moves_back_to_end_on_the_last_frame(files):
    clips = read_clips(files["one_short"], SPEC, "all")  # planned 0, 8, 16; frame 23 never decodes
    assert [c.start for c in clips] == [0, 8, 15]
    with ClipReader(files["full"], SPEC) as full:
        assert np.array_equal(clips[2].frames, full.read(15).frames)  # frames 15..22, bit-exact
    ds = ClipIndexDataset([files["one_short"]], SPEC, "all")
    items = [ds[i] for i in range(len(ds))]
    batch, failures = collate_clips(items)
    assert failures == []  # never reported as corruption
    src = str(files["one_short"])
    assert batch["key"] == [clip_key(src, s) for s in (0, 8, 16)]  # keys stay those of the plan (resume)
    assert batch["clip_start"].tolist() == [0, 8, 15]  # clip_start says where the clip really starts


def test_a_file_that_stops_halfway_keeps_every_clip_that_decodes(files):
    ds = ClipIndexDataset([files["half"]], SPEC, "all")  # planned 0, 8, ..., 40; 26 frames decode
    batch, failures = collate_clips([ds[i] for i in range(len(ds))])
    assert batch["clip_start"].tolist() == [0, 8, 16, 18]  # 24..31 straddles the end: moved to 18..25
    assert [f["clip_start"] for f in failures] == [32, 40]
    for f in failures:
        assert "truncated or corrupt: the stream ends after 26 frames though the container states 48" in f["error"]
    assert "the clip at 32 (frames 32-39) is lost" in failures[0]["error"]


def test_shorter_than_one_clip_is_too_short_not_corrupt(files):
    with pytest.raises(VideoError, match=r"too short: 6 frames decode \(the container states 24\), a clip needs 8"):
        read_clips(files["tiny"], SPEC, "first")
