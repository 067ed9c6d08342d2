"""ELIP's token pruning inside an image tower (``model.image.prune_layers`` / ``prune_keep``).

Guo et al., "ELIP: Efficient Language-Image Pre-training with Fewer Vision Tokens" (arXiv 2309.16738): at a
few stage starts the patch tokens the CLS attends to least stop going through the tower; they are not thrown
away but merged into one token, so the CLS can still read a summary of them. It applies in pretraining only:
evaluation, encoding and fine-tuning see every token (``evlp.api.load`` switches it off).

How it ranks, and why not as ELIP does. ELIP ranks by the CLS attention of the *last* block of each stage,
which it gets from a no-grad look-ahead: a whole extra forward of the stretch on a copy of the tokens. That
look-ahead costs about as much as the pruning saves (seed_systems.md 2.1: ~5 % fewer ViT FLOPs where the
token-layers drop ~29 %). Here the block about to run ranks the tokens with its own attention weights (its
norm, if it has one before the attention, and its q/k projections): one extra query row against keys of the
current tokens, the criterion of EViT (Liang et al., "Not All Patches are What You Need", ICLR 2022). The saved
token-layers are then saved FLOPs; the ranking sees one block less of context than ELIP's.

The rules, at each pruning block, with N the patch tokens entering the tower's first block (after FLIP's patch
dropout, when that is on too: the two compose):
- the attention of the query over *all* current tokens (the block's own softmax), averaged over heads;
- the query is the CLS, or ``(1 - g) CLS + g text CLS`` with text guidance ``g`` (ELIP: g = 0.2; the text CLS
  comes in detached); keys are those of the real tokens, so the guidance only moves the ranking;
- the ``max(1, round(keep * N))`` best-ranked patches stay, in their original order, after the prefix tokens
  (CLS, registers), which always stay;
- every other patch *and the merged token of an earlier stage* fold into one new merged token, last in the
  sequence: their mean weighted by their attention, renormalised over that set. So a sequence holds at most one
  merged token and every kept token is a real patch (ELIP instead ranks an earlier merged token like a patch
  and may keep it, leaving two summaries);
- the ranking and the merge weights carry no gradient (as in ELIP); the kept and merged features do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from evlp.errors import ConfigError


@dataclass(frozen=True)
class TokenPruning:
    """A pruning schedule: before block ``layers[i]`` keep ``keep[i]`` of the patch tokens that entered the
    tower; ``text_guidance`` weighs the text CLS in the ranking query."""

    layers: tuple[int, ...]
    keep: tuple[float, ...]
    text_guidance: float = 0.0

    @classmethod
    def from_config(cls, cfg: object) -> TokenPruning | None:
        """The schedule of an :class:`~evlp.config.schema.ImageTowerConfig`; None when pruning is off."""
        layers = tuple(int(i) for i in getattr(cfg, "prune_layers", ()) or ())
        if not layers:
            return None
        return cls(layers, tuple(float(k) for k in cfg.prune_keep), float(cfg.prune_text_guidance))

    def keep_at(self, block: int) -> float | None:
        """The keep fraction before ``block``, or None when nothing is pruned there."""
        return self.keep[self.layers.index(block)] if block in self.layers else None


class PrunedTower:
    """What an image tower that prunes tokens in training (its ``pruning``) tells the model around it."""

    pruning: TokenPruning | None = None

    @property
    def prune_text_guidance(self) -> float:
        """The text CLS's weight in the pruning query; 0 when nothing prunes (the caller then passes no text)."""
        return self.pruning.text_guidance if self.pruning is not None else 0.0


def _pre_norm(block: nn.Module) -> bool | None:
    """Whether ``block``'s attention reads ``norm1(x)`` (pre-LN) rather than ``x`` (post-LN); None for a block
    type this module does not know. Looked up along the class's bases: FSDP2 swaps a wrapped block's class for a
    subclass of it."""
    from timm.models.vision_transformer import Block, ResPostBlock

    from evlp.models.blocks import PostLNBlock

    kinds = {Block: True, ResPostBlock: False, PostLNBlock: False}
    return next((kinds[c] for c in type(block).__mro__ if c in kinds), None)


def check_prunable(blocks: nn.Module, pruning: TokenPruning, what: str) -> None:
    """Raise a ConfigError unless every pruning block exists and is a block whose attention this module can
    reproduce (timm's ``Block`` / ``ResPostBlock`` and Data2Vec2's post-LN block, each with timm's Attention).

    Args:
        blocks: the tower's transformer blocks, in order.
        pruning: the schedule.
        what: the model named in the error (``timm model 'vit_small_patch16_224'``).
    """
    n = len(blocks)
    if pruning.layers[-1] > n - 1:
        raise ConfigError(f"model.image.prune_layers={list(pruning.layers)}: {what} has {n} blocks, so the indices "
                          f"must lie in [1, {n - 1}]")
    for i in pruning.layers:
        block = blocks[i]
        if _pre_norm(block) is None or not isinstance(getattr(block, "attn", None), Attention):
            raise ConfigError(f"model.image.prune_layers: block {i} of {what} is a {type(block).__name__}, whose "
                              "attention token pruning cannot rank by; use a plain ViT or set "
                              "model.image.prune_layers=[]")


@torch.no_grad()
def cls_attention(block: nn.Module, x: Tensor, query: Tensor) -> Tensor:
    """The attention of one query token over ``x``'s tokens, with ``block``'s attention weights, averaged over
    heads: what the block's own softmax would give that query (no dropout, no gradient).

    Args:
        block: a block :func:`check_prunable` accepts.
        x: (B, T, D) the tokens entering the block.
        query: (B, D) the query token, in the same (residual-stream) space as ``x``.

    Returns:
        (B, T) probabilities, each row summing to 1.
    """
    if callable(getattr(block, "unshard", None)):
        block.unshard()  # FSDP2 shards the block's weights: gather them now (its own forward, next, reuses them)
    attn: Attention = block.attn
    if _pre_norm(block):
        x, query = block.norm1(x), block.norm1(query)
    b, t, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim
    width = h * hd
    w, bias = attn.qkv.weight, attn.qkv.bias  # rows: q, then k, then v (timm's layout)
    q = F.linear(query, w[:width], None if bias is None else bias[:width])  # (B, H*hd)
    k = F.linear(x, w[width:2 * width], None if bias is None else bias[width:2 * width])  # (B, T, H*hd)
    q = attn.q_norm(q.view(b, h, 1, hd))  # (B, H, 1, hd)
    k = attn.k_norm(k.view(b, t, h, hd).transpose(1, 2))  # (B, H, T, hd)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, T)
    return probs.mean(dim=1)[:, 0]  # (B, T)


def prune_tokens(x: Tensor, probs: Tensor, keep: int, num_prefix: int, merged: bool) -> Tensor:
    """Keep the ``keep`` patches with the most attention, in their order; fold the rest into one token.

    Args:
        x: (B, T, D) tokens laid out as [prefix (num_prefix), patches (n), merged token (1 if ``merged``)].
        probs: (B, T) the query's attention over those tokens (:func:`cls_attention`).
        keep: patches to keep; at most n.
        num_prefix: leading tokens that always stay (CLS, registers).
        merged: whether ``x`` ends with the merged token of an earlier stage.

    Returns:
        (B, num_prefix + keep + 1, D): the prefix, the kept patches, then the new merged token (the weighted
        mean of the dropped patches and the earlier merged token, weights = their attention renormalised over
        that set); ``x`` itself when nothing is dropped and there is no merged token.
    """
    b, t, d = x.shape
    n = t - num_prefix - int(merged)
    keep = min(keep, n)
    if keep == n and not merged:
        return x
    scores = probs[:, num_prefix:num_prefix + n]  # (B, n)
    kept_idx = scores.topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep), original order
    patches = x[:, num_prefix:num_prefix + n]  # (B, n, D)
    kept = patches.gather(1, kept_idx.unsqueeze(-1).expand(b, keep, d))  # (B, keep, D)
    weights = probs[:, num_prefix:].scatter(1, kept_idx, 0.0)  # (B, n + merged): zero for the kept patches
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    folded = torch.bmm(weights.unsqueeze(1).to(x.dtype), x[:, num_prefix:])  # (B, 1, D)
    return torch.cat([x[:, :num_prefix], kept, folded], dim=1)


def run_pruned_blocks(blocks: nn.Module, x: Tensor, pruning: TokenPruning, *, num_prefix: int,
                      text_cls: Tensor | None = None, checkpointed: bool = False) -> Tensor:
    """``blocks(x)`` with the tokens pruned before each of ``pruning.layers``.

    Args:
        blocks: the tower's blocks, in order (checked by :func:`check_prunable`).
        x: (B, num_prefix + N, D) the tokens entering the first block, CLS first.
        pruning: the schedule.
        num_prefix: leading non-patch tokens (CLS, registers).
        text_cls: (B, D) the caption's text CLS; needed with text guidance, ignored without.
        checkpointed: recompute each block's activations in the backward pass.

    Returns:
        (B, T', D) the last block's output: the prefix, the kept patches, then the merged token.

    Raises:
        ConfigError: text guidance without a text CLS (a model family that does not pass one: only S-SMKE does).
    """
    g = pruning.text_guidance
    if g > 0 and text_cls is None:
        raise ConfigError(f"model.image.prune_text_guidance={g}: this model does not pass the caption's text CLS "
                          "to its image tower (S-SMKE does); set model.image.prune_text_guidance=0")
    n_entering = x.shape[1] - num_prefix
    merged = False
    for i, block in enumerate(blocks):
        keep = pruning.keep_at(i)
        if keep is not None:
            query = x[:, 0] if g == 0 else (1.0 - g) * x[:, 0] + g * text_cls.to(x.dtype)  # (B, D)
            probs = cls_attention(block, x, query.detach())  # (B, T)
            pruned = prune_tokens(x, probs, max(1, round(keep * n_entering)), num_prefix, merged)
            merged = merged or pruned is not x
            x = pruned
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
