"""`bench_data`: what it measures and reports (no timed assertions: the rates only have to be rates)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evlp.bench.data import _DecodeImage, bench_data
from evlp.config.schema import PretrainConfig
from evlp.data.handover import loader_ring
from evlp.data.pairs import DecodeSample
from evlp.data.seeding import seeded
from evlp.data.transforms import train_transform
from evlp.errors import ConfigError, DataNotFoundError

KEYS = {"images_per_s", "per_worker_images_per_s", "decode_images_per_s", "images", "seconds", "workers",
        "image_sizes", "source", "draft"}


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _shards(folder: Path, sizes: list[tuple[int, int]], per_shard: int) -> Path:
    folder.mkdir()
    for s in range(0, len(sizes), per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for k, (w, h) in enumerate(sizes[s:s + per_shard], start=s):
                for ext, data in (("jpg", _jpeg(w, h, k)), ("txt", f"caption {k}".encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _small_config() -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model.image.img_size = 32  # small outputs keep the test fast; the pipeline is the same
    return cfg


def test_shards_in_process(tmp_path: Path) -> None:
    sizes = [(64, 48), (40, 80), (96, 96)] * 8
    data = _shards(tmp_path / "shards", sizes, per_shard=12)
    r = bench_data(data, workers=0, images=20, batch_size=8, config=_small_config(), decode_images=10)
    assert KEYS <= r.keys()
    assert r["source"] == "shards" and r["inputs"] == 2 and r["workers"] == 0 and r["img_size"] == 32
    assert r["images"] == 24  # 20 rounded up to whole batches of 8
    assert r["images_per_s"] > 0 and r["per_worker_images_per_s"] == r["images_per_s"]
    assert r["decode_images_per_s"] > 0 and r["decode_images"] % 10 == 0  # whole passes over 10 images
    # the decode figure looked at the first 10 samples in shard order: sizes[:10]
    assert r["image_sizes"] == {"min": [64, 48], "median": [40, 80], "max": [96, 96]}  # by area
    assert r["pipeline_vs_decode"] == pytest.approx(r["per_worker_images_per_s"] / r["decode_images_per_s"])
    rounds = r["decode_rounds_images_per_s"]  # before and after the pipeline: the faster is the reference
    assert len(rounds) == 2 and r["decode_images_per_s"] == pytest.approx(max(rounds))
    assert r["decode_images_per_s"] == pytest.approx(r["decode_images"] / r["decode_seconds"])


def test_folder_of_images_with_workers(tmp_path: Path) -> None:
    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    for k, size in enumerate([(120, 90), (100, 130), (200, 150)]):
        (folder / f"{k}.jpg").write_bytes(_jpeg(*size, seed=k))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # skipped, not fatal
    (folder / "notes.txt").write_text("ignored")
    r = bench_data(tmp_path / "imgs", workers=2, images=12, batch_size=4, config=_small_config(), draft=False)
    assert r["source"] == "files" and r["inputs"] == 4 and r["draft"] is False
    assert r["warmup_batches"] == 2 * loader_ring(2, 2).slots  # each worker's buffers written once by default
    assert 9 <= r["images"] <= 12  # 3 batches of 4, less the broken file's turns
    assert r["per_worker_images_per_s"] == pytest.approx(r["images_per_s"] / 2)
    assert r["image_sizes"]["max"] == [200, 150] and r["image_sizes"]["min"] == [120, 90]


def test_bench_decodes_what_pretraining_decodes() -> None:
    data = _jpeg(900, 700, seed=1)
    tf = train_transform(224)
    for draft in (True, False):
        with seeded(0, 1):
            ours = _DecodeImage(tf, draft)({"jpg": data, "txt": b"x"}, "k")
        with seeded(0, 1):
            theirs = DecodeSample(tf)({"jpg": data, "txt": b"x"}, "k")[0]
        # with draft, the very pipeline; without, the full decode that draft approximates
        assert torch.equal(ours, theirs) if draft else (ours - theirs).abs().mean() < 0.05


def test_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="evlp data synth"):
        bench_data(tmp_path / "empty")
    with pytest.raises(DataNotFoundError):
        bench_data(tmp_path / "missing")
    with pytest.raises(ConfigError) as err:
        bench_data(tmp_path / "empty", workers=-1, batch_size=0)
    assert len(err.value.problems) == 2
