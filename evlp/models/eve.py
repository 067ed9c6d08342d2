"""EVE: one shared encoder for images, text and image-text pairs, with a modality-aware MoE (seed_systems.md 3).

Self-attention is shared by both modalities everywhere. The FFN sublayer (with its LayerNorm) is routed by
modality in the lower layers (an image FFN for image tokens, a text FFN for text tokens, VLMo's multiway block)
and is a sparse MoE (:mod:`evlp.models.moe`) in the layers ``model.eve.moe_layers``, where a learned type vector
on the router input makes the routing modality-aware. A joint sequence is ``[image CLS, patches ; text tokens]``.

The structure is the released EVE-Base's (github ssyze/EVE, ``models/multiway_transformer.py``) so each released
tensor has a home; evlp's names differ (the converter maps them):

==========================================================  ==========================================
released (``backbone.`` prefix)                             evlp ``EVE``
==========================================================  ==========================================
patch_embed (Conv2d), class_embedding_vision                embed.patch_embed, embed.cls_token
pos_embed_vision (1+N, D), type_embed_vision                embed.image_pos_embed, embed.image_type
word_embedding, layer_norm_text                             embed.word_embeddings, embed.text_norm
pos_embed_text (196, D), type_embed_text                    embed.text_pos_embed, embed.text_type
pre_layrnorm, norm                                          pre_norm, norm
encoder.layers.i.attn.{qkv.weight,q_bias,v_bias,proj}       blocks.i.attn.(same)
encoder.layers.i.{norm1,gamma_1,gamma_2}                    blocks.i.{norm1,ls1.gamma,ls2.gamma}
encoder.layers.i.{norm2_imag,mlp_imag,norm2_text,mlp_text}  blocks.i.{norm2_image,mlp_image,norm2_text,mlp_text}
encoder.layers.i.norm2_vl (MoE layers)                      blocks.i.norm2
...mlp_moe.moe.gate.wg.weight (E, D)                        blocks.i.moe.router.weight
...mlp_moe.moe.{vision_embed,text_embed}                    blocks.i.moe.{image_type,text_type}
...mlp_moe.moe.experts.experts.e.fc{1,2}.{weight,bias}      blocks.i.moe.experts.fc{1,2}.{weight,bias}[e]
itc_{vision,text}_proj_head.weight, itc_temp (T)           image_proj / text_proj .weight, logit_scales=[ln 1/T]
itm_head                                                    itm_head
==========================================================  ==========================================

The pretraining heads (:class:`MLMHead`, :class:`PixelDecoder`) are evlp's: the authors did not release their
pretraining code. Where evlp departs from the released forward: visible patches keep their position embedding
(the released ``vision_ids_keep`` path gathers them from the patch embeddings without it), a token's modality
comes from its position in the actual sequence (not a fixed 197 image / 40 text split), padding is never routed
to an expert, and the dual-encoder embeddings pass through the final ``norm`` (as the released ITC training
does; its ``forward_eval`` skips it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, QuickGELU
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from evlp.config.schema import ModelConfig
from evlp.models.blocks import LN_EPS, QVBiasAttention, init_fresh_weights
from evlp.models.moe import IMAGE, TEXT, Routing, SparseMoE, trunc_normal

__all__ = ["EVE", "EveEncoding", "build_eve", "patchify"]


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, patch*patch*3), patches in row-major order, each (row, column, channel)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class EveEmbed(nn.Module):
    """Image and text embeddings: patch projection + CLS + absolute positions + type vector; word embedding,
    LayerNorm and dropout + absolute positions + type vector."""

    def __init__(self, dim: int, img_size: int, patch: int, vocab_size: int, max_text: int,
                 text_dropout: float) -> None:
        super().__init__()
        n = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(dim))
        self.image_pos_embed = nn.Parameter(torch.zeros(1 + n, dim))
        self.image_type = nn.Parameter(torch.zeros(dim))
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.text_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.text_drop = nn.Dropout(text_dropout)
        self.text_pos_embed = nn.Parameter(torch.zeros(max_text, dim))
        self.text_type = nn.Parameter(torch.zeros(dim))
        with torch.no_grad():
            for p in (self.patch_embed.weight, self.cls_token, self.image_pos_embed, self.image_type,
                      self.text_pos_embed, self.text_type):
                trunc_normal(p)
            nn.init.zeros_(self.patch_embed.bias)
            nn.init.normal_(self.word_embeddings.weight, std=0.02)

    def image(self, pixels: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, 1+N, D) tokens of ``pixels`` (B, 3, H, W); with ``keep`` (B, K) patch indices only those patches
        (MAE: the encoder never sees the others): (B, 1+K, D)."""
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.image_pos_embed[1:]  # (B, N, D)
        if keep is not None:
            patches = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))  # (B, K, D)
        cls = (self.cls_token + self.image_pos_embed[0]).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], 1) + self.image_type

    def text(self, input_ids: Tensor) -> Tensor:
        """(B, T, D) tokens of ``input_ids`` (B, T)."""
        h = self.text_drop(self.text_norm(self.word_embeddings(input_ids)))
        return h + self.text_pos_embed[: input_ids.shape[1]] + self.text_type


class EveBlock(nn.Module):
    """Pre-LN block with shared attention and LayerScale; the FFN is routed by modality or a sparse MoE.

    ``forward(x, n_image, padding)``: ``x`` (B, T, D) whose first ``n_image`` positions are image tokens,
    ``padding`` (B, T) True at padding or None; returns ``(x, routing or None)``.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, layer_scale_init: float, drop_path: float,
                 moe: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = QVBiasAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values=layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if moe is None:
            self.norm2_image = nn.LayerNorm(dim, eps=LN_EPS)
            self.mlp_image = Mlp(dim, hidden, act_layer=QuickGELU)
            self.norm2_text = nn.LayerNorm(dim, eps=LN_EPS)
            self.mlp_text = Mlp(dim, hidden, act_layer=QuickGELU)
            self.moe = None
        else:
            self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
            self.moe = SparseMoE(dim, hidden, act_layer=QuickGELU, **moe)
        self.ls2 = LayerScale(dim, init_values=layer_scale_init)

    def forward(self, x: Tensor, n_image: int, padding: Tensor | None) -> tuple[Tensor, Routing | None]:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), padding)))
        routing = None
        if self.moe is None:
            image, text = x[:, :n_image], x[:, n_image:]
            h = torch.cat([self.mlp_image(self.norm2_image(image)), self.mlp_text(self.norm2_text(text))], 1)
        else:
            modality = torch.where(torch.arange(x.shape[1], device=x.device) < n_image, IMAGE, TEXT)  # (T,)
            res = self.moe(self.norm2(x), modality, ~padding if padding is not None else None)
            h, routing = res.out, res.routing
        return x + self.drop_path(self.ls2(h)), routing


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then the (tied) word embedding matrix plus a bias."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor, word_embeddings: Tensor) -> Tensor:
        """(M, D) token states -> (M, V) logits."""
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)


class PixelDecoder(nn.Module):
    """MAE's light decoder: the encoder's visible image tokens, projected to its width, placed at their patch
    positions among mask tokens, plus its own position embedding, through a few ViT blocks, to pixels.

    ``forward(visible (B, 1+K, D), keep (B, K)) -> (B, N, patch*patch*3)`` predictions for every patch.
    """

    def __init__(self, dim: int, width: int, depth: int, num_heads: int, num_patches: int, patch: int) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.zeros(1 + num_patches, width))
        self.blocks = nn.Sequential(*[Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True,
                                            norm_layer=partial(nn.LayerNorm, eps=LN_EPS)) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.pred = nn.Linear(width, patch * patch * 3)
        init_fresh_weights(self)
        with torch.no_grad():
            trunc_normal(self.mask_token)
            trunc_normal(self.pos_embed)

    def forward(self, visible: Tensor, keep: Tensor) -> Tensor:
        h = self.embed(visible)  # (B, 1+K, W)
        b, _, w = h.shape
        grid = self.mask_token.to(h.dtype).expand(b, self.num_patches, w)
        grid = grid.scatter(1, keep[..., None].expand(-1, -1, w), h[:, 1:])  # (B, N, W)
        x = torch.cat([h[:, :1], grid], 1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, 1:].contiguous()  # a copy: FSDP2 warns on view outputs


@dataclass
class EveEncoding:
    """The encoder's output: ``tokens`` (B, T, D) after the final norm, the first ``n_image`` of them image
    tokens; ``aux_loss`` () the MoE layers' mean load-balancing loss; ``routings``: each MoE layer's."""

    tokens: Tensor
    n_image: int
    aux_loss: Tensor
    routings: list[Routing] = field(default_factory=list)


class EVE(nn.Module):
    """The EVE model: the shared encoder, dual-encoder projections, the ITM head, and the pretraining heads.

    Sizes come from ``cfg.eve`` (width, depth, heads, FFN, MoE), ``cfg.image`` (``img_size``, ``patch_size``)
    and ``cfg.text`` (``vocab_size``, ``max_position`` text positions, ``dropout`` of the text embedding).

    ``forward`` is the pretraining pass (masked signal modeling). ``encode_image`` / ``encode_text`` return
    ``{"x": (B, D) L2-normalised}``: the image-only (text-only) pass through the shared encoder, its CLS (the
    text's first token) projected, for evaluation as a dual encoder. ``forward_joint`` is the fused image-text
    pass for ITM: the ITM head reads the text's first token, right after the image tokens (:attr:`itm_index`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, img, txt = cfg.eve, cfg.image, cfg.text
        d = e.width
        self.cfg = cfg
        self.patch_size = img.patch_size
        self.num_patches = (img.img_size // img.patch_size) ** 2
        self.embed = EveEmbed(d, img.img_size, img.patch_size, txt.vocab_size, txt.max_position, txt.dropout)
        self.pre_norm = nn.LayerNorm(d, eps=LN_EPS)
        hidden = int(d * e.mlp_ratio)
        moe = {"num_experts": e.num_experts, "top_k": e.top_k, "capacity_factor": e.capacity_factor,
               "eval_capacity_factor": e.eval_capacity_factor, "min_capacity": e.min_capacity,
               "type_vector": e.router_type_vector, "type_to_experts": e.type_vector_to_experts,
               "noisy_second": e.noisy_second_expert}
        rates = [e.drop_path * i / max(e.depth - 1, 1) for i in range(e.depth)]  # grows with depth
        self.blocks = nn.ModuleList([
            EveBlock(d, e.num_heads, hidden, e.layer_scale_init, rates[i], moe if i in e.moe_layers else None)
            for i in range(e.depth)])
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.image_proj = nn.Linear(d, d, bias=False)
        self.text_proj = nn.Linear(d, d, bias=False)
        self.itm_head = nn.Linear(d, 2)
        self.logit_scales = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))
        self.mlm_head = MLMHead(d, txt.vocab_size)
        self.decoder = PixelDecoder(d, e.decoder_width, e.decoder_depth, e.decoder_heads, self.num_patches,
                                    img.patch_size)
        for part in (self.blocks, self.pre_norm, self.norm, self.image_proj, self.text_proj, self.itm_head,
                     self.mlm_head):
            init_fresh_weights(part)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block's activations in the backward pass."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ the shared encoder
    def encode(self, pixels: Tensor | None = None, input_ids: Tensor | None = None,
               attention_mask: Tensor | None = None, keep: Tensor | None = None) -> EveEncoding:
        """Images, text, or both (joint sequence ``[image ; text]``) through the shared encoder.

        Args:
            pixels: (B, 3, H, W) normalised images, or None.
            input_ids: (B, T) token ids, or None.
            attention_mask: (B, T), 1 = real token; default all real.
            keep: (B, K) indices of the patches the encoder sees (MAE); default all.
        """
        parts, n_image = [], 0
        if pixels is not None:
            parts.append(self.embed.image(pixels, keep))
            n_image = parts[0].shape[1]
        if input_ids is not None:
            parts.append(self.embed.text(input_ids))
        x = self.pre_norm(torch.cat(parts, 1))  # (B, T, D)
        padding = None
        if input_ids is not None and attention_mask is not None:
            padding = torch.cat([attention_mask.new_ones(x.shape[0], n_image), attention_mask], 1) == 0  # (B, T): images never pad
        routings = []
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                from torch.utils.checkpoint import checkpoint

                x, routing = checkpoint(block, x, n_image, padding, use_reentrant=False)
            else:
                x, routing = block(x, n_image, padding)
            if routing is not None:
                routings.append(routing)
        aux = torch.stack([r.aux_loss for r in routings]).mean() if routings else x.new_zeros(())
        return EveEncoding(self.norm(x), n_image, aux, routings)

    # ------------------------------------------------------------------ dual encoder, ITM
    def encode_image(self, pixels: Tensor) -> dict[str, Tensor]:
        """``pixels`` (B, 3, H, W), normalised -> ``{"x": (B, D)}``."""
        cls = self.encode(pixels=pixels).tokens[:, 0]  # (B, D)
        return {"x": F.normalize(self.image_proj(cls), dim=-1)}

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` (B, T), mask 1 = real token -> ``{"x": (B, D)}``."""
        cls = self.encode(input_ids=input_ids, attention_mask=attention_mask).tokens[:, 0]  # (B, D)
        return {"x": F.normalize(self.text_proj(cls), dim=-1)}

    def forward_joint(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The fused pass over ``[image ; text]``: (B, 1+N+T, D) tokens; ``itm_head(tokens[:, itm_index])``
        scores the pair (released EVE's ITM reads the text's first token)."""
        return self.encode(pixels, input_ids, attention_mask).tokens

    @property
    def itm_index(self) -> int:
        """Position of the token the ITM head reads in :meth:`forward_joint`'s output."""
        return 1 + self.num_patches

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Clamp the ITC log-scale to [0, ln(max_logit_scale)] (for contrastive fine-tuning)."""
        self.logit_scales.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    # ------------------------------------------------------------------ pretraining
    def forward(self, pixels: Tensor, keep: Tensor, input_ids: Tensor, attention_mask: Tensor,
                mlm_mask: Tensor) -> dict[str, Any]:
        """The pretraining pass (masked signal modeling): one joint pass over the visible patches and the
        (masked) caption, then the pixel decoder and the MLM head.

        Args:
            pixels: (B, 3, H, W); keep: (B, K) visible patch indices.
            input_ids: (B, T) caption ids with the masked positions already replaced; attention_mask: (B, T).
            mlm_mask: (B, T) bool, the positions to predict.

        Returns:
            ``pixels`` (B, N, patch*patch*3) predictions of every patch, ``mlm_logits`` (M, V) at the True
            positions of ``mlm_mask`` in row-major order, ``aux_loss`` () and ``routings`` (list).
        """
        enc = self.encode(pixels, input_ids, attention_mask, keep=keep)
        pred = self.decoder(enc.tokens[:, :enc.n_image], keep)  # (B, N, P)
        text = enc.tokens[:, enc.n_image:]  # (B, T, D)
        logits = self.mlm_head(text[mlm_mask], self.embed.word_embeddings.weight)  # (M, V)
        return {"pixels": pred, "mlm_logits": logits, "aux_loss": enc.aux_loss, "routings": enc.routings}

    # ------------------------------------------------------------------ reports
    def text_config(self) -> dict[str, Any]:
        """What a checkpoint's ``text_config.json`` holds for EVE: its text embedding's sizes (no HF model)."""
        t = self.cfg.text
        return {"model_type": "eve", "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position,
                "hidden_size": self.cfg.eve.width}

    def parts(self) -> dict[str, list[nn.Module]]:
        """The model's parts for parameter reports (the logit scale is counted with the last)."""
        moe = [b for b in self.blocks if b.moe is not None]
        dense = [b for b in self.blocks if b.moe is None]
        return {
            "embeddings": [self.embed, self.pre_norm],
            "multiway blocks": dense,
            "MoE blocks": moe,
            "pretraining heads (MLM, pixel decoder)": [self.mlm_head, self.decoder],
            "final norm, projections, ITM head, logit scale": [self.norm, self.image_proj, self.text_proj,
                                                               self.itm_head],
        }


def build_eve(cfg: ModelConfig, *, pretrained: bool = False, models_dir: str | Path = "models",
              text_config: dict[str, Any] | None = None) -> EVE:
    """The EVE model of ``cfg`` (``model.arch: eve``), random init: EVE has no pretrained towers to load
    (``pretrained``, ``models_dir`` and ``text_config`` are accepted for :func:`evlp.models.build_model`'s
    signature; released weights come in through a converter)."""
    return EVE(cfg)
