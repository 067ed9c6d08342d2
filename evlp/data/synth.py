"""A synthetic image-caption dataset that a tiny model can learn in minutes on a CPU.

Each image is a plain background with one or two non-overlapping filled shapes; every caption is a
true English description of it ("a big red circle to the left of a small blue square"). The train
split is written as img2dataset-style webdataset shards, the test/val splits as Karpathy-style
retrieval indexes, so the same readers serve the synthetic and the real data.

Everything depends only on the seed and the sizes: each image has its own random stream (seed, split,
index); held-out scenes that repeat a train scene (or each other) are re-drawn.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from evlp._version import __version__
from evlp.data.download.shardwriter import EncodedImage, ShardSample, shard_is_complete, write_shard
from evlp.errors import ConfigError
from evlp.io import write_json

__all__ = ["SYNTH_COLORS", "SYNTH_SHAPES", "SYNTH_WORDS", "Scene", "SynthObject", "SynthResult",
           "describe_scene", "render_scene", "sample_scene", "scene_captions", "synthesize"]

# Bump when the generator changes, so an old folder is not mistaken for the new data.
_GENERATOR_VERSION = 1
_JPEG_QUALITY = 90
_PARTIAL = ".synth_partial.json"
_MAX_CAPTIONS = 10

SYNTH_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 25), "yellow": (240, 220, 40), "green": (40, 165, 60),
    "blue": (40, 80, 220), "purple": (135, 55, 185), "pink": (245, 135, 195), "white": (245, 245, 245),
    "gray": (128, 128, 128), "black": (20, 20, 20),
}
SYNTH_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
_SIZES = ("small", "large")
_COLOR_NAMES = tuple(SYNTH_COLORS)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    raw = [((1.0 if i % 2 == 0 else inner) * math.cos(-math.pi / 2 + i * math.pi / points),
            (1.0 if i % 2 == 0 else inner) * math.sin(-math.pi / 2 + i * math.pi / points))
           for i in range(2 * points)]
    xs, ys = [p[0] for p in raw], [p[1] for p in raw]
    # stretch to fill the unit box so the box centre lies inside the star's inner pentagon
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in raw]


_A, _B = 0.5 - 0.18, 0.5 + 0.18  # cross arm edges
_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "cross": [(_A, 0), (_B, 0), (_B, _A), (1, _A), (1, _B), (_B, _B), (_B, 1), (_A, 1), (_A, _B),
              (0, _B), (0, _A), (_A, _A)],
    "star": _star(),
}

# ---- captions: templates write the article "a" everywhere; _fix_articles turns it into "an" ----
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_REL_WORDS = {"left": ("to the left of", "left of", "on the left of"), "above": ("above", "over"),
              "right": ("to the right of", "right of", "on the right of"),
              "below": ("below", "under", "beneath")}
# where the second-mentioned object lies, seen from the first ("a red circle with a square to its right")
_REL_PRONOUN = {"left": ("to its left", "on its left"), "right": ("to its right", "on its right"),
                "above": ("above it",), "below": ("below it", "under it")}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_ONE_TEMPLATES = (
    "{a}", "{A}", "{a} on a {bg} background", "a photo of {a}", "a photo of {a} on a {bg} background",
    "a picture of {a}", "there is {a} on a {bg} background", "a {bg} background with {a}",
    "a image of {a}", "a single {A} on a {bg} background",
)
_TWO_TEMPLATES = (
    "{a} {rel} {b}", "{a} {rel} {b} on a {bg} background", "a photo of {a} {rel} {b}", "{A} and {B}",
    "{a} and {b} on a {bg} background", "{a} with {b} {pron}", "a {bg} background with {a} and {b}",
    "there is {a} {rel} {b}", "a picture of {a} and {b}", "{A} {rel} {B}",
)
_PHRASES = [p for group in (_SIZE_WORDS, _REL_WORDS, _REL_PRONOUN) for ps in group.values() for p in ps]
SYNTH_WORDS: frozenset[str] = frozenset(
    w for text in (*SYNTH_COLORS, *SYNTH_SHAPES, "an", *_PHRASES, *_ONE_TEMPLATES, *_TWO_TEMPLATES)
    for w in text.split() if not w.startswith("{"))


@dataclass(frozen=True)
class SynthObject:
    """One filled shape: its kind and its bounding square (top-left corner ``x, y``, side ``extent``)."""

    shape: str
    color: str
    size: str
    x: int
    y: int
    extent: int

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the bounding square in pixel coordinates (always a pixel of the shape's colour)."""
        return (self.x + (self.extent - 1) / 2, self.y + (self.extent - 1) / 2)


@dataclass(frozen=True)
class Scene:
    """A background, one or two objects and, with two, where ``objects[0]`` lies w.r.t. ``objects[1]``."""

    canvas: int
    background: str
    objects: tuple[SynthObject, ...]
    relation: str | None = None

    def key(self) -> tuple[Any, ...]:
        """What the rendered image depends on (object order does not matter)."""
        return (self.canvas, self.background, tuple(sorted((o.shape, o.color, o.x, o.y, o.extent)
                                                            for o in self.objects)))


def _extent(rng: random.Random, size: str, canvas: int) -> int:
    lo, hi = (0.27, 0.32) if size == "small" else (0.40, 0.45)
    return rng.randint(round(lo * canvas), round(hi * canvas))


def sample_scene(rng: random.Random, image_size: int = 64) -> Scene:
    """Draw a random scene; two objects are separated along one axis and offset by at most half
    their centre distance along the other, so that the relation between them is unambiguous."""
    s, margin, gap = image_size, max(1, image_size // 64), max(2, image_size // 32)
    background = rng.choice(_COLOR_NAMES)
    palette = [c for c in SYNTH_COLORS if c != background]
    kinds = [(rng.choice(SYNTH_SHAPES), rng.choice(palette), rng.choice(_SIZES))]
    if rng.random() < 0.5:
        e = _extent(rng, kinds[0][2], s)
        pos = rng.randint(margin, s - margin - e), rng.randint(margin, s - margin - e)
        return Scene(s, background, (SynthObject(*kinds[0], *pos, e),))
    while len(kinds) < 2:  # the two objects differ in shape or colour, so a caption can tell them apart
        k = (rng.choice(SYNTH_SHAPES), rng.choice(palette), rng.choice(_SIZES))
        if k[:2] != kinds[0][:2]:
            kinds.append(k)
    ext = [_extent(rng, k[2], s) for k in kinds]
    slack = s - 2 * margin - gap - sum(ext)
    if slack < 0:  # two large objects on a small canvas: shrink the bigger one a little
        ext[ext.index(max(ext))] += slack
        slack = 0
    horizontal = rng.random() < 0.5
    first = rng.randrange(2)  # which object comes first (left or top) along the axis
    along = [0, 0]
    along[first] = rng.randint(margin, margin + slack)
    along[1 - first] = rng.randint(along[first] + ext[first] + gap, s - margin - ext[1 - first])
    c_along = [along[i] + (ext[i] - 1) / 2 for i in range(2)]
    half = abs(c_along[1] - c_along[0]) / 2
    across = [rng.randint(margin, s - margin - ext[0]), 0]
    c0 = across[0] + (ext[0] - 1) / 2
    lo = max(margin, math.ceil(c0 - half - (ext[1] - 1) / 2))
    hi = min(s - margin - ext[1], math.floor(c0 + half - (ext[1] - 1) / 2))
    if lo > hi:  # cannot happen with the extents above; centre-align as a safe fallback
        lo = hi = min(max(round(c0 - (ext[1] - 1) / 2), margin), s - margin - ext[1])
    across[1] = rng.randint(lo, hi)
    if horizontal:
        objs = tuple(SynthObject(*kinds[i], along[i], across[i], ext[i]) for i in range(2))
        relation = "left" if c_along[0] < c_along[1] else "right"
    else:
        objs = tuple(SynthObject(*kinds[i], across[i], along[i], ext[i]) for i in range(2))
        relation = "above" if c_along[0] < c_along[1] else "below"
    return Scene(s, background, objs, relation)


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB PIL image of side ``scene.canvas``."""
    img = Image.new("RGB", (scene.canvas, scene.canvas), SYNTH_COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill, e = SYNTH_COLORS[o.color], o.extent - 1
        if o.shape == "circle":
            draw.ellipse([o.x, o.y, o.x + e, o.y + e], fill=fill)
        elif o.shape == "square":
            draw.rectangle([o.x, o.y, o.x + e, o.y + e], fill=fill)
        else:
            draw.polygon([(o.x + u * e, o.y + v * e) for u, v in _UNIT_POLYGONS[o.shape]], fill=fill)
    return img


def _jpeg(scene: Scene) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 keeps the colours of small shapes clean; the bytes are deterministic for a given image
    render_scene(scene).save(buf, "JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _fix_articles(text: str) -> str:
    words = text.split()
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def _phrase(rng: random.Random, obj: SynthObject) -> str:
    if rng.random() < 0.5:
        return f"{obj.color} {obj.shape}"
    return f"{rng.choice(_SIZE_WORDS[obj.size])} {obj.color} {obj.shape}"


def describe_scene(scene: Scene, rng: random.Random) -> str:
    """One random true caption of ``scene``: a template, optional size words, and either object first."""
    if len(scene.objects) == 1:
        p = _phrase(rng, scene.objects[0])
        text = rng.choice(_ONE_TEMPLATES).format(a=f"a {p}", A=p, bg=scene.background)
        return _fix_articles(text)
    first = rng.randrange(2)
    p1, p2 = _phrase(rng, scene.objects[first]), _phrase(rng, scene.objects[1 - first])
    rel = scene.relation if first == 0 else _OPPOSITE[scene.relation or "left"]
    text = rng.choice(_TWO_TEMPLATES).format(
        a=f"a {p1}", A=p1, b=f"a {p2}", B=p2, bg=scene.background, rel=rng.choice(_REL_WORDS[rel]),
        pron=rng.choice(_REL_PRONOUN[_OPPOSITE[rel]]))
    return _fix_articles(text)


def scene_captions(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """``n`` distinct true captions of ``scene`` (at most 10 are guaranteed to exist)."""
    captions: list[str] = []
    for _ in range(200 * n):
        c = describe_scene(scene, rng)
        if c not in captions:
            captions.append(c)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"found only {len(captions)} distinct captions for {scene}")  # pragma: no cover


@dataclass
class SynthResult:
    """Where :func:`synthesize` wrote what, and how long it took."""

    out: Path
    manifest: Path
    images: dict[str, int]
    captions: dict[str, int]
    shards: list[Path]
    seconds: float
    reused: bool = False


def _shard_plan(first: int, samples: list[tuple[Scene, str]]) -> dict[str, Any]:
    """What a train shard holds (stored in its stats, so that a resumed run can tell it is complete)."""
    return {"dataset": "synth", "generator": _GENERATOR_VERSION, "first": first, "count": len(samples)}


def _write_shard(path: Path, first: int, samples: list[tuple[Scene, str]]) -> None:
    """Write one train shard with the shard writer every downloader uses (keys: global sample numbers)."""
    records = []
    for i, (scene, caption) in enumerate(samples):
        image = EncodedImage(_jpeg(scene), "jpg", scene.canvas, scene.canvas, scene.canvas, scene.canvas)
        records.append(ShardSample(f"{first + i:09d}", image, caption))
    write_shard(path, records, plan=_shard_plan(first, samples))


def _write_index_split(out: Path, split: str, items: list[tuple[Scene, list[str]]]) -> None:
    final = out / split
    if (final / "karpathy.json").is_file():  # complete: the folder appears only by the rename below
        return
    tmp = out / f".{split}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    images, sentid = [], 0
    for imgid, (scene, caps) in enumerate(items):
        filename = f"{imgid:06d}.jpg"
        (tmp / "images" / filename).write_bytes(_jpeg(scene))
        sentids = list(range(sentid, sentid + len(caps)))
        sentid += len(caps)
        images.append({"filepath": "images", "filename": filename, "imgid": imgid, "split": split,
                       "sentids": sentids, "sentences": [{"raw": c, "tokens": c.split(), "imgid": imgid,
                                                          "sentid": j} for c, j in zip(caps, sentids)]})
    write_json(tmp / "karpathy.json", {"dataset": "synth", "images": images}, indent=None)
    if final.exists():  # a leftover of an interrupted run of these same parameters
        shutil.rmtree(final)
    os.replace(tmp, final)


def _check(params: dict[str, int]) -> None:
    problems = [f"{k}={params[k]} must be >= 0" for k in ("n_train", "n_test", "n_val") if params[k] < 0]
    if not 32 <= params["image_size"] <= 1024:
        problems.append(f"image_size={params['image_size']} must be between 32 and 1024")
    if not 1 <= params["captions_per_image"] <= _MAX_CAPTIONS:
        problems.append(f"captions_per_image={params['captions_per_image']} must be between 1 and "
                        f"{_MAX_CAPTIONS}")
    if params["shard_size"] < 1:
        problems.append(f"shard_size={params['shard_size']} must be >= 1")
    if problems:
        raise ConfigError("synth: " + "; ".join(problems) + ".", problems)


def _previous_run(out: Path, params: dict[str, int]) -> dict[str, Any] | None:
    """The matching manifest if ``out`` is complete, None if it is empty or our own partial run."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synth output {out} is a file — choose an empty folder or a new path.")
    if not out.exists() or not any(out.iterdir()):
        return None
    for name in ("MANIFEST.json", _PARTIAL):
        try:
            found = json.loads((out / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(found, dict) or found.get("dataset", "synth") != "synth":
            break
        old = found.get("params")
        if old == params:
            return found if name == "MANIFEST.json" else None
        if isinstance(old, dict):
            diff = ", ".join(f"{k} {old.get(k)}->{v}" for k, v in params.items() if old.get(k) != v)
            raise ConfigError(f"{out} holds a synth dataset with other parameters ({diff}) — choose an "
                              f"empty folder or delete it.")
    raise ConfigError(f"{out} is not empty and holds no synth dataset — choose an empty folder or "
                      f"delete it.")


def synthesize(out: str | Path, *, n_train: int = 20000, n_test: int = 500, n_val: int = 0, seed: int = 0,
               image_size: int = 64, captions_per_image: int = 5, shard_size: int = 2000) -> SynthResult:
    """Write the synthetic dataset to ``out``: ``train/`` shards, ``test/`` (and ``val/``) Karpathy indexes.

    ``out`` must be empty or missing; ``n_*`` count images per split (val only when ``n_val > 0``),
    ``captions_per_image`` (1..10) distinct captions go with each test/val image. A folder already
    holding a complete dataset with the same parameters is returned as is (``reused=True``), and an
    interrupted run with the same parameters resumes. Raises ConfigError for a bad value or when
    ``out`` holds something else.
    """
    start = time.perf_counter()
    out = Path(out)
    params = {"generator": _GENERATOR_VERSION, "seed": seed, "image_size": image_size, "n_train": n_train,
              "n_test": n_test, "n_val": n_val, "captions_per_image": captions_per_image,
              "shard_size": shard_size}
    _check(params)
    n_shards = math.ceil(n_train / shard_size)
    shards = [out / "train" / f"{j:05d}.tar" for j in range(n_shards)]
    images = {"train": n_train, "test": n_test, **({"val": n_val} if n_val else {})}
    captions = {"train": n_train, "test": n_test * captions_per_image,
                **({"val": n_val * captions_per_image} if n_val else {})}
    manifest_path = out / "MANIFEST.json"
    if _previous_run(out, params) is not None:
        return SynthResult(out, manifest_path, images, captions, shards, time.perf_counter() - start, True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob(".*.tmp"), *out.glob("train/.*.tmp")]:  # left by an interrupted run
        stale.unlink()
    write_json(out / _PARTIAL, {"dataset": "synth", "params": params})

    # Scenes are cheap to draw, so all are drawn (in order) even when resuming; only rendering is skipped.
    train: list[tuple[Scene, str]] = []
    taken: set[tuple[Any, ...]] = set()
    for i in range(n_train):
        rng = random.Random(f"evlp-synth:{seed}:train:{i}")
        scene = sample_scene(rng, image_size)
        train.append((scene, describe_scene(scene, rng)))
        taken.add(scene.key())
    held_out: dict[str, list[tuple[Scene, list[str]]]] = {"test": [], "val": []}
    for split, n in (("test", n_test), ("val", n_val)):
        for i in range(n):
            rng = random.Random(f"evlp-synth:{seed}:{split}:{i}")
            scene = sample_scene(rng, image_size)
            while scene.key() in taken:  # held out: never a train image, never a repeat
                scene = sample_scene(rng, image_size)
            taken.add(scene.key())
            held_out[split].append((scene, scene_captions(scene, rng, captions_per_image)))

    for j, path in enumerate(shards):
        part = train[j * shard_size:(j + 1) * shard_size]
        if shard_is_complete(path, _shard_plan(j * shard_size, part)) is None:  # stats come after the tar
            _write_shard(path, j * shard_size, part)
    splits: dict[str, dict[str, int]] = {"train": {"samples": n_train, "shards": n_shards}}
    for split, items in held_out.items():
        if items:
            _write_index_split(out, split, items)
            splits[split] = {"images": len(items), "captions": len(items) * captions_per_image}
    write_json(manifest_path, {
        "dataset": "synth", "seed": seed, "image_size": image_size, "splits": splits, "params": params,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "evlp_version": __version__,
    })
    (out / _PARTIAL).unlink()
    return SynthResult(out, manifest_path, images, captions, shards, time.perf_counter() - start)
