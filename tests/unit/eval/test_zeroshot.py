"""evlp.eval.zeroshot: top-k against a brute-force sort, prototypes against a plain loop, the runner end to end."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from evlp.errors import ConfigError, DataNotFoundError
from evlp.eval.zeroshot import (
    IMAGENET_CLASSNAMES_FILE,
    IMAGENET_TEMPLATES_FILE,
    ZeroShotConfig,
    evaluate_zeroshot,
    imagenet_classnames,
    imagenet_templates,
    imagenet_wnids,
    resolve_classnames,
    resolve_templates,
    scan_image_folder,
    zeroshot_classifier,
    zeroshot_metrics,
)

COLOURS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30)}
MANY_COLOURS = {**COLOURS, "yellow": (230, 220, 30), "purple": (130, 30, 180), "orange": (240, 140, 20),
                "white": (245, 245, 245), "black": (15, 15, 15)}
"""More classes than 5, so that top-5 is not 100 by construction."""


# ------------------------------------------------------------------------------------------ metrics


def brute_force_topk(logits: list[list[float]], labels: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """Sort each row by (-score, class index) and find the true class's position."""
    hits = {k: 0 for k in ks}
    for row, y in zip(logits, labels):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rank = order.index(y) + 1
        for k in ks:
            hits[k] += rank <= k
    return {f"top{k}": 100.0 * hits[k] / len(labels) for k in ks}


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(57, 13, generator=g)
    labels = torch.randint(0, 13, (57,), generator=g)
    ks = (1, 2, 5, 13)
    got = zeroshot_metrics(logits, labels, ks)
    want = brute_force_topk(logits.tolist(), labels.tolist(), ks)
    assert got == pytest.approx(want, abs=1e-9)
    assert got["top13"] == 100.0


@pytest.mark.parametrize("seed", range(3))
def test_metrics_ties_rank_the_lower_class_index_first(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (80, 9), generator=g).float()  # ties everywhere
    logits[:5] = 1.0  # whole rows tied: top-k correct exactly when the label is < k
    labels = torch.randint(0, 9, (80,), generator=g)
    ks = (1, 3, 5)
    assert zeroshot_metrics(logits, labels, ks) == pytest.approx(brute_force_topk(logits.tolist(), labels.tolist(), ks))
    tied = zeroshot_metrics(torch.ones(9, 9), torch.arange(9), ks)
    assert tied == pytest.approx({"top1": 100 / 9, "top3": 300 / 9, "top5": 500 / 9})
    # top-1 agrees with argmax, which also returns the first of equal maxima
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    assert zeroshot_metrics(logits, labels, (1,))["top1"] == pytest.approx(top1)


def test_metrics_fewer_classes_than_k_and_plain_lists() -> None:
    logits = [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]]
    labels = [1, 1, 2, 2]
    got = zeroshot_metrics(torch.tensor(logits), labels)
    assert got == pytest.approx({"top1": 50.0, "top5": 100.0})
    assert got == pytest.approx(brute_force_topk(logits, labels, (1, 5)))


def test_metrics_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ classifier


class FakeEncoder:
    """encode_text: a fixed pseudo-random (un-normalised) vector per string, seeded by its CRC."""

    dim = 6

    def __init__(self) -> None:
        self.calls: list[int] = []

    def vector(self, text: str) -> list[float]:
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return (torch.randn(self.dim, generator=g) * (1 + len(text) % 5)).tolist()

    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        self.calls.append(len(texts))
        return torch.tensor([self.vector(t) for t in texts])


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings() -> None:
    enc = FakeEncoder()
    names = ["red", "green", "blue", "dark grey", "tench"]
    templates = ["a photo of a {}.", "a {c} in a video game.", "itap of my {}."]
    want = []
    for name in names:
        embs = [_unit(enc.vector(t.replace("{c}", "{}").format(name))) for t in templates]
        want.append(_unit([sum(col) / len(embs) for col in zip(*embs)]))
    for batch_size in (1, 4, 7, 256):
        got = zeroshot_classifier(enc, names, templates, batch_size=batch_size)
        assert got.shape == (5, FakeEncoder.dim)
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    assert max(enc.calls) <= 256  # prompts are encoded in groups, not all at once


def test_classifier_needs_names_and_templates() -> None:
    with pytest.raises(ConfigError):
        zeroshot_classifier(FakeEncoder(), [], ["a {}."])
    with pytest.raises(ConfigError):
        zeroshot_classifier(FakeEncoder(), ["x"], [])


# ------------------------------------------------------------------------------------------ assets


def test_assets_counts_and_wnid_alignment() -> None:
    names, templates, wnids = imagenet_classnames(), imagenet_templates(), imagenet_wnids()
    assert len(names) == len(wnids) == 1000 and len(templates) == 80 == len(set(templates))
    assert all("{}" in t and "{c}" not in t for t in templates)
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    pairs = dict(zip(wnids, names))
    assert pairs["n01440764"] == "tench" and wnids[0] == "n01440764"
    assert pairs["n01443537"] == "goldfish" and wnids[1] == "n01443537"
    assert wnids[207] == "n02099601" and names[207].lower() == "golden retriever"
    assert wnids[999] == "n15075141" and names[999] == "toilet paper"
    assert list(wnids) == sorted(wnids)
    assert json.loads(IMAGENET_CLASSNAMES_FILE.read_text()) == names
    assert json.loads(IMAGENET_TEMPLATES_FILE.read_text()) == templates


# ------------------------------------------------------------------------------------------ data and inputs


def make_folder(root: Path, classes: dict[str, tuple[int, int, int]], n: int = 4, size: int = 24) -> Path:
    for folder, rgb in classes.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shade = tuple(max(0, c - 12 * i) for c in rgb)
            Image.new("RGB", (size + 3 * i, size), shade).save(root / folder / f"{i}.png")
    return root


def test_scan_finds_split_and_imagenet(tmp_path: Path) -> None:
    make_folder(tmp_path / "imagenet" / "val", {"n01443537": (1, 2, 3), "n01440764": (4, 5, 6)}, n=2)
    (tmp_path / "imagenet" / "val" / "n01440764" / "notes.txt").write_text("not an image")
    for data in (tmp_path, tmp_path / "imagenet", tmp_path / "imagenet" / "val"):
        index = scan_image_folder(data, "val")
        assert index.dataset == "imagenet" and index.folders == ["n01440764", "n01443537"]
        assert index.labels == [0, 0, 1, 1] and len(index.paths) == 4
    assert resolve_classnames(index.folders)[0] == ["tench", "goldfish"]


def test_class_names_sources(tmp_path: Path) -> None:
    folders = ["sea_lion", "zebra"]
    assert resolve_classnames(folders) == (["sea lion", "zebra"], "folder names ('_' read as space)")
    (tmp_path / "c.json").write_text(json.dumps({"zebra": "zebra", "sea_lion": "sea lion", "extra": "x"}))
    assert resolve_classnames(folders, str(tmp_path / "c.json"))[0] == ["sea lion", "zebra"]
    (tmp_path / "c.txt").write_text("seal\n\n zebra \n")
    assert resolve_classnames(folders, str(tmp_path / "c.txt"))[0] == ["seal", "zebra"]
    (tmp_path / "t.json").write_text(json.dumps(["a {}.", "the {c}!"]))
    assert resolve_templates(str(tmp_path / "t.json"))[0] == ["a {}.", "the {c}!"]


def test_input_errors(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "colours", COLOURS, n=1)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images"):
        scan_image_folder(tmp_path / "empty")
    make_folder(tmp_path / "split" / "train", {"a": (0, 0, 0)}, n=1)
    with pytest.raises(ConfigError, match="split 'val' not found.*train"):
        scan_image_folder(tmp_path / "split", "val")
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    with pytest.raises(ConfigError, match="2 names but the data has 3 class folders"):
        resolve_classnames(scan_image_folder(data).folders, str(tmp_path / "two.txt"))
    (tmp_path / "partial.json").write_text(json.dumps({"red": "red"}))
    with pytest.raises(ConfigError, match="no name for 2 of 3"):
        resolve_classnames(["blue", "green", "red"], str(tmp_path / "partial.json"))
    (tmp_path / "t.txt").write_text("a photo of a {}.\na photo.\n")
    with pytest.raises(ConfigError, match=r"template 2 \('a photo.'\) has no"):
        resolve_templates(str(tmp_path / "t.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_templates(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/val/{black,blue,...,yellow}/*.png: 8 classes, 4 images each."""
    root = tmp_path_factory.mktemp("zs") / "colours"
    make_folder(root / "val", MANY_COLOURS)
    return root


def independent_metrics(encoder, root: Path, names: list[str], templates: list[str]) -> dict[str, float]:
    """Top-1/top-5 computed apart from evlp.eval.zeroshot: PIL images through encode_image, each class's
    prototype as the renormalised mean of its normalised prompt embeddings, ranks by a brute-force sort."""
    from evlp.data.transforms import load_rgb

    folders = sorted(p.name for p in root.iterdir())
    paths = sorted(root.glob("*/*.png"))
    images = encoder.encode_image([load_rgb(p) for p in paths])
    labels = [folders.index(p.parent.name) for p in paths]
    protos = []
    for name in names:
        t = encoder.encode_text([template.replace("{c}", "{}").format(name) for template in templates])
        t = t / t.norm(dim=-1, keepdim=True)
        protos.append(t.mean(0) / t.mean(0).norm())
    logits = 100 * images @ torch.stack(protos).T
    return brute_force_topk(logits.tolist(), labels, (1, 5))


def distinct(encoder):
    """The tiny run's encoder plus a fixed signal per image colour and per prompt. A 3-step model alone ranks
    every image alike (it puts all of them in one class), so its metrics could not tell a wrong class order
    or a dropped template; with these signals every image and every prompt counts."""
    import dataclasses

    from evlp.api import Encoder

    width = encoder.config.shared.width
    colour = torch.randn(3, width, generator=torch.Generator().manual_seed(0))

    class Distinct(Encoder):
        def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
            return super().encode_pixels(pixels) + pixels.mean(dim=(2, 3)) @ colour

        def encode_text(self, texts, batch_size: int = 256) -> torch.Tensor:
            own = [torch.randn(width, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
            return super().encode_text(texts, batch_size) + torch.stack(own)

    return Distinct(**{f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)})


@pytest.fixture(scope="module")
def encoder(tiny_run: Path):
    from evlp.api import load

    return distinct(load(tiny_run, device="cpu"))


def test_end_to_end_matches_an_independent_computation(tiny_run: Path, colours: Path, encoder, tmp_path: Path) -> None:
    names = sorted(MANY_COLOURS)
    templates = ["a photo of a {} square.", "a {} picture."]
    (tmp_path / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    (tmp_path / "templates.txt").write_text("".join(f"{t}\n" for t in templates))
    cfg = ZeroShotConfig(ckpt=str(tiny_run), data=str(colours), classes=str(tmp_path / "classes.txt"),
                         templates=str(tmp_path / "templates.txt"), out=str(tmp_path / "zs.json"),
                         batch_size=5, num_workers=0, device="cpu")
    result = evaluate_zeroshot(cfg, encoder=encoder)

    record = json.loads((tmp_path / "zs.json").read_text())
    assert record["task"] == "zeroshot" and record["dataset"] == "colours" and record["split"] == "val"
    assert (record["n_images"], record["n_classes"], record["n_templates"]) == (32, 8, 2)
    assert set(record["metrics"]) == {"top1", "top5"} and record["metrics"] == result.metrics
    assert record["config_hash"] and record["checkpoint"] == result.checkpoint
    assert record["protocol"]["templates"].endswith("templates.txt")
    assert record["protocol"]["classes"].endswith("classes.txt")
    assert record["protocol"]["image_size"] == encoder.config.image.img_size

    want = independent_metrics(encoder, colours / "val", names, templates)
    assert result.metrics == pytest.approx(want, abs=1e-3)


def test_end_to_end_defaults_load_the_checkpoint_and_write_into_the_run(tiny_run: Path, colours: Path, encoder,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import evlp.api
    from evlp.checkpoint import find_checkpoint
    from evlp.eval.runner import default_result_path

    loaded = []
    real_load = evlp.api.load
    monkeypatch.setattr(evlp.api, "load", lambda *a, **k: loaded.append(a) or distinct(real_load(*a, **k)))
    cfg = ZeroShotConfig(ckpt=str(tiny_run), data=str(colours / "val"), batch_size=8, num_workers=0, device="cpu")
    result = evaluate_zeroshot(cfg)  # folder-name classes, 80 OpenAI templates
    path = default_result_path(find_checkpoint(tiny_run), "zeroshot", "colours", "val")
    assert result.path == str(path) and path.is_file()
    record = json.loads(path.read_text())
    assert loaded == [(str(tiny_run),)]  # the runner loaded the checkpoint itself
    assert record["n_templates"] == 80 and record["protocol"]["classes"].startswith("folder names")
    # the folder names as class names and the 80 OpenAI templates, computed independently (the fixture's
    # encoder is the same checkpoint, loaded apart from the runner's own loading)
    want = independent_metrics(encoder, colours / "val", sorted(MANY_COLOURS), imagenet_templates())
    assert record["metrics"] == pytest.approx(want, abs=1e-3)


def test_end_to_end_errors_before_loading(tiny_run: Path, colours: Path, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("no placeholder here\n")
    with pytest.raises(ConfigError, match="has no"):
        evaluate_zeroshot(ZeroShotConfig(ckpt=str(tiny_run), data=str(colours), templates=str(tmp_path / "t.txt")))
    with pytest.raises(ConfigError, match="split 'test' not found"):
        evaluate_zeroshot(ZeroShotConfig(ckpt=str(tiny_run), data=str(colours), split="test"))
