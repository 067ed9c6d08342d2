"""Transformer blocks of S-SMKE: the shared block and Data2Vec2's post-LN block.

Both keep the parameter names of the original implementations (timm / BEiT / data2vec2:
``attn.qkv``, ``attn.proj``, ``norm1``, ``mlp.fc1`` ...) so checkpoint converters stay simple.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerScale, Mlp
from torch import Tensor, nn

LN_EPS = 1e-6


class QVBiasAttention(nn.Module):
    """Multi-head self-attention in BEiT style: a bias-free qkv projection plus learnable q and v biases
    (the k bias is fixed at zero), computed with ``scaled_dot_product_attention``.

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must be divisible by it).
        attn_drop: dropout on attention probabilities.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``x`` (B, T, D); ``key_padding_mask`` (B, T), True (or 1) where the token is padding."""
        b, t, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, T, 3D)
        q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd)
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, T), True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0
        )  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out))


class SharedBlock(nn.Module):
    """The pre-LN block shared by both modalities, with LayerScale on both residual branches.

    ``forward`` returns ``(interm_cls, x)``: the CLS row of the first MLP layer's *pre-activation*
    output (B, mlp_ratio*D), used by ITC level 1, and the full block output (B, T, D).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        layer_scale_init: initial LayerScale value (0.2 in S-SMKE).
        dropout: dropout after the attention projection and inside the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, layer_scale_init: float = 0.2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = QVBiasAttention(dim, num_heads, proj_drop=dropout)
        self.ls1 = LayerScale(dim, init_values=layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU, drop=dropout)
        self.ls2 = LayerScale(dim, init_values=layer_scale_init)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = x + self.ls1(self.attn(self.norm1(x), key_padding_mask))  # (B, T, D)
        h = self.mlp.fc1(self.norm2(x))  # (B, T, hidden), pre-activation
        interm_cls = h[:, 0]  # (B, hidden)
        h = self.mlp.drop1(self.mlp.act(h))
        h = self.mlp.drop2(self.mlp.fc2(self.mlp.norm(h)))
        return interm_cls, x + self.ls2(h)


class PostLNBlock(nn.Module):
    """Data2Vec2's block: ``x = LN1(x + Attn(x)); x = LN2(x + MLP(x))`` (post-LN, no LayerScale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


@torch.no_grad()
def init_fresh_weights(module: nn.Module) -> None:
    """The reference's init for newly created parts: Linear weights ~ N(0, 0.02) truncated at +-1 std,
    biases 0, LayerNorm weight 1 / bias 0. LayerScale values and q/v biases keep their own inits."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_blocks(blocks: nn.Sequential, x: Tensor, checkpointed: bool) -> Tensor:
    """``blocks(x)``; with ``checkpointed`` each block's activations are recomputed in the backward pass
    (``torch.utils.checkpoint``, non-reentrant: the same values and gradients, less memory)."""
    if not checkpointed:
        return blocks(x)
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x
