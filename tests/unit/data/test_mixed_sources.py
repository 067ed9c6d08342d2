"""Tests of evlp.data.mix (data.sources): shares by weight, the same mix on every rank, per-source epochs,
exact resume, restarts on changed sources, the config, and a pretraining run over two sources."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data
from scipy.stats import chisquare

from evlp.config import PretrainConfig, load_config
from evlp.config.loader import from_dict, read_yaml
from evlp.config.schema import DataConfig, DataSource
from evlp.data.mix import MixedStream, MixTracker, Source, build_sources, training_shards
from evlp.data.shards import ShardStream, StreamTracker, index_shard
from evlp.errors import ConfigError
from tests.unit.data.test_shards import _jpeg, _write_tar, collate_keys, decode_key


def _source(folder: Path, name: str, sizes: list[int], *, corrupt: bool = False, weight: float = 1.0) -> Source:
    """A source of shards ``folder/name/NNNNN.tar``, keys ``name-shard-sample``; with ``corrupt``, sample 1 of
    every shard is not an image (to be skipped)."""
    paths = []
    for s, size in enumerate(sizes):
        samples = []
        for j in range(size):
            key = f"{name}-{s}-{j}"
            jpg = b"not a jpeg" if corrupt and j == 1 else _jpeg(s * 100 + j)
            samples.append((key, {"jpg": jpg, "txt": f"caption {key}".encode()}))
        paths.append(folder / name / f"{s:05d}.tar")
        _write_tar(paths[-1], samples)
    return Source(name, tuple(paths), weight)


def _keys(source: Source) -> set[str]:
    return {s.key for shard in source.shards for s in index_shard(shard)}


def _stream(sources, **kw) -> MixedStream:
    kw.setdefault("batch_size", 4)
    return MixedStream(sources, decode=decode_key, collate=collate_keys, **kw)


def _batches(stream, workers: int, n: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [b for _, b in zip(range(n), loader)]


def _name(key: str) -> str:
    return key.split("-")[0]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """Sources of 36, 5 (one shard: it goes around most often) and 14 samples, weighted 4 : 2 : 1."""
    root = tmp_path_factory.mktemp("mix")
    return [_source(root, "big", [6] * 6, weight=4), _source(root, "small", [5], weight=2),
            _source(root, "mid", [7, 7], weight=1)]


# ----------------------------------------------------------------------------- shares


@pytest.mark.parametrize("mix", ["sample", "batch"])
def test_sources_are_drawn_in_proportion_to_their_weights(three: list[Source], mix: str) -> None:
    batches = _batches(_stream(three, seed=1, batch_size=8, mix=mix), 0, 150)
    names = [s.name for s in three]
    p = np.array([s.weight for s in three]) / sum(s.weight for s in three)
    if mix == "sample":
        observed = Counter(_name(k) for b in batches for k in b["keys"])
    else:  # one source a batch
        assert all(len({_name(k) for k in b["keys"]}) == 1 for b in batches)
        observed = Counter(_name(b["keys"][0]) for b in batches)
    counts = np.array([observed[n] for n in names])
    assert chisquare(counts, counts.sum() * p).pvalue > 1e-3, dict(observed)
    # the sizes (36 : 5 : 14) would not fit
    sizes = np.array([36, 5, 14]) / 55
    assert chisquare(counts, counts.sum() * sizes).pvalue < 1e-3
    # the counts the stream reports are the keys it delivered
    assert {n: batches[-1]["_pos"]["sources"][n][3] for n in names} == (
        {n: sum(_name(k) == n for b in batches for k in b["keys"]) for n in names})


def test_one_source_reads_like_a_shard_stream(three: list[Source]) -> None:
    mixed = [b["keys"] for b in _batches(_stream(three[:1], seed=4, batch_size=3), 0, 20)]
    alone = ShardStream(three[0].shards, batch_size=3, decode=decode_key, collate=collate_keys, seed=4)
    assert mixed == [b["keys"] for b in _batches(alone, 0, 20)]


# ----------------------------------------------------------------------------- ranks and epochs


def test_every_rank_draws_the_same_mix(three: list[Source]) -> None:
    world_size, workers = 2, 2
    runs = {rank: _batches(_stream(three, seed=2, rank=rank, world_size=world_size), workers, 30)
            for rank in range(world_size)}
    labels = {rank: [[_name(k) for k in b["keys"]] for b in batches] for rank, batches in runs.items()}
    assert labels[0] == labels[1]  # batch n of every rank: the same sources in the same places
    assert len({tuple(x) for x in labels[0]}) > 10  # and not one fixed pattern
    assert all(a["keys"] != b["keys"] for a, b in zip(runs[0], runs[1]))  # but other samples


def test_each_source_epoch_holds_each_sample_once_over_ranks_and_workers(three: list[Source]) -> None:
    """One sample a batch, so a batch's reported position is its sample's: group every source's samples of all
    ranks and workers by that source's epoch."""
    world_size, workers = 2, 2
    per_epoch: dict[tuple[str, int], Counter] = defaultdict(Counter)
    reached: dict[str, list[int]] = defaultdict(list)
    for rank in range(world_size):
        batches = _batches(_stream(three, seed=2, rank=rank, world_size=world_size, batch_size=1), workers, 120)
        for w in range(workers):
            epochs = {s.name: 0 for s in three}
            for b in (b for b in batches if b["_pos"]["worker"] == w):
                name = _name(b["keys"][0])
                epochs[name] = b["_pos"]["sources"][name][0]
                per_epoch[name, epochs[name]][b["keys"][0]] += 1
            for name, e in epochs.items():
                reached[name].append(e)
    for source in three:
        done = min(reached[source.name])  # epochs before it were finished by every worker: each sample once
        for e in range(done):
            assert per_epoch[source.name, e] == Counter({k: 1 for k in _keys(source)}), (source.name, e)
        for e in range(done, max(reached[source.name]) + 1):  # epochs still going: no sample twice
            assert max(per_epoch[source.name, e].values(), default=1) == 1
    # each source goes around at its own pace: the short one far more often than the long one
    assert min(reached["small"]) > max(reached["big"]) > 0


def test_teacher_targets_get_shard_numbers_across_sources(three: list[Source]) -> None:
    shards = [p for s in three for p in s.shards]
    names = [[s.key for s in index_shard(p)] for p in shards]
    stream = MixedStream(three, batch_size=6, seed=0, decode=lambda m, k: (k,), collate=lambda items: {"items": items},
                         extra=lambda i, k, key: (i, k))
    items = [x for b in _batches(stream, 0, 10) for x in b["items"]]
    assert {_name(key) for key, _ in items} == {"big", "small", "mid"}
    assert all(names[i][k] == key for key, (i, k) in items)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("world_size,rank,workers", [(1, 0, 0), (2, 1, 2)])
@pytest.mark.parametrize("mix", ["sample", "batch"])
def test_exact_resume_at_a_random_point(tmp_path: Path, world_size: int, rank: int, workers: int, mix: str) -> None:
    sources = [_source(tmp_path, "big", [6, 5, 7, 6], corrupt=True, weight=3),
               _source(tmp_path, "small", [4, 5], corrupt=True)]
    kw = {"batch_size": 3, "seed": 7, "rank": rank, "world_size": world_size, "mix": mix}
    k = int(np.random.default_rng([world_size, workers, len(mix)]).integers(3, 16))
    m = 12
    whole = _batches(_stream(sources, **kw), workers, k + m)
    epochs = {e for b in whole[k:] for e in [b["_pos"]["sources"]["small"][0]]}
    assert len(epochs) > 1  # the small source starts a new epoch after the interruption

    tracker = MixTracker(world_size, workers, {"big": 4, "small": 2})
    tracker.load_state_dict(_stream(sources, **kw).start_state(workers))
    for batch in whole[:k]:
        tracker.update(batch["_pos"])
    state = json.loads(json.dumps(tracker.state_dict()))  # as a checkpoint stores it
    resumed_stream = _stream(sources, resume=state, num_workers=workers, **kw)
    assert resumed_stream.resume_exact and resumed_stream.start_state(workers) == state
    resumed = _batches(resumed_stream, workers, m)
    assert resumed == whole[k:]
    for batch in resumed:
        tracker.update(batch["_pos"])
    assert tracker.skipped > 0 and sum(tracker.samples_per_source.values()) == 3 * (k + m)
    assert tracker.samples_per_source == {n: sum(_name(x) == n for b in whole for x in b["keys"]) for n in ("big", "small")}


def test_changed_sources_or_layout_restart_with_a_reason(three: list[Source]) -> None:
    kw = {"batch_size": 4, "seed": 3}
    batches = _batches(_stream(three[:2], **kw), 0, 9)
    tracker = MixTracker(1, 0, {s.name: len(s.shards) for s in three[:2]})
    tracker.load_state_dict(_stream(three[:2], **kw).start_state(0))
    for b in batches:
        tracker.update(b["_pos"])
    state = tracker.state_dict()
    saved = batches[-1]["_pos"]["sources"]
    assert saved["small"][0] >= 1  # the small source is beyond its first epoch

    # a third source: the kept ones restart their saved epoch, the new one starts; the batch index goes on
    more = _stream(three, resume=state, num_workers=0, **kw)
    assert not more.resume_exact and "sources changed" in more.restart_reason and "mid: 2 shards" in more.restart_reason
    restart = more.start_state(0)
    assert restart["positions"]["0"] == {"big": [saved["big"][0], 0], "small": [saved["small"][0], 0], "mid": [0, 0]}
    assert restart["samples"]["0"] == {"big": saved["big"][3], "small": saved["small"][3], "mid": 0}
    assert restart["batches"]["0"] == 9
    first = _batches(more, 0, 1)[0]
    assert first["_pos"]["batch"] == 9 and first["_pos"]["sources"]["small"][0] == saved["small"][0]

    # another worker count, the order of the sources, a single shard set's state: not exact either
    assert "processes x data workers" in _stream(three[:2], resume=state, num_workers=2, **kw).restart_reason
    assert not _stream(three[1::-1], resume=state, num_workers=0, **kw).resume_exact
    single = StreamTracker(1, 0)
    single.update({"worker": 0, "epoch": 2, "offset": 5, "skipped": 4})
    legacy = _stream(three[:2], resume=single.state_dict(), num_workers=0, **kw)
    assert "one shard set" in legacy.restart_reason and legacy.start_state(0)["skipped"]["0"]["big"] == 4
    # and back: a mix's state given to a single shard set restarts it from epoch 0, carrying the skipped count
    alone = ShardStream(three[0].shards, batch_size=4, decode=decode_key, collate=collate_keys, resume=state,
                        num_workers=0)
    assert not alone.resume_exact
    pos = next(iter(alone))["_pos"]
    assert pos["epoch"] == 0 and pos["skipped"] == tracker.skipped


# ----------------------------------------------------------------------------- config


def _data(**kw) -> DataConfig:
    return from_dict(PretrainConfig, {"data": kw}).data


def test_config_sources(tmp_path: Path) -> None:
    sources = "[{path: a, weight: 2}, {path: 'b/{00000..00001}.tar'}, {path: c/00000.tar, name: coco, weight: size}]"
    cfg = load_config(PretrainConfig, None, ["data.train=[.]", "data.mix=batch", f"data.sources={sources}"])
    assert [(s.label, s.weight) for s in cfg.data.sources] == [("a", 2.0), ("b", 1.0), ("coco", "size")]
    assert cfg.data.mix == "batch"
    for folder, sizes in (("a", [3, 4]), ("b", [2, 2, 9]), ("c", [5])):
        _source(tmp_path, folder, sizes)
    data = DataConfig(root=str(tmp_path), sources=cfg.data.sources)
    sources = build_sources(data)
    assert [(s.name, len(s.shards), s.weight) for s in sources] == [("a", 2, 2.0), ("b", 2, 1.0), ("coco", 1, 5.0)]
    assert training_shards(data) == [p for s in sources for p in s.shards]
    overlapping = DataConfig(root=str(tmp_path), sources=[DataSource("b"), DataSource("b/00000.tar", name="b0")])
    with pytest.raises(ConfigError, match="b0"):
        build_sources(overlapping)


@pytest.mark.parametrize("data,message", [
    ({"sources": [{"path": "a", "weight": 0}]}, r"data.sources\[0\].weight: must be > 0"),
    ({"sources": [{"path": "x/a"}, {"path": "y/a/00000.tar"}]}, "2 sources are named 'a'"),
    ({"sources": [{"path": "a"}], "train": ["cc3m"]}, "data.sources and data.train are both set"),
    ({"sources": [{"path": "a", "wieght": 2}]}, r"did you mean 'data.sources\[0\].weight'"),
    ({"sources": [{"path": "a"}], "mix": "batches"}, "did you mean"),
])
def test_config_problems_are_config_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _data(**data)
    assert err.value.exit_code == 2


# ----------------------------------------------------------------------------- end to end


@pytest.fixture()
def synth_two(synth_data: Path, tmp_path: Path) -> Path:
    """A data root with the synthetic set's two train shards as two sources, ``a/`` and ``b/``."""
    root = tmp_path / "data"
    for name, shard in (("a", "00000"), ("b", "00001")):
        (root / name).mkdir(parents=True)
        (root / name / f"{shard}.tar").symlink_to(synth_data / "train" / f"{shard}.tar")
    return root


def test_pair_batches_resume_a_mix_exactly(synth_two: Path) -> None:
    from evlp.data.pairs import PairBatches
    from evlp.data.tokenize import build_caption_tokenizer
    from evlp.data.transforms import pretrain_transforms
    from evlp.dist import DistInfo

    data = DataConfig(root=str(synth_two), sources=[DataSource("a", weight=3), DataSource("b")], augment_on="workers")
    transform, _ = pretrain_transforms(data, 32)
    tokenizer = build_caption_tokenizer("tiny", 16)

    def pairs() -> PairBatches:
        return PairBatches(build_sources(data), transform=transform, tokenizer=tokenizer, batch_size=4,
                           dist=DistInfo(rank=1, world_size=2), seed=5, num_workers=2, mix="sample")

    def run(n: int, resume: dict | None = None) -> tuple[list[dict], dict, dict[str, int]]:
        """n batches of a fresh PairBatches, its state after them, its samples per source."""
        p = pairs()
        batches = p.batches(resume)
        got = [next(batches) for _ in range(n)]
        batches.close()
        return got, json.loads(json.dumps(p.state_dict())), p.samples_per_source

    whole, whole_state, whole_counts = run(5)
    _, state, _ = run(4)
    # one batch after the resume: worker slot 1 has not delivered yet, its position must still be in the state
    resumed, resumed_state, resumed_counts = run(1, state)
    assert resumed[0].keys() == whole[4].keys() and all(torch.equal(resumed[0][k], whole[4][k]) for k in resumed[0])
    assert resumed_state == whole_state and set(resumed_state["positions"]) == {"0", "1"}
    assert resumed_counts == whole_counts and sum(whole_counts.values()) == 5 * 4 and whole_counts["a"] > 0


def test_pretraining_on_two_sources(synth_two: Path, tmp_path: Path) -> None:
    from evlp.checkpoint import latest_checkpoint
    from evlp.train.pretrain import pretrain

    cfg = load_config(PretrainConfig, "tiny", [
        f"data.root={synth_two}", "data.train=[.]", "data.sources=[{path: a, weight: 3}, {path: b}]", f"out={tmp_path / 'run'}",
        "train.max_steps=2", "train.batch_size=8", "data.num_workers=0", "data.val=null", "loss.memory_bank_size=16"])
    pretrain(cfg)
    saved = from_dict(PretrainConfig, read_yaml(tmp_path / "run" / "config.yaml"))  # what a resume reads
    assert saved.data.sources == cfg.data.sources and saved.data.sources[0].weight == 3
    stream = json.loads((latest_checkpoint(tmp_path / "run") / "data_state_rank0.json").read_text())["stream"]
    assert stream["sources"] == {"a": 1, "b": 1}
    assert sum(stream["samples_per_source"].values()) == 16 and stream["samples_per_source"]["a"] > 0
