"""Evaluation runners: load a checkpoint, embed a benchmark, score it, write the result JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evlp.eval.results import RetrievalResult, checkpoint_config_hash

if TYPE_CHECKING:
    from evlp.dist import DistInfo


@dataclass
class RetrievalEvalConfig:
    """``evlp eval retrieval`` settings."""

    ckpt: str
    """Run folder, checkpoint or exported model."""
    data: str
    """Karpathy-style index: a folder or JSON file."""
    split: str = "test"
    out: str | None = None
    """Where to write the result JSON (default: ``<run>/eval/retrieval[_<dataset>_<split>].json``)."""
    images_root: str | None = None
    batch_size: int = 128
    num_workers: int = 2
    device: str | None = None


class _ImageFiles:
    """Map-style dataset of (transformed) images from paths, for a DataLoader."""

    def __init__(self, paths: list[Path], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from evlp.data.transforms import load_rgb

        return self.transform(load_rgb(self.paths[i]))


def embed_images(encoder: Any, paths: list[Path], batch_size: int = 128, num_workers: int = 2) -> Any:
    """Embed image files with the encoder's eval transform: (N, D)."""
    import torch

    if not paths:
        return torch.empty(0, encoder.config.shared.width)
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, encoder.transform), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    return torch.cat([encoder.encode_pixels(px) for px in loader])


def embed_index(encoder: Any, index: Any, batch_size: int = 128, num_workers: int = 2,
                dist: DistInfo | None = None) -> tuple[Any, Any]:
    """Embed each image of a retrieval index once and every caption: ``(images (N_i, D), texts (N_t, D))``.

    With several ranks each embeds its share of the images and of the captions (:mod:`evlp.eval.sharded`) and
    every rank returns all of them, in index order; all ranks must call it.
    """
    from evlp.dist import DistInfo
    from evlp.eval.sharded import map_shares

    dist = dist or DistInfo()
    images = map_shares(lambda paths: embed_images(encoder, paths, batch_size, num_workers), index.image_paths, dist)
    texts = map_shares(lambda caps: encoder.encode_text(caps, batch_size=max(batch_size, 256)), index.texts, dist)
    return images, texts


def evaluate_retrieval(cfg: RetrievalEvalConfig, encoder: Any = None, *,
                       dist: DistInfo | None = None) -> RetrievalResult:
    """Image-text retrieval on a Karpathy-style split: TR@1/5/10, IR@1/5/10, RSUM and their mean.

    Under a launcher (``accelerate launch``, ``torchrun``) every rank embeds its share of the images and captions,
    rank 0 scores the gathered embeddings and writes the JSON, and every rank returns the same result: exactly the
    single-process numbers (each image and caption counted once).

    Args:
        cfg: what to evaluate and where to write it.
        encoder: an already loaded :class:`evlp.api.Encoder` (else loaded from ``cfg.ckpt``; under a launcher on
            each rank's own GPU unless ``cfg.device`` says otherwise).
        dist: the ranks that share the work; default: the launcher's (:func:`evlp.eval.sharded.launcher_ranks`),
            one process without one. Pass ``DistInfo()`` when only this process calls it (e.g. the main process
            of a training run).

    Raises:
        CheckpointError, DataNotFoundError: missing or unreadable inputs.
    """
    from evlp.api import load
    from evlp.checkpoint import find_checkpoint
    from evlp.data.karpathy import load_retrieval_index
    from evlp.eval.retrieval import retrieval_metrics
    from evlp.eval.sharded import from_main, launcher_device, launcher_ranks

    t0 = time.perf_counter()
    dist = dist or launcher_ranks()
    index = load_retrieval_index(cfg.data, split=cfg.split, images_root=cfg.images_root)
    ckpt = find_checkpoint(cfg.ckpt)
    encoder = encoder or load(cfg.ckpt, device=cfg.device or launcher_device(dist))
    images, texts = embed_index(encoder, index, cfg.batch_size, cfg.num_workers, dist)  # (N_i, D), (N_t, D)
    result = None
    if dist.is_main:
        metrics = {k: round(v, 4) for k, v in retrieval_metrics(images @ texts.T, index.text_to_image).items()}
        result = RetrievalResult(
            task="retrieval", dataset=index.dataset, split=index.split, checkpoint=str(ckpt), metrics=metrics,
            details={"n_images": len(index.image_paths), "n_texts": len(index.texts)},
            seconds=time.perf_counter() - t0, config_hash=checkpoint_config_hash(ckpt),
            protocol={"index": str(index.source), "image_size": encoder.config.image.img_size,
                      "resize": "squash, bicubic", "embedding": "shared-block CLS (x)", "images_encoded_once": True},
        )
        result.write(Path(cfg.out) if cfg.out else default_result_path(ckpt, "retrieval", index.dataset, index.split))
    return from_main(result, dist)


def default_result_path(ckpt: Path, task: str, dataset: str, split: str) -> Path:
    """``<run>/eval/<task>_<dataset>_<split>.json`` (the run of a checkpoint, or the export folder itself)."""
    from evlp.checkpoint import eval_path, run_of

    return eval_path(run_of(ckpt), task, dataset, split)
