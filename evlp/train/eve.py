"""EVE's pretraining: masked signal modeling on image-text pairs, with no contrastive loss (seed_systems.md 3).

One joint pass of the shared encoder over the *visible* patches of each image (MAE: the masked ones are never
encoded) and its caption with some tokens replaced by [MASK]; a light pixel decoder reconstructs the masked
patches (MSE on each patch's normalised pixels) and an MLM head predicts the masked tokens, each conditioned on
the other modality through the shared attention. The loss is ``image + text + model.eve.aux_loss_weight * MoE
load balancing``.

The masks are drawn inside :meth:`EvePretrainTask.forward` from torch's global generator, so a replayed forward
(``train.grad_cache``) draws the same ones. :meth:`EvePretrainTask.forward` returns per-sample loss sums and
counts, so the loss of a batch split into chunks is the loss of the whole batch; only the MoE's capacity, which
is shared by the tokens of one forward pass, differs per chunk (as with ``train.grad_accum``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.models import build_model
from evlp.models.eve import patchify
from evlp.train.pretrain import PretrainTask

__all__ = ["EvePretrainModule", "EvePretrainTask", "patch_targets", "random_patch_keep", "random_text_mask"]


@dataclass
class PatchMask:
    """MAE's random masking of N patches: ``keep`` (B, K) the visible patches' indices (in random order),
    ``masked`` (B, N) bool, True at the hidden ones."""

    keep: Tensor
    masked: Tensor


def random_patch_keep(batch: int, num_patches: int, ratio: float, device: Any = None) -> PatchMask:
    """Hide ``ratio`` of each image's patches uniformly at random (torch's global generator): each image keeps
    ``int(num_patches * (1 - ratio))`` of them, as MAE."""
    k = int(num_patches * (1 - ratio))
    keep = torch.rand(batch, num_patches, device=device).argsort(1)[:, :k]  # (B, K)
    masked = torch.ones(batch, num_patches, dtype=torch.bool, device=device).scatter(1, keep, False)
    return PatchMask(keep, masked)


def random_text_mask(input_ids: Tensor, attention_mask: Tensor, ratio: float, special_ids: Tensor) -> Tensor:
    """(B, T) bool: ``round(ratio * n)`` (at least 1) of each caption's ``n`` ordinary tokens, chosen uniformly
    (torch's global generator); special tokens ([CLS], [SEP], [PAD] ...) and padding are never chosen."""
    maskable = (attention_mask > 0) & ~torch.isin(input_ids, special_ids)  # (B, T)
    if ratio <= 0:
        return torch.zeros_like(maskable)
    n = maskable.sum(1, keepdim=True)  # (B, 1)
    count = torch.where(n > 0, (n * ratio).round().clamp_min(1), 0)  # (B, 1)
    scores = torch.rand(input_ids.shape, device=input_ids.device).masked_fill(~maskable, 2.0)
    rank = scores.argsort(1).argsort(1)  # (B, T) each position's rank, maskable ones first
    return rank < count


def patch_targets(pixels: Tensor, patch: int, normalize: bool = True) -> Tensor:
    """(B, N, patch*patch*3) pixel targets; with ``normalize`` each patch is standardised by its own mean and
    (unbiased) variance, as MAE's ``norm_pix_loss``."""
    target = patchify(pixels.float(), patch)
    if normalize:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return target


class EvePretrainModule(nn.Module):
    """The trainable module under DDP: the EVE model as ``student`` (so checkpoints hold ``student.*`` keys, as
    every pretraining run's), its forward the masked signal modeling pass."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, pixels: Tensor, keep: Tensor, input_ids: Tensor, attention_mask: Tensor,
                mlm_mask: Tensor) -> dict[str, Any]:
        return self.student(pixels, keep, input_ids, attention_mask, mlm_mask)


class EvePretrainTask(PretrainTask):
    """Masked image (pixels) and language modeling on image-text pairs through EVE's shared encoder.

    The data stream, checkpoint state and artifacts are :class:`PretrainTask`'s (no teacher, no memory bank).

    Raises:
        ConfigError: a tokenizer without a mask token.
    """

    name = "eve pretrain"
    shared_outputs = ("moe_aux", "moe_load", "moe_dropped")

    def __init__(self, cfg: Any, resume_from: Any = None, *, pretrained: bool = True,
                 teacher_targets: Any = None) -> None:
        super().__init__(cfg, resume_from, pretrained=pretrained, teacher_targets=teacher_targets)
        tok = self.tokenizer.tokenizer
        if tok.mask_token_id is None:
            raise ConfigError(f"model.text.tokenizer {cfg.model.text.tokenizer_source!r} has no mask token; EVE's "
                              "masked language modeling needs one (e.g. a BERT WordPiece tokenizer)")
        self.mask_token_id = int(tok.mask_token_id)
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
        # the ITC projections, logit scale and ITM head train only in fine-tuning
        self.find_unused_parameters = True

    def build_module(self) -> nn.Module:
        student = build_model(self.cfg.model)  # random init: EVE has no pretrained towers (a resume loads its own)
        self.text_config = student.text_config()  # what save_artifacts writes as text_config.json
        return EvePretrainModule(student)

    def to(self, device: Any) -> None:
        self.special_ids = self.special_ids.to(device)

    def before_step(self, module: nn.Module, step: int, total: int) -> None:
        """EVE has no FLIP patch dropout (its masking is the objective)."""

    def after_optimizer_step(self, module: nn.Module) -> None:
        """Nothing to clamp: the logit scale trains only in fine-tuning."""

    # ------------------------------------------------------------------ the step
    def forward(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        eve, image = self.cfg.model.eve, self.cfg.model.image
        pixels, ids, att = batch["image"], batch["input_ids"], batch["attention_mask"]
        num_patches = (image.img_size // image.patch_size) ** 2
        mask = random_patch_keep(pixels.shape[0], num_patches, eve.image_mask_ratio, pixels.device)
        mlm = random_text_mask(ids, att, eve.text_mask_ratio, self.special_ids.to(ids.device))
        out = module(pixels, mask.keep, ids.masked_fill(mlm, self.mask_token_id), att, mlm)
        return {**self._sample_losses(out, pixels, ids, mask.masked, mlm, image.patch_size),
                **self._moe_outputs(out)}

    def _sample_losses(self, out: dict[str, Any], pixels: Tensor, ids: Tensor, masked: Tensor, mlm: Tensor,
                       patch: int) -> dict[str, Tensor]:
        """Per-sample sums and counts (B,) of the pixel errors on hidden patches and of the masked tokens' NLL."""
        target = patch_targets(pixels, patch, self.cfg.model.eve.norm_pix_loss)  # (B, N, P)
        err = (out["pixels"].float() - target).pow(2).mean(-1)  # (B, N)
        rows = mlm.nonzero(as_tuple=True)[0]  # (M,) row-major, as the module's logits
        logits = out["mlm_logits"].float()  # (M, V)
        labels = ids[mlm]  # (M,)
        nll = F.cross_entropy(logits, labels, reduction="none")  # (M,)
        per_row = torch.zeros(ids.shape[0], device=ids.device)
        return {
            "image_err": (err * masked).sum(1), "image_count": masked.sum(1).float(),
            "text_nll": per_row.index_add(0, rows, nll), "text_count": mlm.sum(1).float(),
            "text_correct": per_row.index_add(0, rows, (logits.argmax(-1) == labels).float()),
        }

    @staticmethod
    def _moe_outputs(out: dict[str, Any]) -> dict[str, Tensor]:
        """The MoE's load-balancing loss and, for the metrics, the experts' load and the dropped fraction (each
        averaged over the MoE layers): not per sample, so in :attr:`shared_outputs`."""
        routings = out["routings"]
        if not routings:
            zero = out["aux_loss"].new_zeros(())
            return {"moe_aux": zero, "moe_load": zero[None], "moe_dropped": zero}
        return {"moe_aux": out["aux_loss"],
                "moe_load": torch.stack([r.load for r in routings]).mean(0).detach(),
                "moe_dropped": torch.stack([r.dropped for r in routings]).mean().detach()}

    def loss(self, out: dict[str, Tensor], batch: dict[str, Any], dist: DistInfo
             ) -> tuple[Tensor, dict[str, Tensor]]:
        image = out["image_err"].sum() / out["image_count"].sum().clamp_min(1)
        tokens = out["text_count"].sum().clamp_min(1)
        text = out["text_nll"].sum() / tokens
        aux = out["moe_aux"].float()
        loss = image + text + self.cfg.model.eve.aux_loss_weight * aux
        load = out["moe_load"].float()
        experts = load.numel()
        metrics = {"image_loss": image.detach(), "text_loss": text.detach(),
                   "mlm_acc": (out["text_correct"].sum() / tokens).detach(), "moe_aux_loss": aux.detach(),
                   "moe_load_max": load.max() * experts, "moe_load_min": load.min() * experts,
                   "moe_drop_frac": out["moe_dropped"].float()}
        return loss, metrics
