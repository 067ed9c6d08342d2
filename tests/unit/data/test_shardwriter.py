"""One shard writer: `evlp data synth` and the downloaders write shards with the same function, and the
bytes of a written shard are exactly what the reader indexes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from evlp.data import synth
from evlp.data.download import karpathy_sets, shardwriter
from evlp.data.layouts import read_stats, stats_successes
from evlp.data.shards import count_samples, index_shard


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, "JPEG")
    return buf.getvalue()


def _karpathy_folder(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A tiny COCO-like dataset: 3 train images with 2 captions each, 1 test image."""
    folder = tmp_path / "coco"
    (folder / "imgs").mkdir(parents=True)
    images = []
    for i, split in enumerate(("train", "train", "restval", "test")):
        (folder / "imgs" / f"{i}.jpg").write_bytes(_jpeg((40 * i, 80, 120)))
        images.append({"filename": f"{i}.jpg", "filepath": "imgs", "split": split, "imgid": i,
                       "sentences": [{"raw": f"image {i} caption {c} é", "sentid": 2 * i + c} for c in range(2)]})
    return folder, {"dataset": "coco", "images": images}


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[tuple[Path, list]]]:
    """Run `evlp data synth` and a Karpathy build with the shard writer spied on; its calls by caller."""
    writer = shardwriter.write_shard
    calls: dict[str, list[tuple[Path, list]]] = {"synth": [], "download": []}

    def spy(who: str):  # a test double that records and delegates
        def write_shard(shard: Path, samples: list, **kwargs: Any) -> dict:
            calls[who].append((shard, list(samples)))
            return writer(shard, samples, **kwargs)
        return write_shard

    members: list[str] = []
    add = shardwriter._add
    monkeypatch.setattr(shardwriter, "_add", lambda tar, name, data: (members.append(name), add(tar, name, data)))
    monkeypatch.setattr(synth, "write_shard", spy("synth"))
    monkeypatch.setattr(karpathy_sets, "write_shard", spy("download"))
    synth.synthesize(tmp_path / "synth", n_train=5, n_test=2, image_size=32, captions_per_image=1, shard_size=3)
    folder, data = _karpathy_folder(tmp_path)
    karpathy_sets.build_karpathy_dataset(folder, data, dataset="coco", image_size=0, shard_size=4, workers=1)
    calls["members"] = members  # type: ignore[assignment]
    return calls


def test_one_writer_function() -> None:
    assert synth.write_shard is shardwriter.write_shard is karpathy_sets.write_shard  # the same object, no copy


def test_synth_and_downloaders_share_one_shard_writer(recorded: dict) -> None:
    assert [p.name for p, _ in recorded["synth"]] == ["00000.tar", "00001.tar"]
    assert [p.name for p, _ in recorded["download"]] == ["00000.tar", "00001.tar"]  # 6 captions, 4 per shard
    # every member of both went through the writer's one member function, in img2dataset's order
    n = sum(len(s) for _, s in recorded["synth"] + recorded["download"])
    assert len(recorded["members"]) == 3 * n
    assert [m.split(".", 1)[1] for m in recorded["members"][:3]] == ["jpg", "txt", "json"]


@pytest.mark.parametrize("who", ["synth", "download"])
def test_shard_bytes_are_what_the_reader_indexes(recorded: dict, who: str) -> None:
    for shard, samples in recorded[who]:
        index = index_shard(shard)
        assert [s.key for s in index] == [s.key for s in samples]
        assert stats_successes(shard) == len(samples) == count_samples([shard])
        assert read_stats(shard)["plan"]["count"] >= len(samples)
        data = shard.read_bytes()
        for entry, sample in zip(index, samples):
            assert set(entry.members) == {sample.image.ext, "txt", "json"}
            got = {ext: data[off:off + size] for ext, (off, size) in entry.members.items()}
            assert got[sample.image.ext] == sample.image.data
            assert got["txt"].decode("utf-8") == sample.caption
            meta = json.loads(got["json"])
            assert meta["key"] == sample.key and meta["caption"] == sample.caption
            assert (meta["width"], meta["height"]) == (sample.image.width, sample.image.height)
        with tarfile.open(shard) as tar:  # a plain USTAR tar with fixed member times
            assert all(m.mtime == shardwriter._MTIME for m in tar.getmembers())
