"""evlp.data.download.coco end to end against a local server: a tiny COCO, Karpathy splits, resume."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from evlp.data.download.coco import CocoSources, download_coco
from evlp.data.download.http import DownloadError
from evlp.data.download.manifest import read_manifest
from evlp.data.karpathy import load_retrieval_index
from evlp.data.shards import count_samples, expand_shards, index_shard
from evlp.errors import ConfigError
from tests.unit.data.httpserver import LocalHTTPServer

IMAGE_SIZE, SHARD_SIZE = 16, 7


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A noisy (so not tiny) JPEG, deterministic per seed."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def entry(split: str, filepath: str, filename: str, imgid: int, n_captions: int = 5, **extra: object) -> dict:
    """One image of a Karpathy file, with distinct captions."""
    sentences = [{"raw": f" a photo number {imgid} caption {j}\n", "tokens": ["a", "photo"], "imgid": imgid,
                  "sentid": 100 * imgid + j} for j in range(n_captions)]
    return {"filepath": filepath, "filename": filename, "imgid": imgid, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences, **extra}


def caption(imgid: int, j: int) -> str:
    return f"a photo number {imgid} caption {j}"


def build_coco_fixture(www: Path) -> SimpleNamespace:
    """train2014.zip, val2014.zip and caption_datasets.zip in ``www``, and what a build should produce."""
    images, sizes = [], {}
    plan = [("train", "train2014"), ("train", "train2014"), ("train", "train2014"), ("train", "train2014"),
            ("restval", "val2014"), ("restval", "val2014"), ("restval", "val2014"),
            ("val", "val2014"), ("val", "val2014"), ("test", "val2014"), ("test", "val2014"), ("test", "val2014")]
    for imgid, (split, folder) in enumerate(plan):
        cocoid = 1000 + imgid
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        n = 6 if imgid == 1 else 5  # some COCO images have six captions
        images.append(entry(split, folder, name, imgid, n, cocoid=cocoid))
        sizes[cocoid] = (40 + 8 * imgid, 30 + 5 * (imgid % 3))
    missing = images[5]["filename"]  # restval, referenced but absent from val2014.zip
    corrupt = images[2]["filename"]  # train, present but not an image
    zips = {"train2014": {}, "val2014": {}}
    for e in images:
        if e["filename"] == missing:
            continue
        data = b"\xff\xd8 broken" if e["filename"] == corrupt else jpeg(e["cocoid"], sizes[e["cocoid"]])
        zips[e["filepath"]][f"{e['filepath']}/{e['filename']}"] = data
    (www / "zips").mkdir(parents=True)
    for name, members in zips.items():
        with zipfile.ZipFile(www / "zips" / f"{name}.zip", "w", zipfile.ZIP_STORED) as zf:
            for member, data in members.items():
                zf.writestr(member, data)
    coco_json = {"dataset": "coco", "images": images}
    with zipfile.ZipFile(www / "caption_datasets.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset_coco.json", json.dumps(coco_json))
        zf.writestr("dataset_flickr30k.json", json.dumps({"dataset": "flickr30k", "images": []}))
        zf.writestr("dataset_flickr8k.json", "not used")
    good_train = [e for e in images if e["split"] in ("train", "restval") and e["filename"] not in (missing, corrupt)]
    return SimpleNamespace(
        images=images, sizes=sizes, missing=missing, corrupt=corrupt,
        train_pairs=Counter((e["cocoid"], caption(e["imgid"], j)) for e in good_train
                            for j in range(len(e["sentences"]))),
        train_images=len(good_train),
        test=[e for e in images if e["split"] == "test"], val=[e for e in images if e["split"] == "val"])


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Run 1 breaks off in train2014.zip; run 2 resumes and builds; run 3 finds everything done."""
    tmp = tmp_path_factory.mktemp("coco")
    fx = build_coco_fixture(tmp / "www")
    root = tmp / "data"
    with LocalHTTPServer(tmp / "www") as server:
        sources = CocoSources(train_zip=server.url("zips/train2014.zip"), val_zip=server.url("zips/val2014.zip"),
                              karpathy_zip=server.url("caption_datasets.zip"))
        train_size = (tmp / "www" / "zips" / "train2014.zip").stat().st_size
        assert train_size > 3 * 1500
        server.drop_after("zips/train2014.zip", 1500, times=None)  # every try is cut after 1500 bytes
        with pytest.raises(DownloadError, match="train2014.zip"):
            download_coco(root, sources=sources, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE)
        run1 = SimpleNamespace(requests=Counter(server.requests), sent=Counter(server.bytes_sent))
        server.reset()
        events: list[tuple[str, int, int | None]] = []
        manifest = download_coco(root, sources=sources, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE,
                                 progress=lambda *a: events.append(a))
        run2 = SimpleNamespace(requests=Counter(server.requests), sent=Counter(server.bytes_sent),
                               log=list(server.log))
        before = _mtimes(root / "coco")
        server.reset()
        again = download_coco(root, sources=sources, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE)
        run3 = SimpleNamespace(requests=server.total_requests(), mtimes=_mtimes(root / "coco"))
    return SimpleNamespace(fx=fx, root=root, manifest=manifest, again=again, events=events, run1=run1,
                           run2=run2, run3=run3, before=before, train_size=train_size, sources=sources)


def _samples(shard: Path) -> list[dict[str, bytes]]:
    data = shard.read_bytes()
    return [{ext: data[off:off + size] for ext, (off, size) in s.members.items()} for s in index_shard(shard)]


def test_interrupted_download_resumes_across_runs(built: SimpleNamespace) -> None:
    run1, run2 = built.run1, built.run2
    assert run1.requests["/caption_datasets.zip"] == 1 and run1.requests["/zips/val2014.zip"] == 1
    assert run1.requests["/zips/train2014.zip"] == 3 and run1.sent["/zips/train2014.zip"] == 4500
    # run 2 asks only for the rest of train2014.zip
    assert set(run2.requests) == {"/zips/train2014.zip"} and run2.requests["/zips/train2014.zip"] == 1
    assert run2.log[0].range == "bytes=4500-" and run2.log[0].status == 206
    assert run1.sent["/zips/train2014.zip"] + run2.sent["/zips/train2014.zip"] == built.train_size


def test_second_run_downloads_and_rewrites_nothing(built: SimpleNamespace) -> None:
    assert built.run3.requests == 0
    changed = {k for k in built.before if built.run3.mtimes.get(k) != built.before[k]}
    assert changed <= {"MANIFEST.json"}, changed
    assert built.again.counts == built.manifest.counts and built.again.failures == built.manifest.failures
    assert built.again.extra["archives"] == built.manifest.extra["archives"]


def test_layout(built: SimpleNamespace) -> None:
    coco = built.root / "coco"
    assert (coco / "train2014").is_dir() and (coco / "val2014").is_dir()
    assert (coco / "karpathy.json").is_file() and (coco / "MANIFEST.json").is_file()
    for name in ("train2014.zip", "val2014.zip", "caption_datasets.zip", "dataset_coco.json"):
        assert (coco / "_downloads" / name).is_file()
    # only dataset_coco.json came out of the Karpathy zip
    assert not list(coco.rglob("dataset_flickr*.json"))
    assert not list(coco.rglob("*.part")) and not list(coco.rglob(".*.tmp"))


def test_train_shards_hold_one_sample_per_caption(built: SimpleNamespace) -> None:
    shards = expand_shards(built.root, ["coco"])
    assert shards == sorted((built.root / "coco" / "train").glob("*.tar"))
    assert count_samples(shards) == sum(built.fx.train_pairs.values())
    assert sum(len(index_shard(s)) for s in shards) == sum(built.fx.train_pairs.values())
    pairs: Counter[tuple[int, str]] = Counter()
    keys = set()
    for shard in shards:
        cocoids = []
        for s in _samples(shard):
            assert set(s) == {"jpg", "txt", "json"}
            meta = json.loads(s["json"])
            text = s["txt"].decode()
            assert meta["caption"] == text and meta["status"] == "success"
            pairs[(meta["cocoid"], text)] += 1
            assert meta["sentid"] == 100 * (meta["cocoid"] - 1000) + int(text.rsplit(" ", 1)[1])
            cocoids.append(meta["cocoid"])
            keys.add(meta["key"])
            with Image.open(io.BytesIO(s["jpg"])) as img:
                w, h = img.size
                assert img.format == "JPEG" and img.mode == "RGB"
            assert (meta["width"], meta["height"]) == (w, h) and min(w, h) == IMAGE_SIZE
            ow, oh = built.fx.sizes[meta["cocoid"]]
            assert (meta["original_width"], meta["original_height"]) == (ow, oh)
            assert abs(w / h - ow / oh) < 0.1  # aspect ratio kept
        assert len(cocoids) == len(set(cocoids))  # captions of one image go to different shards
        stats = json.loads(shard.with_name(f"{shard.stem}_stats.json").read_text())
        assert stats["successes"] == len(cocoids)
    assert pairs == built.fx.train_pairs
    assert len(keys) == sum(pairs.values())


def test_retrieval_index(built: SimpleNamespace) -> None:
    index = load_retrieval_index(built.root / "coco", "test")
    assert index.n_images == len(built.fx.test)
    assert index.n_texts == 5 * len(built.fx.test)
    assert index.image_ids == [e["cocoid"] for e in built.fx.test]
    assert index.texts[0] == caption(built.fx.test[0]["imgid"], 0)
    assert all(p.parent == built.root / "coco" / "val2014" for p in index.image_paths)
    val = load_retrieval_index(built.root / "coco", "val")
    assert val.n_images == len(built.fx.val)
    raw = json.loads((built.root / "coco" / "karpathy.json").read_text())
    assert {e["split"] for e in raw["images"]} == {"val", "test"}


def test_manifest(built: SimpleNamespace) -> None:
    m = read_manifest(built.root / "coco")
    assert m is not None and m.dataset == "coco"
    assert m.source == [built.sources.train_zip, built.sources.val_zip, built.sources.karpathy_zip]
    assert m.counts["train"] == {"images": built.fx.train_images, "captions": sum(built.fx.train_pairs.values()),
                                 "shards": len(list((built.root / "coco" / "train").glob("*.tar")))}
    assert m.counts["test"] == {"images": 3, "captions": 15} and m.counts["val"] == {"images": 2, "captions": 10}
    assert m.failures == {"bad_image": 1, "missing_image": 1}
    assert m.extra["failed_examples"]["missing_image"] == [f"val2014/{built.fx.missing}"]
    assert m.extra["failed_examples"]["bad_image"] == [f"train2014/{built.fx.corrupt}"]
    assert set(m.extra["archives"]) == {"train2014.zip", "val2014.zip", "caption_datasets.zip"}
    www = built.root.parent / "www"
    assert m.extra["archives"]["val2014.zip"]["sha256"] == hashlib.sha256(
        (www / "zips" / "val2014.zip").read_bytes()).hexdigest()
    assert "evlp" in m.tools and m.created


def test_progress_stages(built: SimpleNamespace) -> None:
    stages = [e[0] for e in built.events]
    assert "download train2014.zip" in stages and "extract train2014.zip" in stages
    assert "download val2014.zip" not in stages  # done by the first run
    shards = [e for e in built.events if e[0] == "shards"]
    assert shards[-1][1] == shards[-1][2] == sum(built.fx.train_pairs.values()) + 5 + 5  # + the failed captions
    assert [e for e in built.events if e[0] == "index"][-1][1:] == (5, 5)


def test_changed_image_size_rewrites_the_shards(built: SimpleNamespace, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(built.root / "coco", root / "coco")
    before = _mtimes(root / "coco" / "train")
    # no server: everything it needs is already on disk
    offline = CocoSources(train_zip="http://127.0.0.1:9/train2014.zip", val_zip="http://127.0.0.1:9/val2014.zip",
                          karpathy_zip="http://127.0.0.1:9/caption_datasets.zip")
    m = download_coco(root, sources=offline, image_size=0, shard_size=4, keep_archives=False)
    after = _mtimes(root / "coco" / "train")
    assert all(after.get(k) != v for k, v in before.items() if k.endswith(".tar") and k in after)
    shards = sorted((root / "coco" / "train").glob("*.tar"))
    assert len(shards) == m.counts["train"]["shards"] > built.manifest.counts["train"]["shards"]
    assert count_samples(shards) == sum(built.fx.train_pairs.values())
    sample = _samples(shards[0])[0]
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == built.fx.sizes[meta["cocoid"]]  # original bytes
    assert not list((root / "coco" / "_downloads").glob("*.zip"))
    assert all(a["deleted"] for a in m.extra["archives"].values())
    assert m.extra["archives"]["val2014.zip"]["sha256"] == built.manifest.extra["archives"]["val2014.zip"]["sha256"]


def test_rerun_rewrites_only_the_unfinished_shard(built: SimpleNamespace, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(built.root / "coco", root / "coco")
    train = root / "coco" / "train"
    (train / "00002_stats.json").unlink()  # as if the run stopped between the tar and its stats
    (train / ".00003.tar.999.tmp").write_bytes(b"half a tar")  # or in the middle of a tar
    (train / "00099.tar").write_bytes(b"left over from a larger build")
    before = _mtimes(train)
    offline = CocoSources(train_zip="http://127.0.0.1:9/train2014.zip", val_zip="http://127.0.0.1:9/val2014.zip",
                          karpathy_zip="http://127.0.0.1:9/caption_datasets.zip")
    download_coco(root, sources=offline, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE)
    after = _mtimes(train)
    assert {k for k in after if after[k] != before.get(k)} == {"00002.tar", "00002_stats.json"}
    assert not (train / ".00003.tar.999.tmp").exists() and not (train / "00099.tar").exists()
    assert (train / "00002.tar").read_bytes() == (built.root / "coco" / "train" / "00002.tar").read_bytes()


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_size=-1.*shard_size=0"):
        download_coco(tmp_path, image_size=-1, shard_size=0)
    assert not (tmp_path / "coco").exists()


def test_coco_shards_pretrain(built: SimpleNamespace, tmp_path: Path) -> None:
    from evlp.config import PretrainConfig, load_config
    from evlp.train.pretrain import pretrain

    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, "tiny", [
        f"data.root={built.root}", "data.train=[coco]", "data.val=coco", "data.val_split=test",
        "train.max_steps=2", "train.batch_size=4", "data.num_workers=0", "loss.memory_bank_size=32",
        f"out={out}"], command="pretrain")
    result = pretrain(cfg)
    assert result.steps == 2
    report = json.loads((out / "eval" / "retrieval.json").read_text())
    assert report["split"] == "test" and report["metrics"]  # retrieval ran on the 3 test images
    assert result.eval is not None
    assert (out / "summary.json").is_file()


def test_tar_members_are_plain(built: SimpleNamespace) -> None:
    shard = sorted((built.root / "coco" / "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        names = tf.getnames()
    assert names[0].endswith(".jpg") and names[1].endswith(".txt") and names[2].endswith(".json")
