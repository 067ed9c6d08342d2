"""Retrieval fine-tuning (``evlp finetune retrieval``): CLIP ITC on ``x`` over COCO/Flickr30K Karpathy train,
the best checkpoint by validation mean recall, then test-split scores (reference.md section 6.3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evlp.checkpoint import TEXT_CONFIG, TOKENIZER, eval_path, write_json
from evlp.config.retrieval import RetrievalFinetuneConfig
from evlp.data.device_augment import finish_images
from evlp.data.karpathy import load_retrieval_index
from evlp.data.pairs import PairBatches
from evlp.data.shards import count_samples, expand_shards
from evlp.data.transforms import train_augment
from evlp.dist import DistInfo
from evlp.eval.results import EvalResult
from evlp.eval.retrieval import retrieval_metrics
from evlp.losses import clip_loss
from evlp.train.lifecycle import TrainingResult, checkpoint_config, train
from evlp.train.task import Progress, Task


class RetrievalModule(nn.Module):
    """The student under DDP; its KD-only parts (S-SMKE's fc_norm, head) are frozen, as ITC never reaches them."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        for name in ("fc_norm", "head"):  # a dual encoder has none
            part = getattr(student, name, None)
            if part is not None:
                part.requires_grad_(False)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"x_image": self.student.encode_image(pixels)["x"],
                "x_text": self.student.encode_text(input_ids, attention_mask)["x"],
                "scale": self.student.logit_scales[-1].exp()}


class RetrievalFinetuneTask(Task):
    """CLIP ITC on the shared block's CLS embedding, validated by mean recall on the Karpathy val split.

    Args:
        cfg: the resolved fine-tuning config.
    """

    name = "retrieval"
    monitor = "rmean"
    monitor_mode = "max"
    find_unused_parameters = False

    def __init__(self, cfg: RetrievalFinetuneConfig) -> None:
        from evlp.api import load

        self.cfg = cfg
        self.encoder = load(cfg.ckpt, device="cpu")
        root = Path(cfg.data_root) / cfg.dataset
        self.shards = expand_shards(root, ["train"])
        self._samples = count_samples(self.shards)
        self.val_index = load_retrieval_index(root, split=cfg.val_split)
        data = (self.encoder.run_config or {}).get("data") or {}
        self.mean = tuple(data.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(data.get("std", (0.229, 0.224, 0.225)))
        self.train_transform = train_augment(self.encoder.config.image.img_size, augment_on=cfg.augment_on,
                                             crop_scale=cfg.crop_scale, hflip=cfg.hflip,
                                             color_jitter=cfg.color_jitter, mean=self.mean, std=self.std)
        self.pairs: PairBatches | None = None
        self.skipped_samples = 0
        self.device: Any = "cpu"

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        return RetrievalModule(self.encoder.model.train())

    def to(self, device: Any) -> None:
        self.device = device

    def data_state(self) -> dict:
        return {"stream": self.pairs.state_dict() if self.pairs is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        self.encoder.tokenizer.save(folder / TOKENIZER)
        write_json(folder / TEXT_CONFIG, self.encoder.text_config or self.encoder.model.text.hf_config())

    def checkpoint_config(self) -> str:
        """What evaluation reads from a checkpoint: the model, its normalisation, and this fine-tuning."""
        return checkpoint_config(self.encoder.config, self.cfg, data={"mean": list(self.mean), "std": list(self.std)})

    # ------------------------------------------------------------------ data and loss
    def samples_per_epoch(self) -> int:
        return self._samples

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        self.pairs = PairBatches(self.shards, transform=self.train_transform, tokenizer=self.encoder.tokenizer,
                                 batch_size=self.cfg.train.batch_size, dist=dist, seed=self.cfg.train.seed,
                                 num_workers=self.cfg.num_workers)
        for batch in self.pairs.batches((data_state or {}).get("stream")):
            self.skipped_samples = self.pairs.skipped
            yield batch

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return finish_images(batch, self.train_transform)

    shared_outputs = ("scale",)

    def forward(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        return module(batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss(self, out: dict[str, Tensor], batch: dict[str, Any], dist: DistInfo
             ) -> tuple[Tensor, dict[str, Tensor]]:
        res = clip_loss(out["x_image"].float(), out["x_text"].float(), out["scale"].float(), rank=dist.rank,
                        world_size=dist.world_size)
        return res.loss, {"itc_acc": res.acc.detach(), "scale": out["scale"].detach()}

    def after_optimizer_step(self, module: nn.Module) -> None:
        module.student.clamp_logit_scales()

    @torch.no_grad()
    def evaluate(self, module: nn.Module, dist: DistInfo) -> dict[str, float]:
        """Karpathy R@K on the validation split; every rank embeds its share of the images and captions
        (:mod:`evlp.eval.sharded`: each once, none padded), all ranks get the same scores."""
        from evlp.eval.runner import embed_images
        from evlp.eval.sharded import map_shares

        encoder, index, batch = self.encoder, self.val_index, self.cfg.eval_batch_size
        encoder.model, encoder.device = module.student, self.device
        images = map_shares(lambda paths: embed_images(encoder, paths, batch, 0), index.image_paths, dist)  # (N_i, D)
        texts = map_shares(lambda caps: encoder.encode_text(caps, batch_size=batch), index.texts, dist)  # (N_t, D)
        metrics = retrieval_metrics(images @ texts.T, index.text_to_image)
        return {k: metrics[k] for k in ("rmean", "rsum", "tr1", "ir1")}


def finetune_retrieval(cfg: RetrievalFinetuneConfig, *, resume: bool = False, stop_after: int | None = None,
                       progress: Progress | None = None) -> TrainingResult:
    """Fine-tune for retrieval, then score the best checkpoint (by validation mean recall) on the test split.

    Writes ``RUN/config.yaml``, ``env.json``, ``metrics.jsonl``, ``checkpoints/`` (``best`` kept; each one an
    ordinary evlp model that ``evlp.load`` and ``evlp eval retrieval`` read), ``eval/retrieval_<dataset>_<test
    split>.json`` (for EVE also ``eval/retrieval_rr<k>_...``, the ITM re-ranked scores: ``rerank_k``) and
    ``summary.json``. An EVE model trains ITC + ITM (:mod:`evlp.train.retrieval_itm`).

    Raises:
        ConfigError: bad settings, or a run folder that conflicts with ``resume``.
        CheckpointError, DataNotFoundError: missing pretrained model or data.
    """
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval_all
    from evlp.train.retrieval_itm import checkpoint_arch, retrieval_task

    def score(ckpt: Path) -> list[EvalResult]:
        rerank = cfg.rerank_k if checkpoint_arch(ckpt) == "eve" else 0  # RR@k: only a model with an ITM head
        return list(evaluate_retrieval_all(RetrievalEvalConfig(
            ckpt=str(ckpt), data=str(Path(cfg.data_root) / cfg.dataset), split=cfg.test_split,
            out=str(eval_path(cfg.out, "retrieval", cfg.dataset, cfg.test_split)), num_workers=0,
            batch_size=cfg.eval_batch_size, rerank=rerank), dist=DistInfo()))  # scored on the main process alone

    return train(cfg, lambda start: retrieval_task(cfg), resume=resume, stop_after=stop_after,
                 progress=progress, fixed=("dataset",), score=score)
