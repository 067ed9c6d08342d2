"""evlp.data.download.flickr: the gated-download steps, archive normalisation, shards and index."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from evlp.data.download.flickr import FLICKR_STEPS, download_flickr
from evlp.data.download.manifest import read_manifest
from evlp.data.karpathy import load_retrieval_index
from evlp.data.shards import count_samples, index_shard
from evlp.errors import DataNotFoundError
from tests.unit.data.httpserver import LocalHTTPServer
from tests.unit.data.test_download_coco import caption, entry, jpeg

SPLITS = ["train"] * 5 + ["val"] * 2 + ["test"] * 3


def _karpathy() -> dict:
    """A Flickr-style Karpathy file: no filepath, no cocoid; image 4 is referenced but missing."""
    return {"dataset": "flickr30k", "images": [
        {k: v for k, v in entry(split, "", f"{100000 + i}.jpg", i).items() if k != "filepath"}
        for i, split in enumerate(SPLITS)]}


def _images() -> dict[str, bytes]:
    return {f"{100000 + i}.jpg": jpeg(i, (36 + 4 * i, 28)) for i in range(len(SPLITS)) if i != 4}


def _tar_gz(path: Path, top: str, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {**{f"{top}{n}": d for n, d in _images().items()}, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _samples(folder: Path) -> Counter[tuple[int, str]]:
    pairs: Counter[tuple[int, str]] = Counter()
    for shard in sorted((folder / "train").glob("*.tar")):
        data = shard.read_bytes()
        for s in index_shard(shard):
            off, size = s.members["json"]
            meta = json.loads(data[off:off + size])
            pairs[(meta["imgid"], meta["caption"])] += 1
    return pairs


def test_no_archive_gives_the_steps(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        download_flickr(tmp_path, archive=None)
    message = str(info.value)
    first, rest = message.split("\n", 1)
    assert "gated" in first and "--archive" in first
    assert rest == FLICKR_STEPS
    assert "https://forms.illinois.edu/sec/229675" in FLICKR_STEPS
    assert "hsankesara/flickr-image-dataset" in FLICKR_STEPS
    assert "evlp data download flickr --archive" in FLICKR_STEPS
    assert [line[:2] for line in FLICKR_STEPS.splitlines() if line[:1].isdigit()] == ["1.", "2.", "3."]
    with pytest.raises(DataNotFoundError, match="nope.tar.gz does not exist"):
        download_flickr(tmp_path, archive=tmp_path / "nope.tar.gz")
    assert not (tmp_path / "flickr30k").exists()


def test_official_tar_gz_with_local_karpathy_json(tmp_path: Path) -> None:
    archive = _tar_gz(tmp_path / "flickr30k-images.tar.gz", "flickr30k-images/",
                      {"flickr30k-images/readme.txt": b"hello"})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(_karpathy()))
    root = tmp_path / "data"
    events: list[tuple] = []
    m = download_flickr(root, archive=archive, karpathy=tmp_path / "dataset_flickr30k.json", image_size=12,
                        shard_size=4, progress=lambda *a: events.append(a))
    folder = root / "flickr30k"
    assert sorted(p.name for p in (folder / "flickr30k-images").iterdir()) == sorted(_images())
    assert not (folder / "_extract").exists()

    expected = Counter((i, caption(i, j)) for i in range(5) if i != 4 for j in range(5))
    shards = sorted((folder / "train").glob("*.tar"))
    assert _samples(folder) == expected
    assert count_samples(shards) == sum(expected.values()) == m.counts["train"]["captions"]
    assert m.counts["train"] == {"images": 4, "captions": 20, "shards": len(shards)}
    assert m.counts["val"] == {"images": 2, "captions": 10} and m.counts["test"] == {"images": 3, "captions": 15}
    assert m.failures == {"missing_image": 1}
    assert m.source[0] == str(archive.resolve()) and m.dataset == "flickr30k"

    index = load_retrieval_index(folder, "test")
    assert index.n_images == 3 and index.n_texts == 15 and index.image_ids == [7, 8, 9]
    assert all(p.parent == folder / "flickr30k-images" for p in index.image_paths)
    raw = json.loads((folder / "karpathy.json").read_text())
    assert {e["filepath"] for e in raw["images"]} == {"flickr30k-images"}
    assert {e[0] for e in events} >= {"extract flickr30k-images.tar.gz", "shards", "index"}

    # a re-run needs no archive any more, and rewrites nothing but the manifest
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}
    again = download_flickr(root, archive=None, karpathy=tmp_path / "dataset_flickr30k.json", image_size=12,
                            shard_size=4)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert again.counts == m.counts and read_manifest(folder).source == m.source


def test_kaggle_zip_layout_and_downloaded_karpathy(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    archive = tmp_path / "flickr-image-dataset.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # Kaggle's zip nests the folder and adds a CSV
        zf.writestr("flickr30k_images/results.csv", "image_name| comment_number| comment\n")
        for name, data in _images().items():
            zf.writestr(f"flickr30k_images/flickr30k_images/{name}", data)
        zf.writestr("__MACOSX/flickr30k_images/._100000.jpg", b"junk")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("dataset_coco.json", "{}")
        zf.writestr("dataset_flickr30k.json", json.dumps(_karpathy()))
    url = http_server.put("caption_datasets.zip", buf.getvalue())

    root = tmp_path / "data"
    m = download_flickr(root, archive=archive, karpathy_url=url, image_size=0, shard_size=100,
                        keep_archives=False)
    folder = root / "flickr30k"
    assert sorted(p.name for p in (folder / "flickr30k-images").iterdir()) == sorted(_images())
    assert http_server.requests["/caption_datasets.zip"] == 1
    assert (folder / "_downloads" / "dataset_flickr30k.json").is_file()
    assert not (folder / "_downloads" / "caption_datasets.zip").exists()
    assert m.extra["archives"]["caption_datasets.zip"]["deleted"] is True
    assert m.source == [str(archive.resolve()), url]
    assert archive.is_file()  # the user's archive is never deleted
    assert m.counts["train"]["shards"] == 1 and len(_samples(folder)) == 20
    assert load_retrieval_index(folder, "val").n_images == 2

    download_flickr(root, archive=archive, karpathy_url=url, image_size=0, shard_size=100)
    assert http_server.requests["/caption_datasets.zip"] == 1  # not fetched again


def test_archive_without_images(tmp_path: Path) -> None:
    archive = tmp_path / "wrong.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("notes.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataNotFoundError, match="holds no images"):
        download_flickr(tmp_path / "data", archive=archive, karpathy=tmp_path / "x.json")


def test_local_caption_datasets_zip(tmp_path: Path) -> None:
    archive = _tar_gz(tmp_path / "flickr30k-images.tar", "")  # no top folder at all
    with zipfile.ZipFile(tmp_path / "caption_datasets.zip", "w") as zf:
        zf.writestr("caption_datasets/dataset_flickr30k.json", json.dumps(_karpathy()))
    m = download_flickr(tmp_path / "data", archive=archive, karpathy=tmp_path / "caption_datasets.zip",
                        image_size=8, shard_size=3)
    folder = tmp_path / "data" / "flickr30k"
    assert len(list((folder / "flickr30k-images").glob("*.jpg"))) == len(_images())
    assert not list((folder / "flickr30k-images").glob(".*"))  # no extraction marker among the images
    assert m.counts["train"]["captions"] == 20 and m.source[-1] == str((tmp_path / "caption_datasets.zip").resolve())
    assert load_retrieval_index(folder, "test").n_texts == 15
