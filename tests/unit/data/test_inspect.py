"""evlp.data.inspect: ``data_info`` tables a data root; ``verify_data`` finds exactly the damage done to it."""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image

from evlp.data.download.glue import download_glue
from evlp.data.download.imagenet import download_imagenet
from evlp.data.inspect import DatasetInfo, data_info, verify_data
from evlp.data.shards import index_shard
from evlp.data.synth import synthesize
from evlp.errors import DataNotFoundError, UnknownNameError
from tests.unit.data.test_download_glue import expected_rows, write_glue
from tests.unit.data.test_download_imagenet import WNIDS, jpeg


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """synth (64 train samples in 2 shards, 8 test images x 5 captions), glue/cola, imagenet (2 classes)."""
    data = tmp_path / "data"
    synthesize(data / "synth", n_train=64, n_test=8, shard_size=32)
    download_glue(data, task="cola", from_dir=write_glue(tmp_path / "glue_src", only=["CoLA"]))
    src = tmp_path / "ilsvrc"
    for split, n in (("train", 3), ("val", 2)):
        for j, wnid in enumerate(WNIDS[:2]):
            (src / split / wnid).mkdir(parents=True)
            for i in range(n):
                (src / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(10 * j + i))
    download_imagenet(data, from_dir=src)
    return data


def _by_name(infos: list[DatasetInfo]) -> dict[str, DatasetInfo]:
    return {i.name: i for i in infos}


def test_info_tables_the_root(root: Path, tmp_path: Path) -> None:
    infos = _by_name(data_info(root))
    assert sorted(infos) == ["glue/cola", "imagenet", "synth"]

    synth = infos["synth"]
    assert synth.kind == "shards+karpathy" and synth.manifest and synth.missing == []
    assert synth.splits == {"train": {"shards": 2, "samples": 64}, "test": {"images": 8, "captions": 40}}
    assert synth.bytes == sum(p.stat().st_size for p in (root / "synth").rglob("*") if p.is_file())

    cola = infos["glue/cola"]
    src = tmp_path / "glue_src" / "glue_data"
    assert cola.kind == "glue" and cola.manifest and cola.missing == []
    assert cola.splits == {split: {"rows": len(expected_rows(src, "cola", f"{file}.tsv")[0])}
                           for split, file in (("train", "train"), ("validation", "dev"), ("test", "test"))}

    imagenet = infos["imagenet"]
    assert imagenet.kind == "imagefolder" and imagenet.manifest
    assert imagenet.splits == {"train": {"classes": 2, "images": 6}, "val": {"classes": 2, "images": 4}}
    assert imagenet.missing == ["train: 998 of 1000 classes", "val: 998 of 1000 classes"]
    assert imagenet.bytes > 0


def test_info_reports_missing_parts(root: Path) -> None:
    shutil.rmtree(root / "imagenet" / "val")
    (root / "glue" / "cola" / "test.jsonl").unlink()
    (root / "coco" / "train").mkdir(parents=True)  # coco with shards only: no karpathy.json
    shutil.copy(root / "synth" / "train" / "00000.tar", root / "coco" / "train" / "00000.tar")
    infos = _by_name(data_info(root))
    assert "val/" in infos["imagenet"].missing and "val" not in infos["imagenet"].splits
    assert infos["glue/cola"].missing == ["test.jsonl"]
    coco = infos["coco"]
    assert coco.kind == "shards" and not coco.manifest and coco.missing == ["karpathy.json"]
    assert coco.splits == {"train": {"shards": 1, "samples": 32}}  # no stats file: the tar headers are read


def test_verify_clean_then_damaged(root: Path) -> None:
    reports = {r.dataset: r for r in verify_data(root)}
    assert all(r.ok and r.problems == [] for r in reports.values()), reports
    cola_rows = sum(1 for p in (root / "glue" / "cola").glob("*.jsonl") for _ in p.open())
    assert reports["synth"].checked == 64 + 8
    assert reports["imagenet"].checked == 10 and reports["glue/cola"].checked == cola_rows

    # 1. overwrite the start of one JPEG member inside a shard (the tar stays well-formed)
    shard = root / "synth" / "train" / "00001.tar"
    sample = index_shard(shard)[5]
    offset, _ = sample.members["jpg"]
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * 16)
    # 2. delete one image of the Karpathy test index
    (root / "synth" / "test" / "images" / "000003.jpg").unlink()
    # 3. cut the last line of a GLUE file in half
    jsonl = root / "glue" / "cola" / "validation.jsonl"
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    jsonl.write_text("\n".join(lines[:-1] + [lines[-1][: len(lines[-1]) // 2]]) + "\n", encoding="utf-8")

    stages: list[str] = []
    reports = {r.dataset: r for r in verify_data(root, progress=lambda s, d, t: stages.append(s))}
    synth = reports["synth"]
    assert not synth.ok and len(synth.problems) == 2
    assert synth.problems[0].startswith(f"bad_image: train/00001.tar:{sample.key}.jpg:")
    assert synth.problems[1] == "missing_image: test/images/000003.jpg (listed in test/karpathy.json)"
    cola = reports["glue/cola"]
    assert not cola.ok and len(cola.problems) == 1
    assert cola.problems[0].startswith(f"bad_json: validation.jsonl:{len(lines)}:")
    assert reports["imagenet"].ok
    assert {"verify synth", "verify glue/cola", "verify imagenet"} <= set(stages)


def test_verify_counts_and_many_problems(root: Path) -> None:
    (root / "imagenet" / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()  # the manifest says 4 val images
    for i in range(12):  # 12 broken images: 10 listed, then one total line
        (root / "imagenet" / "train" / WNIDS[1] / f"broken_{i:02d}.JPEG").write_bytes(b"not a jpeg")
    report = verify_data(root, datasets=["imagenet"])[0]
    assert report.dataset == "imagenet" and not report.ok and report.checked == 9 + 12
    bad = [p for p in report.problems if p.startswith("bad_image")]
    assert len(bad) == 11 and bad[-1] == "bad_image: ... and 2 more (12 in all)"
    assert "count: train: 18 images on disk, MANIFEST.json says 6" in report.problems
    assert "count: val: 3 images on disk, MANIFEST.json says 4" in report.problems


def test_verify_catches_a_truncated_image_when_decoding(root: Path) -> None:
    path = root / "imagenet" / "val" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    buf = io.BytesIO()
    Image.effect_noise((96, 96), 64).convert("RGB").save(buf, "JPEG")  # mostly entropy-coded data
    data = buf.getvalue()
    path.unlink()  # it is a hard link to the source: replace it rather than cut the original
    path.write_bytes(data[: len(data) * 2 // 3])
    decoded = verify_data(root, datasets=["imagenet"])[0]
    assert [p.split(":")[0] for p in decoded.problems] == ["bad_image"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert verify_data(root, datasets=["imagenet"], decode=False)[0].ok  # headers alone look fine


def test_names_and_missing_root(root: Path, tmp_path: Path) -> None:
    assert [r.dataset for r in verify_data(root, datasets=["glue"])] == ["glue/cola"]
    with pytest.raises(UnknownNameError, match="did you mean 'synth'"):
        verify_data(root, datasets=["synt"])
    with pytest.raises(DataNotFoundError, match="does not exist"):
        data_info(tmp_path / "nowhere")
