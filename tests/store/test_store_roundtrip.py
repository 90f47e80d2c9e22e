"""Round trips of both store formats, and reading them back with plain zarr / plain webdataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from store_job import EXTRA, SPACE, make_attrs, make_sample

from evatok_cli.store import Sample, StoreError, is_store, open_store, open_writer

FORMATS = ["zarr", "wds"]


def write(path, samples, fmt, attrs=None, extra=EXTRA, failures=(), **kw):
    kw.setdefault("commit_every", 7)
    kw.setdefault("samples_per_shard", 9)
    with open_writer(path, format=fmt, attrs=attrs or make_attrs(), num_blocks=4, extra_fields=extra, **kw) as w:
        for j in range(0, len(samples), 5):
            w.append(samples[j : j + 5])
        for src, why in failures:
            w.add_failure(src, why)
    return w


def assert_same(a: Sample, b: Sample, extra=True):
    assert a.key == b.key
    assert a.tokens.dtype in (np.uint16, np.uint32)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(np.asarray(a.block_lengths), np.asarray(b.block_lengths))
    assert (a.assignment, a.source, a.clip_start, a.label) == (b.assignment, b.source, b.clip_start, b.label)
    if extra:
        assert set(a.extra) == set(b.extra)
        for k in a.extra:
            got, want = np.asarray(a.extra[k]), np.asarray(b.extra[k], dtype=np.float32)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ragged_round_trip(tmp_path, fmt):
    samples = [make_sample(i, seed=1) for i in range(41)]
    path = tmp_path / f"s.{fmt}"
    attrs = make_attrs(labels={"0": "ApplyEyeMakeup", "1": "Archery"}, kind="encode")
    w = write(path, samples, fmt, attrs=attrs, failures=[("bad.mp4", "no video\nstream"), ("x.mp4", "too short")])
    assert w.finished and is_store(path)

    r = open_store(path)
    assert r.format == fmt and len(r) == 41
    assert r.attrs == {"evatok_format": 1, **attrs}
    assert r.keys == [s.key for s in samples]
    assert r.failures == [("bad.mp4", "no video stream"), ("x.mp4", "too short")]
    for got, want in zip(r, samples, strict=True):
        assert_same(got, want)
    for i in (0, 17, 40, -1):
        assert_same(r[i], samples[i])
    assert_same(r.get(samples[23].key), samples[23])
    with pytest.raises(IndexError):
        r[41]
    with pytest.raises(KeyError):
        r.get("nope")

    blocks = r.block_tokens(5)
    assert [len(b) for b in blocks] == list(samples[5].block_lengths)
    np.testing.assert_array_equal(np.concatenate(blocks), samples[5].tokens)

    np.testing.assert_array_equal(r.assignments(), [s.assignment for s in samples])
    np.testing.assert_array_equal(r.lengths(), [len(s.tokens) for s in samples])
    st = r.stats()
    json.dumps(st)  # `evatok info --json` prints it
    assert st["samples"] == 41 and st["total_tokens"] == sum(len(s.tokens) for s in samples)
    assert st["min_tokens"] == min(len(s.tokens) for s in samples) and st["failures"] == 2
    np.testing.assert_allclose(st["mean_tokens_per_block"], np.mean([s.block_lengths for s in samples], axis=0))
    top = st["top_assignments"]
    counts = np.bincount([s.assignment for s in samples])
    assert top[0][1] == counts.max() and len(top) == 10
    assert SPACE.to_index(top[0][0]) == int(np.argmax(counts))
    assert st["metadata"]["kind"] == "encode"


@pytest.mark.parametrize("fmt", FORMATS)
def test_uint32_tokens_for_large_codebooks(tmp_path, fmt):
    samples = [make_sample(i, codebook_size=70000, extra=False) for i in range(6)]
    assert max(int(s.tokens.max()) for s in samples) > 65535
    write(tmp_path / "s", samples, fmt, attrs=make_attrs(70000), extra=None)
    r = open_store(tmp_path / "s")
    assert r[0].tokens.dtype == np.uint32
    for got, want in zip(r, samples, strict=True):
        assert_same(got, want, extra=False)


def test_uint16_tokens_by_default(tmp_path):
    write(tmp_path / "s", [make_sample(0)], "zarr")
    assert open_store(tmp_path / "s")[0].tokens.dtype == np.uint16
    assert zarr.open_group(str(tmp_path / "s"), mode="r")["part-00000/tokens"].dtype == np.uint16


def test_plain_zarr_reads_the_same(tmp_path):
    samples = [make_sample(i) for i in range(30)]
    write(tmp_path / "s.zarr", samples, "zarr")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g.attrs["evatok_format"] == 1 and g.attrs["space"] == SPACE.to_dict()
    got = []
    for part in g.attrs["index"]["parts"]:
        p = g[part["name"]]
        tokens, offsets = p["tokens"][:], p["offsets"][:]
        assert offsets[-1] == part["tokens"] == tokens.size and len(offsets) == part["samples"] + 1
        cols = {c: p[c][:] for c in ("key", "block_lengths", "assignment", "source", "clip_start", "label")}
        extra = {k: p[f"extra/{k}"][:] for k in EXTRA}
        for i in range(part["samples"]):
            got.append(
                Sample(
                    key=str(cols["key"][i]),
                    tokens=tokens[offsets[i] : offsets[i + 1]],
                    block_lengths=cols["block_lengths"][i],
                    assignment=int(cols["assignment"][i]),
                    source=str(cols["source"][i]),
                    clip_start=int(cols["clip_start"][i]),
                    label=int(cols["label"][i]),
                    extra={k: v[i] for k, v in extra.items()},
                )
            )
    assert len(got) == 30
    for a, b in zip(got, samples, strict=True):
        assert_same(a, b)


def test_plain_webdataset_reads_the_same(tmp_path):
    import webdataset as wds

    samples = [make_sample(i) for i in range(30)]
    samples[3].video = b"\x00\x00\x00\x18ftypmp42 fake mp4 bytes"
    write(tmp_path / "s", samples, "wds")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    urls = [str(tmp_path / "s" / sh["name"]) for sh in index["shards"]]
    assert sum(sh["samples"] for sh in index["shards"]) == 30
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples, strict=True):
        meta = g["json"]
        assert g["tokens.npy"].dtype == np.uint16
        assert_same(
            Sample(
                g["__key__"],
                g["tokens.npy"],
                meta["block_lengths"],
                meta["assignment"],
                meta["source"],
                meta["clip_start"],
                meta["label"],
                {k: np.asarray(v, np.float32) for k, v in meta["extra"].items()},
            ),
            s,
        )
    assert got[3]["mp4"] == samples[3].video and "mp4" not in got[4]
    assert open_store(tmp_path / "s")[3].video == samples[3].video


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_store(tmp_path, fmt):
    write(tmp_path / "s", [], fmt, failures=[("a.mp4", "unreadable")])
    r = open_store(tmp_path / "s")
    assert len(r) == 0 and list(r) == [] and r.failures == [("a.mp4", "unreadable")]
    assert r.stats()["samples"] == 0 and r.stats()["top_assignments"] == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_invalid_samples_are_refused(tmp_path, fmt):
    good = make_sample(0)
    with open_writer(tmp_path / "s", format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA) as w:
        cases = {
            "invalid sample key": dict(key="a.b"),
            "no dots": dict(key="a/b"),
            "tokens but block_lengths": dict(tokens=good.tokens[:-1]),
            "!= assignment": dict(assignment=(good.assignment + 1) % len(SPACE)),
            "token ids must be in": dict(tokens=good.tokens + 2000),
            "extra fields": dict(extra={"metric": good.extra["metric"]}),
            "has shape": dict(extra={**good.extra, "metric": np.zeros(5)}),
        }
        for msg, change in cases.items():
            bad = Sample(**{**good.__dict__, **change})
            with pytest.raises(ValueError, match=msg):
                w.append([bad])
        w.append([good])
        with pytest.raises(StoreError, match="already appended"):
            w.append([make_sample(0)])
        with pytest.raises(StoreError, match="already appended"):
            w.append([make_sample(5), make_sample(5)])
        w.append([make_sample(5)])  # the refused batch left no trace
        if fmt == "zarr":
            with pytest.raises(ValueError, match="do not hold video"):
                w.append([Sample(**{**make_sample(1).__dict__, "video": b"mp4"})])
    assert open_store(tmp_path / "s").keys == [good.key, make_sample(5).key]


def test_bad_attrs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="codebook_size"):
        open_writer(tmp_path / "a", attrs={"space": SPACE.to_dict()}, num_blocks=4)
    with pytest.raises(ValueError, match="blocks"):
        open_writer(tmp_path / "a", attrs=make_attrs(), num_blocks=3)
    with pytest.raises(ValueError, match="reserved"):
        open_writer(tmp_path / "a", attrs=make_attrs(index=1), num_blocks=4)
    with pytest.raises(ValueError, match="JSON"):
        open_writer(tmp_path / "a", attrs=make_attrs(x=object()), num_blocks=4)
    with pytest.raises(ValueError, match="extra field"):
        open_writer(tmp_path / "a", attrs=make_attrs(), num_blocks=4, extra_fields={"a-b": ("float32", ())})
