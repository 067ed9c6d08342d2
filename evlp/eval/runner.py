"""Evaluation runners: load a checkpoint, embed a benchmark, score it, write the result JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evlp.errors import ConfigError
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
    """Images (and, re-ranking, pairs) per forward pass."""
    num_workers: int = 2
    device: str | None = None
    rerank: int = 0
    """k > 0: also re-rank each query's ITC top-k with the model's ITM head (``RR@k``, a separate result)."""


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
        return torch.empty(0, encoder.config.embed_width)
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


def embedding_label(config: Any) -> str:
    """What ``x`` is for a model config, as result protocols name it (the family decides, ``model.arch``)."""
    return {"dual": "projected tower CLS (x)", "eve": "projected encoder CLS (x)"}.get(config.arch,
                                                                                       "shared-block CLS (x)")


def evaluate_retrieval(cfg: RetrievalEvalConfig, encoder: Any = None, *,
                       dist: DistInfo | None = None) -> RetrievalResult:
    """Image-text retrieval on a Karpathy-style split as a dual encoder: TR@1/5/10, IR@1/5/10, RSUM and their mean.

    Under a launcher (``accelerate launch``, ``torchrun``) every rank embeds its share of the images and captions,
    rank 0 scores the gathered embeddings and writes the JSON, and every rank returns the same result: exactly the
    single-process numbers (each image and caption counted once). ``cfg.rerank`` is not read here; see
    :func:`evaluate_retrieval_all` for the re-ranked protocol as well.

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
    return evaluate_retrieval_all(replace(cfg, rerank=0), encoder, dist=dist)[0]


def evaluate_retrieval_all(cfg: RetrievalEvalConfig, encoder: Any = None, *,
                           dist: DistInfo | None = None) -> list[RetrievalResult]:
    """The dual-encoder result of :func:`evaluate_retrieval` and, with ``cfg.rerank = k > 0``, the re-ranked one
    (:mod:`evlp.eval.rerank`: each query's ITC top-k re-scored by the model's ITM head), as separate results: task
    ``retrieval`` and task ``retrieval_rr<k>``, each with its own JSON (the re-ranked one beside the other, named
    by :func:`evlp.eval.rerank.rerank_task`) and its protocol's ``ranking``.

    Under a launcher the re-ranked pairs are split over the ranks too (each pair scored once).

    Raises:
        ConfigError: ``cfg.rerank > 0`` for a model without an ITM head.
        CheckpointError, DataNotFoundError: missing or unreadable inputs.
    """
    from evlp.api import load
    from evlp.checkpoint import find_checkpoint
    from evlp.data.karpathy import load_retrieval_index
    from evlp.eval.rerank import has_itm_head
    from evlp.eval.retrieval import retrieval_metrics
    from evlp.eval.sharded import from_main, launcher_device, launcher_ranks

    t0 = time.perf_counter()
    dist = dist or launcher_ranks()
    if cfg.rerank < 0:
        raise ConfigError(f"--rerank must be >= 0 (0: dual encoder only), got {cfg.rerank}")
    index = load_retrieval_index(cfg.data, split=cfg.split, images_root=cfg.images_root)
    ckpt = find_checkpoint(cfg.ckpt)
    encoder = encoder or load(cfg.ckpt, device=cfg.device or launcher_device(dist))
    if cfg.rerank > 0 and not has_itm_head(encoder.model):
        raise ConfigError(f"--rerank {cfg.rerank}: the model of {ckpt} (model.arch {encoder.config.arch}) has no "
                          "ITM head to re-rank with; drop --rerank (only fusion models such as EVE have one)")
    images, texts = embed_index(encoder, index, cfg.batch_size, cfg.num_workers, dist)  # (N_i, D), (N_t, D)
    sim = images @ texts.T if dist.is_main or cfg.rerank > 0 else None  # (N_i, N_t): shortlists need it everywhere
    out = Path(cfg.out) if cfg.out else default_result_path(ckpt, "retrieval", index.dataset, index.split)
    common = {"dataset": index.dataset, "split": index.split, "checkpoint": str(ckpt),
              "details": {"n_images": len(index.image_paths), "n_texts": len(index.texts)},
              "config_hash": checkpoint_config_hash(ckpt)}
    protocol = {"index": str(index.source), "image_size": encoder.config.image.img_size,
                "resize": "squash, bicubic", "embedding": embedding_label(encoder.config), "images_encoded_once": True}
    results = []
    if dist.is_main:
        metrics = {k: round(v, 4) for k, v in retrieval_metrics(sim, index.text_to_image).items()}
        result = RetrievalResult(task="retrieval", metrics=metrics, seconds=time.perf_counter() - t0,
                                 protocol={"ranking": "dual encoder (ITC)", **protocol}, **common)
        result.write(out)
        results.append(result)
    if cfg.rerank > 0:
        results += _reranked_result(cfg, encoder, index, sim, dist, out, common, protocol)
    return from_main(results, dist)


def _reranked_result(cfg: RetrievalEvalConfig, encoder: Any, index: Any, sim: Any, dist: DistInfo, dual_out: Path,
                     common: dict[str, Any], protocol: dict[str, Any]) -> list[RetrievalResult]:
    """``RR@k``: the shortlisted pairs split over the ranks, scored by the ITM head, ranked on the main process."""
    from evlp.eval.rerank import (
        rerank_label,
        rerank_matrices,
        rerank_metrics,
        rerank_task,
        score_pairs,
        shortlists,
        unique_pairs,
    )
    from evlp.eval.sharded import map_shares

    t0 = time.perf_counter()
    k = cfg.rerank
    texts_of_image, images_of_text = shortlists(sim, k)
    pairs = unique_pairs(texts_of_image, images_of_text, sim.shape[1])  # (P, 2)
    scorer = ItmPairScorer(encoder, index, cfg.batch_size)
    scores = map_shares(lambda share: score_pairs(share, scorer, cfg.batch_size), pairs, dist)  # (P,)
    if not dist.is_main:
        return []
    ranked = rerank_matrices(tuple(sim.shape), texts_of_image, images_of_text, pairs, scores)
    metrics = {key: round(v, 4) for key, v in rerank_metrics(ranked, index.text_to_image).items()}
    task = rerank_task(k)
    result = RetrievalResult(
        task=task, metrics=metrics, seconds=time.perf_counter() - t0, **common,
        protocol={"ranking": f"{rerank_label(k)}: ITC top-{k} per query re-ranked by the ITM head's positive logit",
                  "rerank_k": k, "pairs_scored": ranked.pairs_scored, **protocol})
    name = dual_out.name.replace("retrieval", task, 1) if dual_out.name.startswith("retrieval") else \
        f"{task}_{dual_out.name}"
    result.write(dual_out.with_name(name))
    return [result]


class ItmPairScorer:
    """The ITM positive logit of ``(image index, text index)`` pairs of a retrieval index (a pair scorer of
    :mod:`evlp.eval.rerank`): captions tokenized once; images read from disk as a chunk needs them (the pairs come
    sorted by image, so each is read about once; the last chunk's images are kept)."""

    def __init__(self, encoder: Any, index: Any, batch_size: int = 128) -> None:
        import torch

        self.encoder = encoder
        self.files = _ImageFiles(list(index.image_paths), encoder.transform)
        enc = [encoder.tokenizer(list(index.texts[a:a + 1024])) for a in range(0, len(index.texts), 1024)]
        self.input_ids = torch.cat([e["input_ids"] for e in enc])  # (N_t, T)
        self.attention_mask = torch.cat([e["attention_mask"] for e in enc])
        self.cache: dict[int, Any] = {}

    def _pixels(self, images: list[int]) -> Any:
        import torch

        cache = {i: self.cache[i] if i in self.cache else self.files[i] for i in dict.fromkeys(images)}
        self.cache = cache
        return torch.stack([cache[i] for i in images])

    def __call__(self, images: Any, texts: Any) -> Any:
        import torch

        from evlp.eval.rerank import itm_logits

        dev = self.encoder.device
        pixels = self._pixels(images.tolist()).to(dev)
        with torch.no_grad():
            logits = itm_logits(self.encoder.model, pixels, self.input_ids[texts].to(dev),
                                self.attention_mask[texts].to(dev))  # (P, 2)
        return logits[:, 1].float().cpu()


def default_result_path(ckpt: Path, task: str, dataset: str, split: str) -> Path:
    """``<run>/eval/<task>_<dataset>_<split>.json`` (the run of a checkpoint, or the export folder itself)."""
    from evlp.checkpoint import eval_path, run_of

    return eval_path(run_of(ckpt), task, dataset, split)
