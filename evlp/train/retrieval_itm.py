"""EVE's retrieval fine-tuning: ITC + ITM with hard negatives + the MoE's load balancing (seed_systems.md 3).

The released EVE fine-tuning (github ssyze/EVE, ``Retrieval.py`` with ``models/model_retrieval_beit.py``)
optimises ``ITC + ITM + 0.001 * MoE balancing`` per step:

* **ITC** on the image-only and text-only passes of the shared encoder (CLS, projected, L2-normalised), as
  :class:`~evlp.train.retrieval.RetrievalFinetuneTask` does for every model.
* **ITM** (:mod:`evlp.losses.itm`): one negative text per image and one negative image per text, drawn from the
  whole gathered batch in proportion to the softmax of the ITC logits, then the joint pass over the 3B pairs and
  a 2-way cross-entropy on the ITM head (``model.forward_joint``'s token at ``model.itm_index``).
* **MoE balancing**: the mean of the image, text (and joint) passes' balancing losses, weighted by
  ``model.eve.aux_loss_weight``.

``itm_weight`` (``finetune.itm_weight``) 0 trains ITC (+ balancing) alone. The hard negatives depend on the whole
batch's similarities, so an ITM step cannot be run chunk by chunk: ``train.grad_cache`` is refused with ITM on
(without it the task splits its step as usual and GradCache works).

Parameters that fine-tuning never reaches (the MLM head and pixel decoder of EVE's pretraining; the ITM head with
ITM off) are frozen, and DDP is told that an expert may get no token in a step (``find_unused_parameters``), as
the released code does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.checkpoint import CONFIG, find_checkpoint
from evlp.config.loader import read_yaml
from evlp.config.retrieval import RetrievalFinetuneConfig
from evlp.dist import DistInfo, gather_no_grad
from evlp.errors import CheckpointError, ConfigError
from evlp.eval.rerank import has_itm_head
from evlp.losses import clip_loss
from evlp.losses.itm import gather_negatives, itm_loss, sample_hard_negatives
from evlp.train.retrieval import RetrievalFinetuneTask

__all__ = ["EveRetrievalModule", "EveRetrievalTask", "checkpoint_arch", "retrieval_task"]


def checkpoint_arch(ckpt: str | Path) -> str:
    """``model.arch`` of the model at ``ckpt`` (a run, checkpoint or export), from its saved config.

    Raises:
        CheckpointError: nothing loadable at ``ckpt``.
    """
    raw = read_yaml(find_checkpoint(ckpt) / CONFIG) or {}
    return str((raw.get("model") or {}).get("arch", "s_smke"))


def retrieval_task(cfg: RetrievalFinetuneConfig) -> RetrievalFinetuneTask:
    """The fine-tuning task for the model at ``cfg.ckpt``: :class:`EveRetrievalTask` for ``model.arch: eve``,
    else the plain ITC :class:`~evlp.train.retrieval.RetrievalFinetuneTask`."""
    return EveRetrievalTask(cfg) if checkpoint_arch(cfg.ckpt) == "eve" else RetrievalFinetuneTask(cfg)


class EveRetrievalModule(nn.Module):
    """The EVE model under DDP for retrieval fine-tuning; ``forward`` returns the ITC embeddings, the logit scale,
    the MoE balancing loss and, when ``rank``/``world_size`` are given (ITM on), the ITM logits of the 3B pairs.

    Args:
        student: the :class:`evlp.models.eve.EVE` model.
        itm: whether the ITM head trains (else it is frozen).
    """

    def __init__(self, student: nn.Module, itm: bool) -> None:
        super().__init__()
        self.student = student
        for part in (student.mlm_head, student.decoder) + (() if itm else (student.itm_head,)):
            part.requires_grad_(False)

    def _embed(self, **inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D) L2-normalised projected CLS of an image-only or text-only pass (``encode_image`` /
        ``encode_text``'s embedding) and that pass's balancing loss."""
        enc = self.student.encode(**inputs)
        proj = self.student.image_proj if "pixels" in inputs else self.student.text_proj
        return F.normalize(proj(enc.tokens[:, 0]), dim=-1), enc.aux_loss

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, rank: int | None = None,
                world_size: int = 1) -> dict[str, Tensor]:
        x_image, aux_image = self._embed(pixels=pixels)  # (B, D)
        x_text, aux_text = self._embed(input_ids=input_ids, attention_mask=attention_mask)
        scale = self.student.logit_scales[-1].exp()
        out = {"x_image": x_image, "x_text": x_text, "scale": scale}
        aux = [aux_image, aux_text]
        if rank is not None:
            with torch.no_grad():  # the negatives: drawn from the whole gathered batch by ITC similarity
                image_all = gather_no_grad(x_image.float(), world_size)  # (B * W, D)
                text_all = gather_no_grad(x_text.float(), world_size)
                negatives = sample_hard_negatives(scale * x_image.float() @ text_all.T,
                                                  scale * x_text.float() @ image_all.T, rank=rank,
                                                  world_size=world_size)
            pairs = gather_negatives(pixels, input_ids, attention_mask, negatives, world_size)  # 3B pairs
            enc = self.student.encode(pairs["pixels"], pairs["input_ids"], pairs["attention_mask"])
            out["itm_logits"] = self.student.itm_head(enc.tokens[:, self.student.itm_index])  # (3B, 2)
            aux.append(enc.aux_loss)
        # the batch's balancing loss repeated per sample: its mean is the loss, also over GradCache's chunks
        out["moe_aux"] = torch.stack(aux).mean().expand(x_image.shape[0])  # (B,)
        return out


class EveRetrievalTask(RetrievalFinetuneTask):
    """:class:`~evlp.train.retrieval.RetrievalFinetuneTask` for EVE: ITC + ``itm_weight`` x ITM + the MoE's
    balancing loss (module doc); data, validation (dual-encoder R@K) and checkpoints as the base task.

    Raises:
        CheckpointError: the model at ``cfg.ckpt`` has no ITM head.
        ConfigError: ``train.grad_cache`` with ITM on.
    """

    find_unused_parameters = True  # an expert may get no token in a step

    def __init__(self, cfg: RetrievalFinetuneConfig) -> None:
        super().__init__(cfg)
        if not has_itm_head(self.encoder.model):
            raise CheckpointError(f"{cfg.ckpt}: model.arch is eve but the model has no ITM head")
        self.itm_weight = float(cfg.itm_weight)
        self.aux_weight = float(self.encoder.config.eve.aux_loss_weight)
        if self.itm_weight > 0 and cfg.train.grad_cache > 1:
            raise ConfigError(f"train.grad_cache={cfg.train.grad_cache}: EVE's ITM draws its hard negatives from the "
                              "whole batch's ITC similarities, which a chunked step cannot see; set "
                              "train.grad_cache=1 (train.grad_accum still works), or itm_weight=0 for ITC alone")

    def build_module(self) -> nn.Module:
        return EveRetrievalModule(self.encoder.model.train(), itm=self.itm_weight > 0)

    def splits_step(self) -> bool:
        return self.itm_weight == 0 and super().splits_step()

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.itm_weight == 0:
            return super().training_step(module, batch, dist)
        out = module(batch["image"], batch["input_ids"], batch["attention_mask"], rank=dist.rank,
                     world_size=dist.world_size)
        return self.loss(out, batch, dist)

    def loss(self, out: dict[str, Tensor], batch: dict[str, Any], dist: DistInfo
             ) -> tuple[Tensor, dict[str, Tensor]]:
        itc = clip_loss(out["x_image"].float(), out["x_text"].float(), out["scale"].float(), rank=dist.rank,
                        world_size=dist.world_size)
        aux = out["moe_aux"].float().mean()
        loss = itc.loss + self.aux_weight * aux
        metrics = {"itc_loss": itc.loss.detach(), "itc_acc": itc.acc.detach(), "moe_aux_loss": aux.detach(),
                   "scale": out["scale"].detach()}
        if "itm_logits" in out:
            itm = itm_loss(out["itm_logits"])
            loss = loss + self.itm_weight * itm.loss
            metrics.update(itm_loss=itm.loss.detach(), itm_acc=itm.acc)
        return loss, metrics
