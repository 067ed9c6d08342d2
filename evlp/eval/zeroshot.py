"""Zero-shot image classification with prompt-ensembled class prototypes (reference.md section 7.2).

Each class name is written into every prompt template; the class prototype is the mean of the
L2-normalised text embeddings of its prompts, re-normalised. Images are embedded with the pretraining
eval transform (squash resize) and scored with ``logits = 100 * I W^T``; top-1/top-5 are counted over
every image.

Shipped assets (``evlp/assets``): ``imagenet_classnames.json`` is open_clip's curated list of the 1000
ImageNet-1k class names (``IMAGENET_CLASSNAMES`` in ``src/open_clip/zero_shot_metadata.py``), in the
standard class-index order, i.e. sorted wnids as listed by ``timm.data.ImageNetInfo().label_names()``;
``imagenet_templates.json`` holds OpenAI's 80 ImageNet prompt templates with ``{}`` for the class name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evlp.errors import ConfigError, DataNotFoundError
from evlp.data.layouts import IMAGE_SUFFIXES, IMAGENET_CLASSNAMES_ASSET, imagenet_classnames, imagenet_wnids
from evlp.eval.results import ClassificationResult, EvalResult, checkpoint_config_hash

if TYPE_CHECKING:
    from evlp.dist import DistInfo

"""Files counted as images inside class folders (case-insensitive), as torchvision's ImageFolder."""

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGENET_CLASSNAMES_FILE = IMAGENET_CLASSNAMES_ASSET
IMAGENET_TEMPLATES_FILE = _ASSETS / "imagenet_templates.json"
_SPLIT_NAMES = frozenset({"train", "val", "validation", "test"})
_LOGIT_SCALE = 100.0


@dataclass
class ZeroShotConfig:
    """``evlp eval zeroshot`` settings."""

    ckpt: str
    """Run folder, checkpoint or exported model."""
    data: str
    """ImageFolder root: a folder whose ``<split>/`` holds class folders (``ROOT/imagenet``), a data root
    with ``imagenet/<split>/``, or a folder of class folders."""
    split: str = "val"
    classes: str | None = None
    """Class names: a text file (one per line, in sorted folder order), a JSON list (same order) or a
    JSON object ``{folder: name}``. Default: the shipped ImageNet names for wnid folders, else the folder
    names with ``_`` read as spaces."""
    templates: str | None = None
    """Prompt templates with ``{}`` (or ``{c}``) for the class name: a text file (one per line) or a JSON
    list. Default: the 80 OpenAI ImageNet templates."""
    out: str | None = None
    """Where to write the result JSON (default: ``<run>/eval/zeroshot_<dataset>_<split>.json``)."""
    batch_size: int = 128
    num_workers: int = 2
    device: str | None = None


@dataclass
class ImageFolderIndex:
    """The images of an ImageFolder split: class folders (sorted) and ``(path, label)`` pairs."""

    root: Path
    dataset: str
    split: str
    folders: list[str]
    paths: list[Path]
    labels: list[int]


# ---------------------------------------------------------------------------------------------- metrics


def zeroshot_metrics(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, ``{"top1": ..., "top5": ...}``, exact over all N rows.

    An image is correct at k when its true class ranks among the first k of its row, ties broken by
    :mod:`evlp.eval.topk`'s rule (the lower class index first, as ``argmax``). With fewer than k classes every
    image is correct.

    Args:
        logits: (N, C) scores.
        labels: (N,) true class indices.
        ks: the k values to report.

    Raises:
        ValueError: shapes do not fit, no rows, or a label is outside ``0..C-1``.
    """
    import torch

    from evlp.eval.topk import topk_correct

    logits = torch.as_tensor(logits)  # (N, C)
    counts = topk_correct(logits, labels, ks)  # validates the shapes and labels
    n = logits.shape[0]
    if n == 0:
        raise ValueError("zeroshot_metrics needs at least one row")
    return {f"top{k}": 100.0 * counts[int(k)] / n for k in ks}


# ------------------------------------------------------------------------------------------ classifier


def fill_template(template: str, name: str) -> str:
    """Write a class name into a template at ``{}`` or ``{c}`` (other braces are left alone)."""
    return template.replace("{c}", "{}").replace("{}", name)


def zeroshot_classifier(encoder: Any, classnames: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256) -> Any:
    """Class prototypes from prompt ensembles: (C, D), each row unit length.

    Row c is the mean over templates of the L2-normalised ``encoder.encode_text`` embeddings of
    ``template.format(classnames[c])``, re-normalised.

    Args:
        encoder: anything with ``encode_text(texts, batch_size) -> (N, D)`` (an :class:`evlp.api.Encoder`).
        classnames: one name per class, in label order.
        templates: prompt templates with ``{}`` (or ``{c}``) for the name.
        batch_size: prompts per text forward pass.

    Raises:
        ConfigError: no class names or no templates.
    """
    import torch
    import torch.nn.functional as F

    if not classnames or not templates:
        raise ConfigError(f"zero-shot needs class names and templates, got {len(classnames)} names and "
                          f"{len(templates)} templates")
    n_t = len(templates)
    per_call = max(1, batch_size // n_t)  # classes whose prompts go through one encode_text call
    rows = []
    for i in range(0, len(classnames), per_call):
        names = classnames[i:i + per_call]
        prompts = [fill_template(t, name) for name in names for t in templates]
        emb = encoder.encode_text(prompts, batch_size=batch_size).float()  # (b * T, D)
        emb = F.normalize(emb, dim=-1).view(len(names), n_t, -1)  # (b, T, D)
        rows.append(F.normalize(emb.mean(dim=1), dim=-1))  # (b, D)
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------ the data


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (``{}`` for the class name)."""
    return json.loads(IMAGENET_TEMPLATES_FILE.read_text(encoding="utf-8"))


def _subfolders(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def find_image_folder(data: str | os.PathLike[str], split: str = "val") -> tuple[Path, str]:
    """The folder of class folders that ``data`` designates, and the dataset name.

    Tried in order: ``data/<split>/``, ``data/imagenet/<split>/`` (an evlp data root), ``data`` itself.

    Raises:
        DataNotFoundError: ``data`` does not exist or holds no class folders.
        ConfigError: ``data`` holds other splits but not ``split``.
    """
    path = Path(data).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"zero-shot data {path} does not exist — pass an ImageFolder root "
                                f"(e.g. data/imagenet with {split}/<wnid>/*.JPEG) or a folder of class folders.")
    name = path.resolve().name
    if (path / split).is_dir():
        return path / split, name
    if (path / "imagenet" / split).is_dir():
        return path / "imagenet" / split, "imagenet"
    subs = _subfolders(path)
    splits = [s for s in subs if s in _SPLIT_NAMES]
    if splits:
        raise ConfigError(f"split {split!r} not found in {path} — it has {', '.join(splits)}; "
                          f"pass one of those as the split.")
    if not subs:
        raise DataNotFoundError(f"no class folders in {path} — expected {split}/<class>/ or <class>/ "
                                f"folders of images.")
    # a folder of class folders named like the split (data/imagenet/val) is named after its parent
    if name == split and path.resolve().parent.name:
        name = path.resolve().parent.name
    return path, name


def scan_image_folder(data: str | os.PathLike[str], split: str = "val") -> ImageFolderIndex:
    """Index an ImageFolder split: class = sorted folder name's position, images found recursively.

    Raises:
        DataNotFoundError, ConfigError: see :func:`find_image_folder`; also when there are no images.
    """
    root, dataset = find_image_folder(data, split)
    folders = _subfolders(root)
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        paths += sorted(found)
        labels += [label] * len(found)
    if not paths:
        raise DataNotFoundError(f"no images under {root} — its {len(folders)} class folders hold no "
                                f"{'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} files.")
    if set(folders) <= set(imagenet_wnids()):
        dataset = "imagenet"
    return ImageFolderIndex(root=root, dataset=dataset, split=split, folders=folders, paths=paths, labels=labels)


def _read_list_file(path: str, what: str) -> tuple[Any, Path]:
    """A JSON value (``.json``) or the non-blank lines of a text file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} file {p} does not exist — pass a text file (one per line) or a JSON list.")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text), p
        except json.JSONDecodeError as err:
            raise ConfigError(f"{what} file {p} is not valid JSON ({err.msg} at line {err.lineno}).") from err
    return [line.strip() for line in text.splitlines() if line.strip()], p


def resolve_classnames(folders: Sequence[str], classes: str | None = None) -> tuple[list[str], str]:
    """Class names for the sorted class folders, and where they came from (for the protocol).

    Raises:
        ConfigError: the file is missing or malformed, or does not name every folder.
    """
    if classes is None:
        wnids = imagenet_wnids()
        if set(folders) <= set(wnids):
            index = {w: i for i, w in enumerate(wnids)}
            names = imagenet_classnames()
            return [names[index[f]] for f in folders], "open_clip ImageNet-1k class names (shipped)"
        return [f.replace("_", " ") for f in folders], "folder names ('_' read as space)"
    raw, p = _read_list_file(classes, "class-names")
    if isinstance(raw, dict):
        missing = [f for f in folders if f not in raw]
        if missing:
            raise ConfigError(f"class-names file {p} has no name for {len(missing)} of {len(folders)} class "
                              f"folders (first: {', '.join(missing[:5])}) — add them as \"folder\": \"name\".")
        raw = [raw[f] for f in folders]
    if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
        raise ConfigError(f"class-names file {p} must hold non-empty strings: one per line, a JSON list or "
                          f"a JSON object {{folder: name}}.")
    if len(raw) != len(folders):
        raise ConfigError(f"class-names file {p} has {len(raw)} names but the data has {len(folders)} class "
                          f"folders — give one name per folder, in sorted folder order.")
    return [x.strip() for x in raw], str(p)


def resolve_templates(templates: str | None = None) -> tuple[list[str], str]:
    """Prompt templates, and where they came from (for the protocol).

    Raises:
        ConfigError: the file is missing, malformed, empty, or a template has no ``{}`` / ``{c}``.
    """
    if templates is None:
        return imagenet_templates(), "OpenAI ImageNet templates (80, shipped)"
    raw, p = _read_list_file(templates, "templates")
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"templates file {p} must hold at least one template: one per line or a JSON "
                          f"list of strings.")
    bad = [i + 1 for i, t in enumerate(raw) if "{}" not in t and "{c}" not in t]
    if bad:
        raise ConfigError(f"templates file {p}: template {bad[0]} ({raw[bad[0] - 1]!r}) has no '{{}}' for the "
                          f"class name ({len(bad)} such) — write e.g. 'a photo of a {{}}.'")
    return list(raw), str(p)


# ------------------------------------------------------------------------------------------ the runner


def evaluate_zeroshot(cfg: ZeroShotConfig, encoder: Any = None, *, dist: DistInfo | None = None) -> EvalResult:
    """Zero-shot classification of an ImageFolder split: top-1 and top-5 accuracy in percent.

    Under a launcher (``accelerate launch``, ``torchrun``) every rank builds the prototypes of its share of the
    classes and embeds its share of the images; rank 0 scores the gathered embeddings and writes the JSON, and
    every rank returns the same result: exactly the single-process numbers (each image counted once).

    Args:
        cfg: what to evaluate and where to write it.
        encoder: an already loaded :class:`evlp.api.Encoder` (else loaded from ``cfg.ckpt``; under a launcher on
            each rank's own GPU unless ``cfg.device`` says otherwise).
        dist: the ranks that share the work; default: the launcher's (:func:`evlp.eval.sharded.launcher_ranks`),
            one process without one. Pass ``DistInfo()`` when only this process calls it.

    Raises:
        DataNotFoundError: the data folder or its images are missing.
        ConfigError: a wrong split, class-names file or templates file.
        CheckpointError: nothing loadable at ``cfg.ckpt``.
    """
    from evlp.api import load
    from evlp.checkpoint import find_checkpoint
    from evlp.eval.runner import default_result_path, embed_images, embedding_label
    from evlp.eval.sharded import from_main, launcher_device, launcher_ranks, map_shares

    t0 = time.perf_counter()
    dist = dist or launcher_ranks()
    # every input is checked before the model loads, so mistakes fail fast
    index = scan_image_folder(cfg.data, cfg.split)
    classnames, classes_source = resolve_classnames(index.folders, cfg.classes)
    templates, templates_source = resolve_templates(cfg.templates)
    ckpt = find_checkpoint(cfg.ckpt)
    encoder = encoder or load(cfg.ckpt, device=cfg.device or launcher_device(dist))

    # each class's prototype depends on its own prompts only, so classes split over ranks like images do
    weights = map_shares(lambda names: zeroshot_classifier(encoder, names, templates, max(cfg.batch_size, 256)),
                         classnames, dist)  # (C, D)
    images = map_shares(lambda paths: embed_images(encoder, paths, cfg.batch_size, cfg.num_workers),
                        index.paths, dist)  # (N, D)
    result = None
    if dist.is_main:
        logits = _LOGIT_SCALE * images @ weights.T  # (N, C)
        metrics = {k: round(v, 4) for k, v in zeroshot_metrics(logits, index.labels, (1, 5)).items()}
        result = ClassificationResult(
            task="zeroshot", dataset=index.dataset, split=index.split, checkpoint=str(ckpt), metrics=metrics,
            details={"n_images": len(index.paths), "n_classes": len(classnames), "n_templates": len(templates)},
            seconds=time.perf_counter() - t0, config_hash=checkpoint_config_hash(ckpt),
            protocol={"data": str(index.root), "classes": classes_source, "templates": templates_source,
                      "image_size": encoder.config.image.img_size, "resize": "squash, bicubic",
                      "text_max_length": encoder.config.text.max_length, "embedding": embedding_label(encoder.config),
                      "prototype": "mean of L2-normalised prompt embeddings, re-normalised",
                      "logit_scale": _LOGIT_SCALE, "ties": "lower class index ranks first"},
        )
        result.write(Path(cfg.out) if cfg.out else default_result_path(ckpt, "zeroshot", index.dataset, index.split))
    return from_main(result, dist)
