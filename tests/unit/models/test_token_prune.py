"""ELIP's token pruning (``model.image.prune_layers`` / ``prune_keep`` / ``prune_text_guidance``).

The reference below ranks and merges with plain matmuls and Python loops over samples and heads, from the
blocks' weights; the towers must produce the same sequences, outputs and gradients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.config import PretrainConfig, load_config
from evlp.config.schema import ImageTowerConfig
from evlp.errors import ConfigError
from evlp.models.image import Data2Vec2ImageTower, TimmImageTower
from evlp.models.token_prune import TokenPruning
from tests.conftest import run_cli


def _d2v(depth: int = 4, patch_dropout: float = 0.0, **prune: object) -> Data2Vec2ImageTower:
    """A random Data2Vec2 tower (32 px, patch 8: 16 patches) with attention sharp enough to rank clearly."""
    torch.manual_seed(0)
    cfg = ImageTowerConfig(img_size=32, patch_size=8, width=32, depth=depth, num_heads=4, checkpoint=None,
                           patch_dropout=patch_dropout, **prune)
    tower = Data2Vec2ImageTower(cfg)
    with torch.no_grad():
        for block in tower.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.4)
    return tower.double()


def _timm(pruning: TokenPruning | None) -> TimmImageTower:
    torch.manual_seed(0)
    return TimmImageTower("vit_tiny_patch16_224", img_size=64, pruning=pruning).double()  # 16 patches


def _pixels(size: int, batch: int = 3) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reference_attention(block: nn.Module, x: Tensor, query: Tensor, pre_norm: bool) -> Tensor:
    """(B, T): the query's attention over x's tokens with the block's weights, head by head, then averaged."""
    if pre_norm:
        n = block.norm1
        x, query = (F.layer_norm(t, n.normalized_shape, n.weight, n.bias, n.eps) for t in (x, query))
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    heads = block.attn.num_heads
    d = w.shape[0] // 3
    hd = d // heads
    out = torch.zeros(x.shape[:2], dtype=x.dtype)
    for s in range(x.shape[0]):
        for h in range(heads):
            rows = slice(h * hd, (h + 1) * hd)
            q = query[s] @ w[rows].T + b[rows]  # (hd,)
            k = x[s] @ w[d:2 * d][rows].T + b[d:2 * d][rows]  # (T, hd)
            out[s] += torch.softmax(k @ q / math.sqrt(hd), dim=0) / heads
    return out


def _reference_prune(x: Tensor, probs: Tensor, keep: int, merged: bool) -> tuple[Tensor, list[list[int]]]:
    """[CLS, the top-``keep`` patches by ``probs`` in order, the attention-weighted mean of the rest and of an
    earlier merged token]; also the kept patch indices."""
    rows, kept_all = [], []
    t = x.shape[1]
    n = t - 1 - int(merged)
    for s in range(x.shape[0]):
        ranked = sorted(range(n), key=lambda j: -float(probs[s, 1 + j].detach()))
        kept = sorted(ranked[:keep])
        rest = [1 + j for j in ranked[keep:]] + ([t - 1] if merged else [])
        w = probs[s, rest] / probs[s, rest].sum()
        folded = sum(w[i] * x[s, j] for i, j in enumerate(rest))
        rows.append(torch.cat([x[s, :1], x[s, [1 + j for j in kept]], folded[None]]))
        kept_all.append(kept)
    return torch.stack(rows), kept_all


def _block_io(blocks: nn.Module) -> tuple[list[Tensor], list[Tensor], list]:
    """Hooks that record each block's input and output."""
    ins: list[Tensor] = []
    outs: list[Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, a: ins.append(a[0].detach())) for b in blocks]
    handles += [b.register_forward_hook(lambda m, a, o: outs.append(o.detach())) for b in blocks]
    return ins, outs, handles


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_token_counts_follow_the_schedule(patch_dropout: float) -> None:
    """Before block l the sequence is CLS + round(keep * N) + 1 merged token, N = the patches entering the
    tower (after FLIP's patch dropout: the two compose)."""
    layers, keep = [1, 3], [0.75, 0.5]
    tower = _d2v(patch_dropout=patch_dropout, prune_layers=layers, prune_keep=keep).train()
    ins, _, _ = _block_io(tower.blocks)
    out = tower(_pixels(32))
    n = round(16 * (1 - patch_dropout))
    want, t = [], 1 + n
    for i in range(4):
        if i in layers:
            t = 1 + round(keep[layers.index(i)] * n) + 1
        want.append(t)
    assert [x.shape[1] for x in ins] == want
    assert out.shape[1] == want[-1]


@pytest.mark.parametrize("kind", ["data2vec2", "timm"])
def test_kept_tokens_are_the_top_k_by_cls_attention_and_the_rest_merge_by_it(kind: str) -> None:
    """At each pruning block the sequence equals the reference: the top-k patches by the block's own CLS
    attention, in order, then the attention-weighted mean of the dropped ones (and, at the second stage, of
    the first stage's merged token)."""
    layers, keep = (1, 3), (0.75, 0.5)
    if kind == "data2vec2":
        tower = _d2v(prune_layers=list(layers), prune_keep=list(keep))
        blocks, pre_norm, pixels = tower.blocks, False, _pixels(32)
    else:
        tower = _timm(TokenPruning(layers, keep))
        blocks, pre_norm, pixels = tower.model.blocks, True, _pixels(64)
    ins, outs, _ = _block_io(blocks)
    tower.train()(pixels)
    for stage, (layer, k) in enumerate(zip(layers, keep)):
        before = outs[layer - 1]
        probs = _reference_attention(blocks[layer], before, before[:, 0], pre_norm)
        want, kept = _reference_prune(before, probs, round(k * 16), merged=stage > 0)
        torch.testing.assert_close(ins[layer], want, rtol=1e-9, atol=1e-9)
        assert len({tuple(x) for x in kept}) > 1  # the samples keep different patches


def test_text_guidance_moves_the_ranking_as_computed() -> None:
    g = 0.3
    tower = _d2v(prune_layers=[1], prune_keep=[0.5], prune_text_guidance=g).train()
    text_cls = torch.randn(3, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    ins, outs, _ = _block_io(tower.blocks)
    tower(_pixels(32), text_cls=text_cls)
    before = outs[0]
    guided = _reference_attention(tower.blocks[1], before, (1 - g) * before[:, 0] + g * text_cls, False)
    want, kept = _reference_prune(before, guided, 8, merged=False)
    torch.testing.assert_close(ins[1], want, rtol=1e-9, atol=1e-9)
    _, kept_alone = _reference_prune(before, _reference_attention(tower.blocks[1], before, before[:, 0], False),
                                     8, merged=False)
    assert kept != kept_alone  # the text changed which patches stay
    with pytest.raises(ConfigError, match="prune_text_guidance=0.3: this model does not pass"):
        tower(_pixels(32))  # a model family that has no text CLS to give


def test_gradients_flow_through_the_kept_and_merged_tokens_only() -> None:
    """Parameter gradients equal those of a reference forward that prunes with detached (constant) ranking
    and merge weights: the kept and merged features carry gradients, the ranking none."""
    layers, keep = [1, 3], [0.75, 0.5]
    tower = _d2v(prune_layers=layers, prune_keep=keep).train()
    pixels = _pixels(32)
    tower(pixels).pow(2).sum().backward()
    got = {k: p.grad.clone() for k, p in tower.named_parameters()}
    tower.zero_grad()
    x = torch.cat([tower.cls_token.expand(3, -1, -1), tower.patch_embed(pixels) + tower.pos_embed], dim=1)
    x = tower.norm_pre(x)
    for i, block in enumerate(tower.blocks):
        if i in layers:
            with torch.no_grad():
                probs = _reference_attention(block, x, x[:, 0], False)
            x, _ = _reference_prune(x, probs, round(keep[layers.index(i)] * 16), merged=i != layers[0])
        x = block(x)
    x.pow(2).sum().backward()
    assert got["patch_embed.proj.weight"].abs().sum() > 0
    for k, p in tower.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-7, atol=1e-10, msg=k)


def test_pruning_off_keep_all_and_eval_mode_are_the_plain_tower() -> None:
    pixels = _pixels(32)
    plain = _d2v().train()
    with torch.no_grad():
        x = torch.cat([plain.cls_token.expand(3, -1, -1), plain.patch_embed(pixels) + plain.pos_embed], dim=1)
        want = plain.blocks(plain.norm_pre(x))  # the tower's forward without any pruning
    assert plain.pruning is None
    torch.testing.assert_close(plain(pixels).detach(), want, rtol=0, atol=0)
    keep_all = _d2v(prune_layers=[1, 2], prune_keep=[1.0, 1.0]).train()  # nothing dropped, nothing merged
    torch.testing.assert_close(keep_all(pixels).detach(), want, rtol=0, atol=0)
    pruned = _d2v(prune_layers=[1], prune_keep=[0.25]).eval()
    torch.testing.assert_close(pruned(pixels).detach(), want, rtol=0, atol=0)
    timm_pruned, timm_plain = _timm(TokenPruning((1,), (0.25,))).eval(), _timm(None).eval()
    torch.testing.assert_close(timm_pruned(_pixels(64)), timm_plain(_pixels(64)), rtol=0, atol=0)
    assert timm_pruned.train()(_pixels(64)).shape[1] == 1 + 4 + 1


def _s_smke_step(g: float) -> tuple[nn.Module, dict[str, Tensor], list, list[int], tuple[Tensor, ...]]:
    """A tiny S-SMKE with pruning (text guidance ``g``) and one training forward, recording the towers' calls
    in order (with the image tower's ``text_cls``) and the lengths entering the shared block."""
    from evlp.models import build_model, model_config

    torch.manual_seed(0)
    model = build_model(model_config("s_smke_tiny", text={"dropout": 0.0}, image={
        "prune_layers": [1], "prune_keep": [0.5], "prune_text_guidance": g})).train()
    calls: list[tuple[str, Tensor | None]] = []
    lengths: list[int] = []
    model.text.register_forward_hook(lambda m, a, o: calls.append(("text", None)))
    model.image.register_forward_hook(lambda m, a, kw, o: calls.append(("image", kw.get("text_cls"))),
                                      with_kwargs=True)
    model.shared.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    ids = torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(3))
    inputs = (torch.randn(2, 3, 64, 64), ids, torch.ones_like(ids))
    return model, model(*inputs), calls, lengths, inputs


def test_s_smke_passes_the_detached_text_cls_only_with_guidance() -> None:
    """With guidance the text tower runs first and its CLS (detached) reaches the image tower, whose shorter
    output the shared block takes; without, the image goes first with no text (the RNG order of before)."""
    model, out, calls, lengths, (pixels, ids, mask) = _s_smke_step(0.2)
    assert [c[0] for c in calls] == ["text", "image"]
    text_cls = calls[1][1]
    assert text_cls is not None and not text_cls.requires_grad
    assert lengths[0] == 1 + 32 + 1  # the image's pass through the shared block: CLS, 32 kept, 1 merged
    with torch.no_grad():
        torch.testing.assert_close(text_cls, model.text(ids, mask)[:, 0])
        torch.testing.assert_close(out["x_image"], model.encode_image(pixels, text_cls=text_cls)["x"])
        torch.testing.assert_close(out["x_text"], model.encode_text(ids, mask)["x"])
    _, _, calls, lengths, _ = _s_smke_step(0.0)
    assert calls == [("image", None), ("text", None)]
    assert lengths[0] == 1 + 32 + 1
    from evlp.models import build_model, model_config

    with pytest.raises(ConfigError, match=r"text width \(32\).*image tower width \(64\)"):
        build_model(model_config("s_smke_tiny", text={"hidden_size": 32},
                                 image={"prune_layers": [1], "prune_keep": [0.5], "prune_text_guidance": 0.2}))


@pytest.mark.parametrize(("overrides", "match"), [
    (["model.image.prune_layers=[1]"], r"prune_keep: one keep fraction per prune layer"),
    (["model.image.depth=4", "model.image.prune_layers=[2,1]", "model.image.prune_keep=[0.5,0.5]"],
     r"prune_layers: block indices must be strictly increasing"),
    (["model.image.prune_layers=[2]", "model.image.prune_keep=[0.5]"], r"prune_layers: block indices in \[1, 1\]"),
    (["model.image.prune_layers=[0]", "model.image.prune_keep=[0.5]"], r"prune_layers: block indices in \[1, 1\]"),
    (["model.image.prune_layers=[1]", "model.image.prune_keep=[0]"], r"prune_keep: fractions in \(0, 1\]"),
    (["model.image.depth=4", "model.image.prune_layers=[1,2]", "model.image.prune_keep=[0.5,0.7]"],
     r"prune_keep: must not increase"),
    (["model.image.prune_text_guidance=0.2"], r"prune_text_guidance: 0.2 has nothing to guide"),
    (["model.image.prune_layers=[1]", "model.image.prune_keep=[0.5]", "model.image.prune_text_guidance=1.5"],
     r"prune_text_guidance: a weight in \[0, 1\]"),
    (["model.image.prune_layers=[1]", "model.image.prune_keep=[0.5]", "model.image.lock=true"],
     r"prune_layers: a fully locked image tower"),
])
def test_bad_settings_are_refused_with_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(PretrainConfig, "tiny", overrides)


def test_timm_models_it_cannot_rank_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"prune_layers: timm model 'resnet18' is not a ViT"):
        TimmImageTower("resnet18", img_size=32, pruning=TokenPruning((1,), (0.5,)))
    with pytest.raises(ConfigError, match=r"prune_layers=\[12\]: timm model .* has 12 blocks"):
        TimmImageTower("vit_tiny_patch16_224", img_size=32, pruning=TokenPruning((12,), (0.5,)))


def test_pretrain_cli_prunes_in_training_and_evaluates_on_every_token(synth_data: Path, tmp_path: Path) -> None:
    """2 steps of the tiny recipe with pruning through the CLI, then its evaluation; the run's model prunes in
    training, and what the run hands downstream (encoding, fine-tuning) sees every patch, in training mode too."""
    from evlp.api import load
    from evlp.config.loader import from_dict, read_yaml
    from evlp.config.schema import ModelConfig
    from evlp.models import build_model

    run = tmp_path / "run"
    res = run_cli("pretrain", "--config", "tiny", "--data", str(synth_data), "--out", str(run),
                  "train.batch_size=8", "data.num_workers=0", "loss.memory_bank_size=16", "train.max_steps=2",
                  "model.image.prune_layers=[1]", "model.image.prune_keep=[0.5]")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "eval" / "retrieval.json").read_text())["metrics"]["rsum"] >= 0
    model_cfg = from_dict(ModelConfig, read_yaml(run / "config.yaml")["model"])
    assert (model_cfg.image.prune_layers, model_cfg.image.prune_keep) == ([1], [0.5])
    pixels = torch.randn(2, 3, 64, 64)
    assert build_model(model_cfg).train().image(pixels).shape[1] == 1 + 32 + 1  # what the run trained
    encoder = load(run, device="cpu")
    assert encoder.config.image.prune_layers == []
    assert encoder.model.image.train()(pixels).shape[1] == 1 + 64
