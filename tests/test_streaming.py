"""The streaming training loader: shard split by rank x worker, seeded orders, exact resume, bounded open files."""
import os
from itertools import islice

import numpy as np
import pytest
import torch

from lexvla import pairs as D
from lexvla.decode import DataConfigError
from lexvla.pairs import StreamLoader, StreamingPairs, advance_position, train_dataset
from lexvla.shards import encode_jpeg, sample_key, shard_counts, write_shards
from lexvla.transforms import backbone_data_config, image_transform


def _samples(n, per_shard, bad=()):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        jpg = b"" if i in bad else encode_jpeg(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
        out.append({"__key__": sample_key(i, per_shard), "jpg": jpg, "txt": f"caption {i}",
                    "json": {"captions": [f"caption {i}", f"other {i}", f"third {i}"]}})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    "40 shards of 3 samples (120), sample 7 an empty image (bad)."
    d = tmp_path_factory.mktemp("stream")
    return write_shards(_samples(120, 3, bad={7}), d / "train", shard_size=3)


@pytest.fixture(scope="module")
def tf():
    return image_transform(backbone_data_config("vit_small_patch14_dinov2", 16), train=True)


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_split_by_rank_and_worker_covers_each_sample_once_per_epoch(shards):
    "2 ranks x 2 DataLoader workers, through real worker processes: each epoch is every good sample exactly once."
    keys = sorted(sample_key(i, 3) for i in range(120) if i != 7)  # sample 7 is skipped (empty image)
    per_epoch = {0: [], 1: []}
    for rank in range(2):
        ds = StreamingPairs(shards, None, seed=5, batch_size=1, rank=rank, world_size=2, shuffle=10)
        seen_epochs = {}
        for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
            p = b["position"]
            seen_epochs[p["worker"]] = p["epoch"]
            if p["epoch"] in per_epoch: per_epoch[p["epoch"]] += b["keys"]
            if len(seen_epochs) == 2 and min(seen_epochs.values()) >= 2: break
    for e, got in per_epoch.items():
        assert len(got) == len(set(got)) == 119 and sorted(got) == keys, e  # no overlap, none missing
    # the same split from the shard lists alone: rank x worker streams partition the shards in every epoch
    r = [StreamingPairs(shards, None, seed=5, rank=k, world_size=2) for k in range(2)]
    for e in range(3):
        parts = [p for d in r for w in range(2) for p in d.epoch_shards(e, w, 2)]
        assert sorted(parts) == sorted(map(str, shards))


@pytest.mark.filterwarnings("ignore:training data")
def test_shard_order_by_epoch_and_seed(shards):
    a, b, c = (StreamingPairs(shards, None, seed=s) for s in (1, 1, 2))
    assert a.epoch_shards(0) == b.epoch_shards(0) != a.epoch_shards(1)
    assert a.epoch_shards(0) != c.epoch_shards(0)
    assert sorted(a.epoch_shards(3)) == sorted(map(str, shards))
    assert [x["key"] for x in a.samples(2)] == [x["key"] for x in b.samples(2)] != [x["key"] for x in a.samples(3)]
    assert shard_counts(shards) == [3] * 40


def _take(ds, k, workers, position=None):
    loader = StreamLoader(ds, num_workers=workers, position=position)
    return list(islice(loader, k)), loader.position


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_uninterrupted_batches(shards, tf, workers):
    "Stopped after k batches and resumed from the saved position: the same keys, captions and pixels, across epochs."
    ds = StreamingPairs(shards, tf, seed=3, captions_per_image=2, batch_size=8, shuffle=20)
    if workers == 0:  # sample 7's empty image: skipped and warned about (in a worker process: there)
        with pytest.warns(UserWarning, match="skipping bad samples"): full, _ = _take(ds, 33, workers)
    else: full, _ = _take(ds, 33, workers)  # 264 samples: more than two epochs of 119
    assert full[-1]["position"]["epoch"] == 2
    for k in (5, 15, 29):  # in epoch 0, at the end of epoch 0 (per worker), in epoch 2
        head, saved = _take(ds, k, workers)
        tail, _ = _take(ds, 33 - k, workers, saved)
        got = head + tail
        assert [b["keys"] for b in got] == [b["keys"] for b in full], k
        assert [b["captions"] for b in got] == [b["captions"] for b in full], k
        assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(got, full)), k
    assert full[0]["pixels"].shape == (8, 3, 16, 16)


@pytest.mark.filterwarnings("ignore:training data")
def test_resume_skips_without_decoding(shards, monkeypatch):
    ds = StreamingPairs(shards, None, seed=3, batch_size=4, shuffle=20)
    _, saved = _take(ds, 25, 0)  # 100 samples in
    calls = []
    real = D.decode_image
    monkeypatch.setattr(D, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    (b,), _ = _take(ds, 1, 0, saved)
    assert len(calls) <= 5  # the batch's 4 (and perhaps the bad one), not the 100 before


def test_streaming_sample_is_tarpairs_sample(shards, tf):
    "A key in epoch e gets the caption and augmented pixels that `TarPairs` gives it in epoch e."
    tp = train_dataset(shards, tf, seed=4, captions_per_image=2)
    ds = StreamingPairs(shards, tf, seed=4, captions_per_image=2, shuffle=0)
    for e in (0, 1):
        tp.set_epoch(e)
        for s in islice(ds.samples(e), 6):
            ref = tp.load(tp.keys.index(s["key"]))
            assert ref["caption"] == s["caption"] and torch.equal(ref["pixels"], s["pixels"])


def test_worker_count_and_config_must_match_on_resume(shards):
    ds = StreamingPairs(shards, None, seed=3, batch_size=4)
    _, saved = _take(ds, 3, 2)
    for w in (0, 3):
        with pytest.raises(ValueError, match="saved with 2 DataLoader worker"):
            _take(ds, 1, w, saved)
    ds.set_position(saved)
    with pytest.raises(ValueError, match="saved with 2 DataLoader worker"):  # a plain DataLoader: raised in the worker
        next(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)))
    for kw in ({"seed": 4}, {"batch_size": 5}, {"shuffle": 7}, {"rank": 1, "world_size": 2}):
        other = StreamingPairs(shards, None, **{"seed": 3, "batch_size": 4, **kw})
        with pytest.raises(ValueError, match="cannot resume exactly"):
            other.set_position(saved)
    b = _take(ds, 2, 2)[0]
    with pytest.raises(ValueError, match="every batch the loader yields"):  # a batch left out of the bookkeeping
        advance_position(None, b[1]["position"])


def test_too_few_shards_for_ranks_and_workers(shards):
    ds = StreamingPairs(shards[:3], None, seed=0, batch_size=2, rank=1, world_size=2)
    with pytest.raises(DataConfigError, match="3 shards cannot feed 2 ranks x 2 DataLoader workers"):
        _take(ds, 1, 2)
    assert len(_take(ds, 2, 0)[0]) == 2


def test_unequal_ranks_never_run_dry(tmp_path):
    "Rank 0 holds 4 samples an epoch and rank 1 holds 40: both yield as many batches as asked."
    sh = write_shards(_samples(4, 4), tmp_path / "a", 4) + write_shards(_samples(40, 40), tmp_path / "b", 40)
    for r in range(2):
        ds = StreamingPairs(sh, None, seed=0, batch_size=3, rank=r, world_size=2, shuffle=0)
        got, pos = _take(ds, 30, 0)
        assert len(got) == 30 and all(len(b["keys"]) == 3 for b in got)


class _CountingStream(StreamingPairs):
    "Records this worker's open descriptors before its stream starts and at each batch."
    def __iter__(self):
        start = _fd_count()
        for b in super().__iter__():
            b["fds"] = (start, _fd_count())
            yield b


def test_open_files_bounded(tmp_path):
    "50 shards, 2 workers: a streaming worker holds at most one shard open; TarPairs' LRU bounds its handles too."
    sh = write_shards(_samples(150, 3), tmp_path / "s", 3)
    ds = _CountingStream(sh, None, seed=0, batch_size=5, shuffle=10)
    fds = [b["fds"] for b in islice(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2), 60)]  # 2 epochs
    assert max(now - start for start, now in fds) <= 1, fds

    def counting(batch):
        return {"keys": [s["key"] for s in batch], "fds": _fd_count()}

    def tar_fds(max_open):
        tp = train_dataset(sh, None, seed=0, max_open_files=max_open)
        dl = torch.utils.data.DataLoader(tp, batch_size=10, num_workers=2, collate_fn=counting)
        return max(b["fds"] for b in dl)

    unbounded, bounded = tar_fds(None), tar_fds(4)
    assert unbounded - bounded >= 15  # each worker keeps ~all 50 shards open without the LRU
    small, big = train_dataset(sh, None, seed=0, max_open_files=2), train_dataset(sh, None, seed=0)
    small.set_epoch(1), big.set_epoch(1)
    assert [(x["key"], x["caption"]) for x in small] == [(x["key"], x["caption"]) for x in big]  # handles only
    assert len(small._fh) == 2
