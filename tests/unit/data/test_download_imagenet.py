"""evlp.data.download.imagenet: HF archives and ImageFolder copies -> ROOT/imagenet, safely and resumably."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from evlp.data.download.archive import UnsafeArchiveError
from evlp.data.download.imagenet import download_imagenet
from evlp.data.download.manifest import read_manifest
from evlp.errors import DataNotFoundError


def _synsets() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


SYNSETS = _synsets()
WNIDS = [SYNSETS[0], SYNSETS[417], SYNSETS[999]]  # tench, balloon, toilet tissue: first, middle, last index


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, "JPEG")
    return buf.getvalue()


def _tar_gz(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return path


# file name inside HF's archive -> (split, wnid, restored name)
TRAIN_0 = {f"{w}_{100 + i}_{w}.JPEG": ("train", w, f"{w}_{100 + i}.JPEG") for w in WNIDS for i in range(2)}
TRAIN_1 = {f"{WNIDS[0]}_{200 + i}_{WNIDS[0]}.JPEG": ("train", WNIDS[0], f"{WNIDS[0]}_{200 + i}.JPEG")
           for i in range(2)}
VAL = {f"ILSVRC2012_val_{i + 1:08d}_{w}.JPEG": ("val", w, f"ILSVRC2012_val_{i + 1:08d}.JPEG")
       for i, w in enumerate(WNIDS)}


@pytest.fixture()
def hf_archives(tmp_path: Path) -> Path:
    """HF-style archives: two train parts (one in a sub-folder, as some mirrors do) and the val archive, plus
    an image of a class outside ImageNet-1k and a stray text file."""
    src = tmp_path / "hf"
    src.mkdir()
    names = list(TRAIN_0) + list(TRAIN_1) + list(VAL)
    data = {name: jpeg(i) for i, name in enumerate(names)}
    _tar_gz(src / "train_images_0.tar.gz", {**{f"train/{n}": data[n] for n in TRAIN_0},
                                            "train/n99999999_1_n99999999.JPEG": jpeg(99), "train/README.txt": b"hi"})
    _tar_gz(src / "train_images_1.tar.gz", {n: data[n] for n in TRAIN_1})
    _tar_gz(src / "val_images.tar.gz", {n: data[n] for n in VAL})
    return src


def _layout(folder: Path) -> dict[tuple[str, str, str], bytes]:
    return {(p.parent.parent.name, p.parent.name, p.name): p.read_bytes()
            for p in folder.glob("*/*/*") if p.is_file() and p.parent.parent.name in ("train", "val")}


def test_hf_archives_become_an_image_folder(tmp_path: Path, hf_archives: Path) -> None:
    with pytest.warns(RuntimeWarning, match="n99999999"):
        manifest = download_imagenet(tmp_path / "data", from_dir=hf_archives)
    folder = tmp_path / "data" / "imagenet"

    names = list(TRAIN_0) + list(TRAIN_1) + list(VAL)
    expected = {}
    for i, name in enumerate(names):
        split, wnid, restored = {**TRAIN_0, **TRAIN_1, **VAL}[name]
        expected[(split, wnid, restored)] = jpeg(i)
    assert _layout(folder) == expected

    classes = json.loads((folder / "classes.json").read_text())
    assert classes == _synsets() and classes == sorted(classes) and len(classes) == 1000
    assert manifest.counts["train"]["images"] == 8 and manifest.counts["train"]["classes"] == 3
    assert manifest.counts["val"] == {"images": 3, "classes": 3, "per_class_min": 1, "per_class_max": 1}
    assert manifest.extra["per_class"]["train"] == {WNIDS[0]: 4, WNIDS[1]: 2, WNIDS[2]: 2}
    missing = manifest.extra["missing_classes"]["val"]
    assert len(missing) == 997 and not set(WNIDS) & set(missing) and missing == sorted(missing)
    assert manifest.extra["unknown_classes"] == ["n99999999"]
    assert manifest.failures == {"not_image": 1, "unknown_class": 1}
    assert manifest.extra["method"] == "extract"
    assert {"evlp", "timm"} <= set(manifest.tools)
    assert read_manifest(folder) == manifest
    assert not list(folder.rglob("*.part")) and not (folder / "train" / "n99999999").exists()


def test_rerun_does_nothing(tmp_path: Path, hf_archives: Path) -> None:
    with pytest.warns(RuntimeWarning):
        download_imagenet(tmp_path, from_dir=hf_archives)
    folder = tmp_path / "imagenet"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.JPEG")}
    stages: list[str] = []
    with pytest.warns(RuntimeWarning):  # the unknown class is still reported, from the archive's record
        again = download_imagenet(tmp_path, from_dir=hf_archives, progress=lambda s, d, t: stages.append(s))
    assert not [s for s in stages if s.startswith("extract")]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.JPEG")} == before
    assert again.counts == read_manifest(folder).counts and again.counts["train"]["images"] == 8


def test_interrupted_archive_resumes(tmp_path: Path, hf_archives: Path) -> None:
    with pytest.warns(RuntimeWarning):
        download_imagenet(tmp_path, from_dir=hf_archives)
    folder = tmp_path / "imagenet"
    marker = folder / "_downloads" / ".done-train_images_1.tar.gz.json"
    marker.unlink()  # as if killed while streaming this archive, one image not yet written
    lost = folder / "train" / WNIDS[0] / f"{WNIDS[0]}_201.JPEG"
    lost.unlink()
    with pytest.warns(RuntimeWarning):
        manifest = download_imagenet(tmp_path, from_dir=hf_archives)
    assert lost.is_file() and marker.is_file()
    assert json.loads(marker.read_text())["written"] == 1  # only the missing image
    assert manifest.counts["train"]["images"] == 8


def test_image_folder_input_is_linked(tmp_path: Path) -> None:
    src = tmp_path / "ilsvrc"
    for split, n in (("train", 3), ("val", 1)):
        for j, wnid in enumerate(WNIDS[:2]):
            (src / split / wnid).mkdir(parents=True)
            for i in range(n):
                (src / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(10 * j + i))
    (src / "train" / "n99999999").mkdir()
    (src / "train" / "n99999999" / "x.JPEG").write_bytes(jpeg(1))
    with pytest.warns(RuntimeWarning, match="n99999999"):
        manifest = download_imagenet(tmp_path / "data", from_dir=src)
    folder = tmp_path / "data" / "imagenet"
    for original in src.glob("*/n0*/*.JPEG"):
        linked = folder / original.relative_to(src)
        assert linked.read_bytes() == original.read_bytes()
        assert os.path.samefile(linked, original)  # a hard link (same filesystem), not a copy
    assert manifest.extra["method"] == "hardlink" and manifest.extra["linked"]["hardlink"] == 8
    assert manifest.counts["train"]["images"] == 6 and manifest.counts["val"]["images"] == 2
    assert not (folder / "train" / "n99999999").exists()
    assert json.loads((folder / "classes.json").read_text()) == _synsets()


def test_from_dir_without_either_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="train_images"):
        download_imagenet(tmp_path / "data", from_dir=tmp_path / "empty")


def test_hub_offline_says_what_to_do(tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(DataNotFoundError) as info:
        download_imagenet(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "hf auth login" in message and "--token" in message and "--from-dir" in message
    assert "huggingface.co/datasets/ILSVRC/imagenet-1k" in message


@pytest.mark.parametrize("bad", ["../n01440764_1_n01440764.JPEG", "/tmp/n01440764_1_n01440764.JPEG", "symlink"])
def test_unsafe_member_is_refused(tmp_path: Path, bad: str) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    if bad == "symlink":
        _tar_gz(src / "val_images.tar.gz", {}, links={f"ILSVRC2012_val_00000001_{WNIDS[0]}.JPEG": "/etc/passwd"})
    else:
        _tar_gz(src / "val_images.tar.gz", {bad: jpeg(0)})
    with pytest.raises(UnsafeArchiveError, match="refus"):
        download_imagenet(tmp_path / "data", from_dir=src)
    assert not (tmp_path / "data" / "imagenet" / "_downloads" / ".done-val_images.tar.gz.json").exists()
    assert not list((tmp_path / "data").rglob("*.JPEG")) and not (tmp_path / "n01440764_1_n01440764.JPEG").exists()


def test_damaged_archive(tmp_path: Path, hf_archives: Path) -> None:
    data = (hf_archives / "val_images.tar.gz").read_bytes()
    (hf_archives / "val_images.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataNotFoundError, match="val_images.tar.gz is damaged"):
        download_imagenet(tmp_path / "data", from_dir=hf_archives)
