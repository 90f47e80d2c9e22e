"""list_inputs (files, directories, stdin, WebDataset tars) and clip_key."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from evatok_cli.video import (
    ClipSpec,
    VideoError,
    VideoRef,
    clip_key,
    list_inputs,
    probe,
    read_clips,
    ref_from_source,
)


def _touch(root, *names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_directory_recursion_filter_and_order(tmp_path):
    _touch(
        tmp_path,
        "b/z.mp4",
        "b/a.MKV",
        "a.webm",
        "a/c/d.avi",
        "a/b.mov",
        "notes.txt",
        "b/y.mp3",
        ".hidden.mp4",
        "b/._a.mp4",
        ".cache/e.mp4",
    )
    refs = list_inputs([tmp_path])
    rel = [os.path.relpath(r.source, tmp_path) for r in refs]
    assert rel == ["a/b.mov", "a/c/d.avi", "a.webm", "b/a.MKV", "b/z.mp4"]  # sorted by path parts
    assert [r.label_hint for r in refs] == ["a", "c", tmp_path.name, "b", "b"]
    assert all(r.member is None for r in refs)
    only_mp4 = list_inputs([tmp_path], extensions=("mp4",))
    assert [os.path.relpath(r.source, tmp_path) for r in only_mp4] == ["b/z.mp4"]


def test_files_dedup_and_missing(tmp_path):
    _touch(tmp_path, "v/a.mp4", "v/clip.bin")
    refs = list_inputs([tmp_path / "v/clip.bin", tmp_path / "v", str(tmp_path / "v" / "." / "a.mp4")])
    assert [r.source for r in refs] == [str(tmp_path / "v/clip.bin"), str(tmp_path / "v/a.mp4")]
    with pytest.raises(VideoError) as e:
        list_inputs([tmp_path / "v", tmp_path / "gone.mp4"])
    assert e.value.path == str(tmp_path / "gone.mp4") and e.value.reason == "not found"


def test_stdin_list(tmp_path):
    _touch(tmp_path, "x/1.mp4", "x/2.mp4", "y/3.mp4")
    stdin = io.StringIO(f"{tmp_path}/y/3.mp4\n\n   \n{tmp_path}/x\n")
    refs = list_inputs(["-"], stdin=stdin)
    assert [os.path.relpath(r.source, tmp_path) for r in refs] == ["y/3.mp4", "x/1.mp4", "x/2.mp4"]


def _shard(path, footage) -> None:
    """A WebDataset shard: 2 samples with .mp4 (+ .cls / .json members around them)."""
    members = {
        "s000.mp4": footage["carphone"].read_bytes(),
        "s000.cls": b"7\n",
        "s000.json": b'{"caption": "a man on the phone"}',
        "s001.mp4": footage["bikes"].read_bytes(),
        "s001.cls": b"3",
    }
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tar_members(footage, tmp_path):
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir()
    _shard(shard, footage)
    refs = list_inputs([shard])
    assert [r.source for r in refs] == [f"{shard}::s000.mp4", f"{shard}::s001.mp4"]
    assert [r.label_hint for r in refs] == ["7", "3"]
    assert [probe(r).frames for r in refs] == [120, 250]
    clip = read_clips(refs[1], ClipSpec(), "first")[0]
    direct = read_clips(footage["bikes"], ClipSpec(), "first")[0]
    assert clip.source == refs[1].source and np.array_equal(clip.frames, direct.frames)
    assert list_inputs([tmp_path / "shards"]) == refs  # tars found in directories are expanded
    assert ref_from_source(refs[0].source) == refs[0]
    assert probe(refs[0].source).frames == 120  # a TAR::MEMBER string works as a source
    with pytest.raises(VideoError, match="no member"):
        probe(f"{shard}::s999.mp4")


def test_bad_tar(tmp_path):
    p = tmp_path / "broken.tar"
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 100)  # gzip magic: not an uncompressed tar
    with pytest.raises(VideoError) as e:
        list_inputs([p])
    assert e.value.path == str(p) and "tar" in e.value.reason


def test_clip_key_format():
    sources = ["data/a/v_Run.g01.mp4", "data/b/v_Run.g01.mp4", "shard-000001.tar::v_Run.g01.mp4", "weird name (1).webm"]
    keys = [clip_key(s, 16) for s in sources]
    assert len(set(keys)) == len(keys)  # same stem, different sources
    for k in keys:
        assert "." not in k and "/" not in k and " " not in k
        assert k.endswith("_000016")
    assert keys[0].startswith("v_Run_g01_") and keys[3].startswith("weird_name_1_")
    assert clip_key(sources[0], 16) == keys[0]  # stable
    assert clip_key(sources[0], 0) != keys[0]
    assert clip_key("x.mp4", 1234567).endswith("_1234567")
    with pytest.raises(ValueError):
        clip_key("x.mp4", -1)


def test_video_ref_open(footage, tmp_path):
    ref = VideoRef.from_path(footage["bikes"])
    assert ref.open() == str(footage["bikes"]) and ref.source == str(footage["bikes"])
    shard = tmp_path / "s.tar"
    _shard(shard, footage)
    member = list_inputs([shard])[0]
    assert member.open().getvalue() == footage["carphone"].read_bytes()
    shard.write_bytes(shard.read_bytes()[:3000])  # the tar now ends inside the member
    with pytest.raises(VideoError, match="tar ends inside the member"):
        probe(member)


def test_source_strings_are_normalized_everywhere(footage):
    from evatok_cli.video import ClipIndexDataset, probe

    p = footage["carphone"]
    messy = f"{p.parent}/./../data/{p.name}"
    assert probe(messy).path == str(p)
    assert read_clips(messy, ClipSpec(frames=4, height=8, width=8))[0].source == str(p)
    ds = ClipIndexDataset([messy], ClipSpec(frames=4, height=8, width=8), "first")
    assert ds[0]["source"] == str(p) and ds[0]["key"] == clip_key(str(p), 0)
