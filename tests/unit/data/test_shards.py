"""Tests of evlp.data.shards against hand-written tars and brute-force expectations."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from evlp.data.shards import (
    ShardSample,
    ShardStream,
    StreamTracker,
    count_samples,
    expand_shards,
    index_shard,
)
from evlp.errors import ConfigError, DataNotFoundError

LAYOUTS = [(1, 0), (1, 2), (2, 1), (2, 2), (3, 2)]  # (world_size, DataLoader num_workers)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color=(seed * 37 % 256, seed * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _make_shards(folder: Path, sizes: list[int]) -> tuple[list[Path], set[str], set[str]]:
    """Write shards of the given sizes; in each, sample 1 has a corrupt JPEG and sample 3 no image.

    Returns the shard paths, the keys that decode and the keys that must be skipped.
    """
    rng = np.random.default_rng(123)
    paths, good, bad = [], set(), set()
    for s, size in enumerate(sizes):
        samples = []
        for j in range(size):
            key = f"{s:05d}{j:04d}"
            members = {"jpg": _jpeg(s * 100 + j), "txt": f"caption {key}".encode(),
                       "json": json.dumps({"key": key}).encode()}
            if j == 1:
                members["jpg"] = rng.bytes(64)  # not an image
            if j == 3:
                del members["jpg"]
            (bad if j in (1, 3) else good).add(key)
            samples.append((key, members))
        path = folder / f"{s:05d}.tar"
        _write_tar(path, samples)
        paths.append(path)
    return paths, good, bad


def decode_key(members: dict[str, bytes], key: str) -> str:
    with Image.open(io.BytesIO(members["jpg"])) as image:
        image.load()
    assert members["txt"].decode() == f"caption {key}"
    return key


def collate_keys(items: list[str]) -> dict:
    return {"keys": list(items)}


def _loader(stream: ShardStream, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)


def _stream(shards, **kw) -> ShardStream:
    kw.setdefault("batch_size", 1)
    return ShardStream(shards, decode=decode_key, collate=collate_keys, **kw)


# ----------------------------------------------------------------------------- expand_shards


def test_expand_shards_forms(tmp_path: Path) -> None:
    for name in ["a/00000.tar", "a/00001.tar", "a/sub/00002.tar", "b/00000.tar", "b/00000_stats.json"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    a0, a1, a2, b0 = (str(tmp_path / n)
                      for n in ["a/00000.tar", "a/00001.tar", "a/sub/00002.tar", "b/00000.tar"])

    def names(entries):
        return [str(p) for p in expand_shards(tmp_path, entries)]

    assert names(["a"]) == [a0, a1, a2]  # folders are searched recursively
    assert names(["a/*.tar"]) == [a0, a1]
    assert names(["a/{00000..00001}.tar"]) == [a0, a1]
    assert names(["b/00000.tar"]) == [b0]
    assert names([b0, "a/00000.tar", "a"]) == [a0, a1, a2, b0]  # absolute + de-duplicated + sorted
    assert names([]) == [a0, a1, a2, b0]
    assert names(["a/{00000..00009}.tar"]) == [a0, a1]  # brace items that do not exist are dropped


def test_expand_shards_missing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "00000.tar").write_bytes(b"")
    for entry in ["nope", "a/*.zip", "a/{00005..00007}.tar", "a/00009.tar"]:
        with pytest.raises(DataNotFoundError, match="evlp data synth") as err:
            expand_shards(tmp_path, ["a", entry])
        assert entry in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataNotFoundError, match="missing_root"):
        expand_shards(tmp_path / "missing_root", [])


# ----------------------------------------------------------------------------- index / count


def test_index_shard_offsets_match_tarfile(tmp_path: Path) -> None:
    (path,), good, bad = _make_shards(tmp_path, [6])
    index = index_shard(path)
    assert [s.key for s in index] == [f"00000{j:04d}" for j in range(6)]
    assert set(index[3].members) == {"txt", "json"}
    with tarfile.open(path) as tar, open(path, "rb") as f:
        for sample in index:
            for ext, (offset, size) in sample.members.items():
                f.seek(offset)
                assert f.read(size) == tar.extractfile(f"{sample.key}.{ext}").read()


def test_index_shard_truncated_and_garbage(tmp_path: Path) -> None:
    (path,), _, _ = _make_shards(tmp_path, [8])
    full = index_shard(path)
    data = path.read_bytes()
    jpg_offset = full[4].members["jpg"][0]
    # cut inside sample 4's first member data, inside its header, and inside sample 3's last member
    for cut, expected in [(jpg_offset + 10, 4), (jpg_offset - 300, 4), (full[3].members["json"][0] + 2, 3)]:
        part_path = tmp_path / "cut.tar"
        part_path.write_bytes(data[:cut])
        with pytest.warns(RuntimeWarning, match="truncated|damaged"):
            part = index_shard(part_path)
        assert part[:expected] == full[:expected]
        assert all(off + size <= cut for s in part for off, size in s.members.values())
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.warns(RuntimeWarning):
        assert index_shard(junk) == []


def test_count_samples_prefers_stats(tmp_path: Path) -> None:
    paths, _, _ = _make_shards(tmp_path, [5, 7])
    assert count_samples(paths) == 12
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 99, "count": 100}))
    assert count_samples(paths) == 5 + 99


# ----------------------------------------------------------------------------- coverage


def _collect(shards, world_size: int, workers: int, until_epoch: int, **kw) -> dict:
    """Per (rank, worker), the batches of every rank's stream until each worker reached ``until_epoch``."""
    out = {}
    for rank in range(world_size):
        stream = _stream(shards, rank=rank, world_size=world_size, **kw)
        seen: dict[int, list[dict]] = {w: [] for w in range(max(1, workers))}
        for batch in _loader(stream, workers):
            seen[batch["_pos"]["worker"]].append(batch)
            if all(b and b[-1]["_pos"]["epoch"] >= until_epoch for b in seen.values()):
                break
        out.update({(rank, w): b for w, b in seen.items()})
    return out


def _brute_force_share(shards, seed: int, epoch: int, g: int, n_global: int) -> list[str]:
    """The keys global worker ``g`` visits in ``epoch``, spelled out from the specification."""
    items = []  # (shard position in this epoch's order, key)
    for pos, i in enumerate(np.random.default_rng([seed, epoch]).permutation(len(shards))):
        names = [s.key for s in index_shard(shards[i])]
        items += [(pos, names[j]) for j in np.random.default_rng([seed, epoch, i]).permutation(len(names))]
    if len(shards) >= n_global:
        return [key for pos, key in items if pos % n_global == g]
    return [key for k, (_, key) in enumerate(items) if k % n_global == g]


@pytest.mark.parametrize("sizes", [[6] * 7, [7, 9, 8], [17]], ids=["many", "few", "one"])
@pytest.mark.parametrize("world_size,workers", LAYOUTS)
def test_epochs_cover_every_sample_once(tmp_path: Path, sizes, world_size: int, workers: int) -> None:
    shards, good, bad = _make_shards(tmp_path, sizes)
    runs = _collect(shards, world_size, workers, until_epoch=2)
    for epoch in (0, 1):
        keys = Counter(k for batches in runs.values() for b in batches if b["_pos"]["epoch"] == epoch
                       for k in b["keys"])
        assert keys == Counter(good)
        n_global = world_size * max(1, workers)
        for (rank, w), batches in runs.items():
            got = [k for b in batches if b["_pos"]["epoch"] == epoch for k in b["keys"]]
            want = _brute_force_share(shards, 0, epoch, rank * max(1, workers) + w, n_global)
            assert got == [k for k in want if k in good]
    # `offset` counts skipped items too: from each worker's last batch of epoch 0 and first of
    # epoch 1, recover its epoch-0 item count and skips, which must add up to the data written
    total_items = total_skipped = 0
    for batches in runs.values():
        last0 = ([b["_pos"] for b in batches if b["_pos"]["epoch"] == 0] or [{"offset": 0, "skipped": 0}])[-1]
        first1 = next(b["_pos"] for b in batches if b["_pos"]["epoch"] == 1)
        total_items += first1["skipped"] - last0["skipped"] + last0["offset"] - first1["offset"] + 1
        total_skipped += first1["skipped"] - (first1["offset"] - 1)
    assert total_items == sum(sizes)
    assert total_skipped == len(bad)


def test_batches_concatenate_the_item_stream(tmp_path: Path) -> None:
    """Batches of 4 are the single-item stream cut in fours, across epoch boundaries."""
    shards, _, _ = _make_shards(tmp_path, [6, 5, 7])
    singles = [b for _, b in zip(range(60), _loader(_stream(shards, seed=3), 0))]
    fours = [b for _, b in zip(range(15), _loader(_stream(shards, seed=3, batch_size=4), 0))]
    assert [k for b in fours for k in b["keys"]] == [b["keys"][0] for b in singles]
    assert [b["_pos"] for b in fours] == [singles[4 * j + 3]["_pos"] for j in range(15)]
    assert {b["_pos"]["epoch"] for b in fours} >= {0, 1, 2, 3}


def test_within_shard_order_follows_seeded_permutations(tmp_path: Path) -> None:
    shards, good, _ = _make_shards(tmp_path, [6, 5, 7])
    keys = [b["keys"][0] for _, b in zip(range(len(good)), _loader(_stream(shards, seed=5), 0))]
    expected = []
    for i in np.random.default_rng([5, 0]).permutation(3):
        names = [s.key for s in index_shard(shards[i])]
        expected += [names[j] for j in np.random.default_rng([5, 0, i]).permutation(len(names))]
    assert keys == [k for k in expected if k in good]


# ----------------------------------------------------------------------------- determinism / errors


def test_determinism_and_seed(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 6, 6, 6])

    def first(seed: int) -> list:
        return [b["keys"] for _, b in zip(range(8), _loader(_stream(shards, seed=seed, batch_size=3), 2))]

    assert first(0) == first(0)
    assert first(0) != first(1)


def test_decode_none_skips_and_other_errors_propagate(tmp_path: Path) -> None:
    shards, good, _ = _make_shards(tmp_path, [6, 6])
    stream = ShardStream(shards, batch_size=2, collate=collate_keys,
                         decode=lambda m, k: None if k.endswith("0") else decode_key(m, k))
    batch = next(iter(stream))
    assert all(not k.endswith("0") for k in batch["keys"])

    def boom(members: dict, key: str) -> str:
        raise RuntimeError("not a data problem")

    with pytest.raises(RuntimeError, match="not a data problem"):
        next(iter(ShardStream(shards, batch_size=2, decode=boom, collate=collate_keys)))


def test_bad_arguments(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6])
    with pytest.raises(DataNotFoundError):
        _stream([])
    with pytest.raises(DataNotFoundError, match="gone.tar"):
        _stream([*shards, tmp_path / "gone.tar"])
    with pytest.raises(ConfigError, match="batch_size"):
        _stream(shards, batch_size=0)
    with pytest.raises(ConfigError, match="rank"):
        _stream(shards, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="StreamTracker"):
        _stream(shards, resume={"positions": {}})
    # 6 samples cannot feed 8 workers of a sample-level split
    with pytest.raises(ConfigError, match="6 samples"):
        next(iter(_stream(shards, rank=0, world_size=8)))


def test_stream_pickles(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 6])
    stream = _stream(shards, batch_size=2)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    clone = pickle.loads(pickle.dumps(stream))
    assert [b for _, b in zip(range(3), iter(clone))] == first


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("world_size,rank,workers", [(1, 0, 0), (1, 0, 2), (2, 1, 2)])
@pytest.mark.parametrize("k", [0, 5, 13])
def test_exact_resume(tmp_path: Path, world_size: int, rank: int, workers: int, k: int) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 5, 7, 6, 8])
    kw = dict(batch_size=3, seed=7, rank=rank, world_size=world_size)
    m = 12
    whole = [b for _, b in zip(range(k + m), _loader(_stream(shards, **kw), workers))]
    assert {b["_pos"]["epoch"] for b in whole[k:]} != {whole[k]["_pos"]["epoch"]}  # crosses an epoch

    tracker = StreamTracker(world_size, workers)
    for batch in whole[:k]:
        tracker.update(batch["_pos"])
    state = json.loads(json.dumps(tracker.state_dict()))  # as a checkpoint would store it
    resumed_stream = _stream(shards, resume=state, num_workers=workers, **kw)
    assert resumed_stream.resume_exact
    resumed = [b for _, b in zip(range(m), _loader(resumed_stream, workers))]
    assert resumed == whole[k:]
    for batch in resumed:
        tracker.update(batch["_pos"])
    expected = StreamTracker(world_size, workers)
    for batch in whole:
        expected.update(batch["_pos"])
    assert tracker.state_dict() == expected.state_dict()
    assert tracker.skipped == expected.skipped > 0


def test_resume_reads_nothing_before_the_position(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 5, 7])
    calls = []

    def counting(members: dict, key: str) -> str:
        calls.append(key)
        return decode_key(members, key)

    def stream(**kw) -> ShardStream:
        return ShardStream(shards, batch_size=2, decode=counting, collate=collate_keys, **kw)

    it = iter(stream())
    tracker = StreamTracker(1, 0)
    for _ in range(6):
        tracker.update(next(it)["_pos"])
    before = list(calls)
    next(it)
    continuation = calls[len(before):]
    calls.clear()
    next(iter(stream(resume=tracker.state_dict())))
    assert calls == continuation


def test_layout_change_is_not_exact(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 5, 7])
    state = {"world_size": 1, "num_workers": 2, "positions": {"0": [2, 5], "1": [1, 3]},
             "skipped": {"0": 4, "1": 3}}
    assert _stream(shards, resume=state, num_workers=2).resume_exact
    assert _stream(shards, resume=state).resume_exact  # worker count unknown: assumed unchanged
    assert not _stream(shards, resume=state, world_size=2, num_workers=2).resume_exact
    changed = _stream(shards, resume=state, num_workers=0)
    assert changed.resume_exact is False
    # restarts the smallest saved epoch from its beginning; worker 0 carries the skipped total
    fresh = _stream(shards, resume={"world_size": 1, "num_workers": 1, "positions": {"0": [1, 0]},
                                    "skipped": {"0": 7}})
    with pytest.warns(RuntimeWarning, match="2 workers"):  # assumed exact, but iterated by one worker
        next(iter(_stream(shards, resume=state)))
    got = [b for _, b in zip(range(10), iter(changed))]
    assert got == [b for _, b in zip(range(10), iter(fresh))]
    assert got[0]["_pos"]["epoch"] == 1 and got[0]["_pos"]["skipped"] >= 7


def test_tracker_state_round_trip() -> None:
    tracker = StreamTracker(world_size=2, num_workers=2)
    tracker.update({"worker": 0, "epoch": 0, "offset": 9, "skipped": 1})
    tracker.update({"worker": 1, "epoch": 0, "offset": 8, "skipped": 2})
    tracker.update({"worker": 0, "epoch": 1, "offset": 2, "skipped": 3})
    state = tracker.state_dict()
    assert state == {"world_size": 2, "num_workers": 2, "positions": {"0": [1, 2], "1": [0, 8]},
                     "skipped": {"0": 3, "1": 2}, "next_worker": 1}
    assert tracker.skipped == 5
    same = StreamTracker(2, 2)
    same.load_state_dict(state)
    assert same.state_dict() == state
    other = StreamTracker(2, 4)
    other.load_state_dict(state)
    assert other.positions == {} and other.skipped == 5 and other.state_dict()["next_worker"] == 0
    assert StreamTracker(1, 0).state_dict()["num_workers"] == 1  # loading in the main process = one worker


def test_shard_sample_is_plain_data() -> None:
    sample = ShardSample("k", {"jpg": (512, 10)})
    assert pickle.loads(pickle.dumps(sample)) == sample
