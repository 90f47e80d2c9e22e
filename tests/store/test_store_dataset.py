"""torch datasets over stores, with real DataLoader worker processes."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from store_job import EXTRA, make_attrs, make_sample
from torch.utils.data import DataLoader

from evatok_cli.store import open_store, open_writer
from evatok_cli.store.dataset import TokenDataset, TokenIterableDataset, collate_ragged

N = 70


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    samples = [make_sample(i, seed=3) for i in range(N)]
    for fmt in ("zarr", "wds"):
        with open_writer(
            root / fmt, format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA, samples_per_shard=9
        ) as w:
            w.append(samples)
    return root, {s.key: s for s in samples}


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_map_dataset_with_two_workers(stores, fmt):
    root, by_key = stores
    pad = -7
    loader = DataLoader(
        TokenDataset(root / fmt),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        collate_fn=functools.partial(collate_ragged, pad_id=pad),
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for b in loader:
        B, L = b["tokens"].shape
        assert b["tokens"].dtype == torch.int64 and L == int(b["lengths"].max())
        assert b["block_lengths"].shape == (B, 4) and b["extra"]["metric"].shape == (B, 6)
        for i, key in enumerate(b["key"]):
            want = by_key[key]
            n = int(b["lengths"][i])
            assert n == len(want.tokens) == int(b["block_lengths"][i].sum())
            np.testing.assert_array_equal(b["tokens"][i, :n].numpy(), want.tokens)
            assert (b["tokens"][i, n:] == pad).all()
            assert int(b["assignment"][i]) == want.assignment and int(b["label"][i]) == want.label
            assert float(b["extra"]["reward"][i]) == float(np.float32(want.extra["reward"]))
        seen += b["key"]
    assert sorted(seen) == sorted(by_key)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_iterable_dataset_splits_ranks_and_workers(stores, fmt):
    root, by_key = stores
    seen: list[str] = []
    for rank in range(2):
        ds = TokenIterableDataset([root / fmt], rank=rank, world_size=2)
        keys = [k for b in DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_ragged) for k in b["key"]]
        assert len(keys) == len(ds)
        seen += keys
    assert sorted(seen) == sorted(by_key) and len(seen) == N


def test_iterable_shuffle_is_seeded_and_covers_everything(stores):
    root, by_key = stores
    ds = TokenIterableDataset([root / "zarr", root / "wds"], shuffle=True, seed=5)
    e0 = [x["key"] for x in ds]
    assert [x["key"] for x in ds] == e0  # same seed and epoch: same order
    ds.set_epoch(1)
    e1 = [x["key"] for x in ds]
    assert e1 != e0 and sorted(e1) == sorted(e0) == sorted(list(by_key) * 2)
    plain = [x["key"] for x in TokenIterableDataset(root / "wds")]
    assert plain == open_store(root / "wds").keys


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_readers_pickle_by_path(stores, fmt):
    root, _ = stores
    r = open_store(root / fmt)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.keys == r.keys
    np.testing.assert_array_equal(r2[33].tokens, r[33].tokens)
    assert len(pickle.dumps(r)) < 1000  # the path, not the data
    ds = pickle.loads(pickle.dumps(TokenIterableDataset(r, rank=1, world_size=2)))  # as spawn workers do
    assert [x["key"] for x in ds] == [k for a, b in r.units()[1::2] for k in r.keys[a:b]]
