"""evlp.data.karpathy: synth, COCO-style (filepath, restval) and Flickr-style indexes, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evlp.data.karpathy import find_retrieval_index, load_retrieval_index
from evlp.data.synth import synthesize
from evlp.errors import ConfigError, DataNotFoundError


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synthesize(out, n_train=0, n_test=12, n_val=5, seed=1, captions_per_image=3)
    return out


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 not really a jpeg")


def _entry(split: str, filename: str, imgid: int, captions: list[str], **extra: object) -> dict:
    sentences = [{"raw": c, "tokens": c.lower().split(), "imgid": imgid, "sentid": 10 * imgid + j}
                 for j, c in enumerate(captions)]
    return {"split": split, "filename": filename, "imgid": imgid, "sentences": sentences,
            "sentids": [s["sentid"] for s in sentences], **extra}


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    images = [
        _entry("test", "COCO_val2014_000000000001.jpg", 0, ["A dog.", "A brown dog "], filepath="val2014",
               cocoid=1),
        _entry("restval", "COCO_val2014_000000000002.jpg", 1, ["A cat."], filepath="val2014", cocoid=2),
        _entry("train", "COCO_train2014_000000000003.jpg", 2, ["A car.", "Red car", "Old car"],
               filepath="train2014", cocoid=3),
        _entry("val", "COCO_val2014_000000000004.jpg", 3, ["A tree."], filepath="val2014", cocoid=4),
        _entry("test", "COCO_val2014_000000000005.jpg", 4, ["A boat."], filepath="val2014", cocoid=5),
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for e in images:
        _touch(tmp_path / "images" / e["filepath"] / e["filename"])
    return tmp_path


def test_synth_test_split(synth_root: Path) -> None:
    raw = json.loads((synth_root / "test" / "karpathy.json").read_text())
    for data in (synth_root, synth_root / "test", synth_root / "test" / "karpathy.json", str(synth_root)):
        index = load_retrieval_index(data, "test")
        assert index.dataset == "synth" and index.split == "test"
        assert index.source == synth_root / "test" / "karpathy.json"
        assert index.n_images == 12 and index.n_texts == 36
        assert index.image_ids == [e["imgid"] for e in raw["images"]]
        assert index.image_paths == [synth_root / "test" / "images" / e["filename"] for e in raw["images"]]
        assert index.texts == [s["raw"] for e in raw["images"] for s in e["sentences"]]
        assert index.text_to_image == [i for i in range(12) for _ in range(3)]
    val = load_retrieval_index(synth_root, "val")
    assert val.n_images == 5 and val.image_paths[0].parent == synth_root / "val" / "images"


def test_coco_with_restval(coco: Path) -> None:
    root = coco / "images"
    test = load_retrieval_index(coco, "test", images_root=root)
    assert test.dataset == "coco" and test.source == coco / "dataset_coco.json"
    assert test.image_ids == [1, 5]  # cocoid, in file order
    assert test.image_paths == [root / "val2014" / "COCO_val2014_000000000001.jpg",
                                root / "val2014" / "COCO_val2014_000000000005.jpg"]
    assert test.texts == ["A dog.", "A brown dog", "A boat."]  # stripped, in order
    assert test.text_to_image == [0, 0, 1]
    train = load_retrieval_index(coco / "dataset_coco.json", "train", images_root=str(root))
    assert train.image_ids == [2, 3]  # restval counts as train
    assert train.text_to_image == [0, 1, 1, 1]
    assert load_retrieval_index(coco, "restval", images_root=root).image_ids == [2]
    assert load_retrieval_index(coco, "val", images_root=root).texts == ["A tree."]


def test_flickr_layout_without_filepath(tmp_path: Path) -> None:
    images = [_entry("test", "1000.jpg", 0, ["Two men.", "Men talking."]),
              _entry("test", "1001.jpg", 1, ["A girl."]),
              _entry("train", "1002.jpg", 2, ["A bike."])]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    _touch(tmp_path / "flickr30k-images" / "1000.jpg")  # the official archive's folder
    _touch(tmp_path / "1001.jpg")  # or flat next to the JSON
    index = load_retrieval_index(tmp_path)
    assert index.dataset == "flickr30k"
    assert index.image_paths == [tmp_path / "flickr30k-images" / "1000.jpg", tmp_path / "1001.jpg"]
    assert index.image_ids == [0, 1] and index.text_to_image == [0, 0, 1]


def test_duplicate_entries_are_merged(tmp_path: Path) -> None:
    images = [_entry("test", "a.jpg", 0, ["one"]), _entry("test", "b.jpg", 1, ["two"]),
              _entry("test", "a.jpg", 2, ["three"])]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images}))
    for name in ("a.jpg", "b.jpg"):
        _touch(tmp_path / name)
    index = load_retrieval_index(tmp_path)
    assert index.image_paths == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert index.texts == ["one", "two", "three"] and index.text_to_image == [0, 1, 0]


def test_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_retrieval_index(tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="no retrieval index"):
        load_retrieval_index(tmp_path)
    (tmp_path / "dataset_coco.json").write_text("{}")
    (tmp_path / "dataset_flickr30k.json").write_text("{}")
    with pytest.raises(ConfigError, match="several Karpathy files"):
        find_retrieval_index(tmp_path)


def test_missing_images_are_counted(coco: Path) -> None:
    (coco / "images" / "val2014" / "COCO_val2014_000000000005.jpg").unlink()
    with pytest.raises(DataNotFoundError, match=r"1 of 2 test images .*COCO_val2014_000000000005\.jpg"):
        load_retrieval_index(coco, "test", images_root=coco / "images")
    with pytest.raises(DataNotFoundError, match=r"2 of 2 test images"):
        load_retrieval_index(coco, "test")  # the default root (the JSON's folder) is the wrong one
    with pytest.raises(DataNotFoundError, match="images root"):
        load_retrieval_index(coco, "test", images_root=coco / "elsewhere")


def test_unknown_split_lists_the_present_ones(coco: Path, synth_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"'dev' not found .* restval, test, train, val .*restval"):
        load_retrieval_index(coco, "dev", images_root=coco / "images")
    with pytest.raises(ConfigError, match="it has test;"):
        load_retrieval_index(synth_root / "test", "val")
    with pytest.raises(ConfigError, match="'train' not found .* it has test, val;"):
        load_retrieval_index(synth_root, "train")  # the synth train split is shards, not an index


def test_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_retrieval_index(bad)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ConfigError, match="'images' list"):
        load_retrieval_index(bad)
    bad.write_text(json.dumps({"images": [_entry("test", "a.jpg", 0, [])]}))
    with pytest.raises(ConfigError, match="a.jpg .* no caption"):
        load_retrieval_index(bad)
