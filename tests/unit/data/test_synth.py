"""evlp.data.synth: layout, determinism, held-out test images, and captions that are true to the pixels."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evlp.data import synth
from evlp.data.synth import (SYNTH_COLORS, SYNTH_SHAPES, SYNTH_WORDS, describe_scene, render_scene,
                             sample_scene, scene_captions, synthesize)
from evlp.errors import ConfigError

PARAMS = dict(n_train=300, n_test=40, n_val=20, seed=3, image_size=64, captions_per_image=5, shard_size=128)
NAMES = list(SYNTH_COLORS)
PALETTE = np.array([SYNTH_COLORS[n] for n in NAMES], dtype=float)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synthesize(out, **PARAMS)
    return out


def _train_samples(root: Path) -> list[tuple[str, bytes, str, dict]]:
    samples = []
    for shard in sorted((root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in members}):
            samples.append((key, members[f"{key}.jpg"], members[f"{key}.txt"].decode("utf-8"),
                            json.loads(members[f"{key}.json"])))
    return samples


def _index(root: Path, split: str) -> dict:
    return json.loads((root / split / "karpathy.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- an independent caption parser
SIZE = {"small": "small", "little": "small", "large": "large", "big": "large"}
REL = {"to the left of": "left", "left of": "left", "on the left of": "left", "to the right of": "right",
       "right of": "right", "on the right of": "right", "above": "above", "over": "above",
       "below": "below", "under": "below", "beneath": "below"}
PRONOUN = {"to its left": "left", "on its left": "left", "to its right": "right", "on its right": "right",
           "above it": "above", "below it": "below", "under it": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def parse(caption: str) -> tuple[list[dict], str | None, str | None]:
    """Mentions [{size, color, shape}], the background colour and where mention 0 lies w.r.t. mention 1."""
    w = caption.split()
    mentions, background = [], None
    for i in range(len(w) - 1):
        if w[i] in SYNTH_COLORS and w[i + 1] in SYNTH_SHAPES:
            size = SIZE.get(w[i - 1]) if i > 0 else None
            mentions.append({"size": size, "color": w[i], "shape": w[i + 1],
                             "start": i - (size is not None), "end": i + 2})
        if w[i] in SYNTH_COLORS and w[i + 1] == "background":
            background = w[i]
    relation = None
    if len(mentions) == 2:
        between = " ".join(x for x in w[mentions[0]["end"]:mentions[1]["start"]] if x not in ("a", "an"))
        tail = " ".join(w[mentions[1]["end"]:])
        if between in REL:
            relation = REL[between]
        elif between == "with":
            relation = next((OPPOSITE[r] for p, r in PRONOUN.items() if tail.startswith(p)), None)
            assert relation is not None, caption
        else:
            assert between == "and", caption
    return mentions, background, relation


# ---------------------------------------------------------------- an independent look at the pixels
def _labels(jpg: bytes) -> np.ndarray:
    arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=float)
    dist = np.sqrt(((arr[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1))  # (H, W, C)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > 60] = -1  # JPEG blends at the edges belong to no colour
    return labels


def _shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = m.shape
    fill, widths = m.mean(), m.sum(1)
    if fill > 0.9:
        return "square"
    if fill < 0.47:
        return "star"
    if fill > 0.72:
        return "circle"
    if (widths > 0.9 * w).mean() > 0.25:
        return "cross"
    return "triangle" if widths.argmax() > 0.75 * h else "diamond"


def _box(mask: np.ndarray) -> tuple[float, float, int]:
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, max(np.ptp(xs), np.ptp(ys)) + 1


def check_caption_against_pixels(caption: str, jpg: bytes) -> None:
    mentions, background, relation = parse(caption)
    labels = _labels(jpg)
    corners = {NAMES[labels[y, x]] for y in (0, -1) for x in (0, -1)}
    assert len(corners) == 1, caption
    bg = corners.pop()
    assert background in (None, bg), (caption, bg)
    assert 1 <= len(mentions) <= 2, caption
    present = {NAMES[c] for c in np.unique(labels) if c >= 0 and (labels == c).sum() >= 40} - {bg}
    assert {m["color"] for m in mentions} == present, (caption, present)  # every object is mentioned
    colors = [m["color"] for m in mentions]
    boxes = []
    for m in mentions:
        if colors.count(m["color"]) > 1:  # same colour, different shape: the masks merge
            continue
        mask = labels == NAMES.index(m["color"])
        assert _shape_of(mask) == m["shape"], caption
        cx, cy, extent = _box(mask)
        if m["size"] == "large":
            assert extent >= 24, caption
        elif m["size"] == "small":
            assert extent <= 21, caption
        boxes.append((cx, cy))
    if relation is not None and len(boxes) == 2:
        dx, dy = boxes[0][0] - boxes[1][0], boxes[0][1] - boxes[1][1]
        expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert relation == expected, (caption, dx, dy)


# ---------------------------------------------------------------- tests
def test_layout_and_counts(data: Path) -> None:
    manifest = json.loads((data / "MANIFEST.json").read_text())
    assert manifest["dataset"] == "synth" and manifest["seed"] == 3 and manifest["image_size"] == 64
    assert manifest["splits"] == {"train": {"samples": 300, "shards": 3},
                                  "test": {"images": 40, "captions": 200},
                                  "val": {"images": 20, "captions": 100}}
    assert {"created", "evlp_version"} <= set(manifest)
    shards = sorted((data / "train").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    for shard, n in zip(shards, (128, 128, 44)):
        stats = json.loads(shard.with_name(f"{shard.stem}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == n
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len(names) == 3 * n and all(re.fullmatch(r"\d{9}\.(jpg|txt|json)", x) for x in names)
    samples = _train_samples(data)
    assert [int(k) for k, *_ in samples] == list(range(300))  # global, contiguous keys across shards
    for key, jpg, txt, meta in samples[:20]:
        assert meta == {**meta, "key": key, "caption": txt, "width": 64, "height": 64, "status": "success"}
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    assert not list(data.rglob("*.tmp")) and not list(data.glob(".*"))  # nothing half-written left


def test_karpathy_layout(data: Path) -> None:
    for split, n in (("test", 40), ("val", 20)):
        index = _index(data, split)
        assert index["dataset"] == "synth" and len(index["images"]) == n
        sentids = []
        for imgid, entry in enumerate(index["images"]):
            assert entry["filepath"] == "images" and entry["filename"] == f"{imgid:06d}.jpg"
            assert entry["imgid"] == imgid and entry["split"] == split
            raws = [s["raw"] for s in entry["sentences"]]
            assert len(set(raws)) == 5  # distinct captions
            assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
            assert all(s["imgid"] == imgid and s["tokens"] == s["raw"].split() for s in entry["sentences"])
            sentids += entry["sentids"]
            with Image.open(data / split / "images" / entry["filename"]) as img:
                assert img.size == (64, 64)
        assert len(set(sentids)) == len(sentids) == 5 * n


def test_caption_words(data: Path) -> None:
    captions = [txt for _, _, txt, _ in _train_samples(data)]
    captions += [s["raw"] for split in ("test", "val") for e in _index(data, split)["images"]
                 for s in e["sentences"]]
    for caption in captions:
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
        assert set(caption.split()) <= SYNTH_WORDS, caption
    assert {"red", "circle", "left", "above", "background"} <= SYNTH_WORDS
    assert len(SYNTH_SHAPES) >= 5 and len(SYNTH_COLORS) >= 7


def test_captions_are_true_to_the_pixels(data: Path) -> None:
    for _, jpg, txt, _ in _train_samples(data)[:150]:
        check_caption_against_pixels(txt, jpg)
    for entry in _index(data, "test")["images"][:20]:
        jpg = (data / "test" / "images" / entry["filename"]).read_bytes()
        for sentence in entry["sentences"]:
            check_caption_against_pixels(sentence["raw"], jpg)


def test_held_out_images_never_repeat(data: Path) -> None:
    train = {hashlib.sha256(jpg).digest() for _, jpg, _, _ in _train_samples(data)}
    held = [hashlib.sha256(p.read_bytes()).digest()
            for s in ("test", "val") for p in (data / s / "images").iterdir()]
    assert not train & set(held)
    assert len(set(held)) == len(held)


def test_held_out_scenes_are_redrawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # shrink the scene space to 60 scenes so that train and test would collide without the re-draw
    pool = [sample_scene(random.Random(i), 64) for i in range(60)]
    monkeypatch.setattr(synth, "sample_scene", lambda rng, size: pool[rng.randrange(len(pool))])
    out = synthesize(tmp_path / "ds", **{**PARAMS, "n_train": 40, "n_test": 12, "n_val": 6}).out
    train = {hashlib.sha256(jpg).digest() for _, jpg, _, _ in _train_samples(out)}
    held = [hashlib.sha256(p.read_bytes()).digest()
            for s in ("test", "val") for p in (out / s / "images").iterdir()]
    assert len(train) < 40  # the train split repeats scenes, as expected from so small a pool
    assert not train & set(held) and len(set(held)) == len(held) == 18


def test_deterministic(data: Path, tmp_path: Path) -> None:
    same = synthesize(tmp_path / "same", **PARAMS)
    for rel in ("train/00001.tar", "train/00002.tar", "test/karpathy.json", "val/karpathy.json",
                "test/images/000007.jpg"):
        assert (data / rel).read_bytes() == (same.out / rel).read_bytes(), rel
    other = synthesize(tmp_path / "other", **{**PARAMS, "seed": 4})
    assert (data / "train/00000.tar").read_bytes() != (other.out / "train/00000.tar").read_bytes()
    assert (data / "test/karpathy.json").read_bytes() != (other.out / "test/karpathy.json").read_bytes()


def test_idempotent(data: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    result = synthesize(data, **PARAMS)
    assert result.reused and result.images == {"train": 300, "test": 40, "val": 20}
    assert result.captions == {"train": 300, "test": 200, "val": 100}
    assert result.shards == [data / "train" / f"{j:05d}.tar" for j in range(3)]
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()} == before


def test_resumes_after_interruption(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_write_index_split", crash)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "ds", **PARAMS)
    assert not (tmp_path / "ds" / "MANIFEST.json").exists()
    monkeypatch.undo()
    result = synthesize(tmp_path / "ds", **PARAMS)
    assert not result.reused
    for rel in ("train/00000.tar", "test/karpathy.json", "val/images/000003.jpg"):
        assert (data / rel).read_bytes() == (result.out / rel).read_bytes(), rel


def test_refuses_foreign_or_different_folder(data: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="empty folder"):
        synthesize(foreign, **PARAMS)
    with pytest.raises(ConfigError, match="seed 3->5"):
        synthesize(data, **{**PARAMS, "seed": 5})
    with pytest.raises(ConfigError, match="is a file"):
        synthesize(foreign / "notes.txt", **PARAMS)


@pytest.mark.parametrize("bad", [{"captions_per_image": 0}, {"image_size": 16}, {"shard_size": 0},
                                 {"n_test": -1}])
def test_rejects_bad_values(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        synthesize(tmp_path / "x", **{**PARAMS, **bad})


@pytest.mark.parametrize("size", [32, 64, 96])
def test_scenes_are_well_formed(size: int) -> None:
    for i in range(300):
        rng = random.Random(i)
        scene = sample_scene(rng, size)
        img = np.asarray(render_scene(scene))
        assert tuple(img[0, 0]) == SYNTH_COLORS[scene.background]
        for o in scene.objects:
            assert o.color != scene.background
            assert 0 < o.x and o.x + o.extent < size and 0 < o.y and o.y + o.extent < size
            cx, cy = o.center
            assert tuple(img[int(cy), int(cx)]) == SYNTH_COLORS[o.color]
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert (a.shape, a.color) != (b.shape, b.color)
            apart_x = a.x + a.extent < b.x or b.x + b.extent < a.x
            apart_y = a.y + a.extent < b.y or b.y + b.extent < a.y
            assert apart_x or apart_y  # no overlap
            dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
            if scene.relation in ("left", "right"):
                assert abs(dx) >= 2 * abs(dy) and (dx < 0) == (scene.relation == "left")
            else:
                assert abs(dy) >= 2 * abs(dx) and (dy < 0) == (scene.relation == "above")
        captions = scene_captions(scene, rng, 10)
        assert len(set(captions)) == 10
        for caption in captions + [describe_scene(scene, rng)]:
            mentions, background, relation = parse(caption)
            assert background in (None, scene.background)
            truth = {(o.color, o.shape): o for o in scene.objects}
            assert len(mentions) == len(scene.objects)
            assert {(m["color"], m["shape"]) for m in mentions} == set(truth)
            for m in mentions:
                assert m["size"] in (None, truth[(m["color"], m["shape"])].size)
            if relation is not None:
                first = truth[(mentions[0]["color"], mentions[0]["shape"])]
                assert relation == (scene.relation if first is scene.objects[0] else OPPOSITE[scene.relation])
