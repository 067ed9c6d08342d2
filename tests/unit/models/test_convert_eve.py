"""The released-EVE converter: a synthetic checkpoint in the ORIGINAL key layout (github ssyze/EVE,
``models/multiway_transformer.py`` under ``backbone.``, the retrieval model's heads), imported as an evlp model
folder, must reproduce a forward written here from that layout with plain tensor ops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evlp.errors import CheckpointError
from evlp.models.convert_eve import convert_eve, import_eve

D, HEADS, DEPTH, MOE, EXPERTS, HIDDEN = 32, 4, 3, (2,), 4, 64
IMG, PATCH, VOCAB, TEXT_POS = 32, 8, 512, 32
N = (IMG // PATCH) ** 2
EPS = 1e-6


def _rand(shape: tuple[int, ...], g: torch.Generator, name: str) -> torch.Tensor:
    if ("norm" in name or "layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if "gamma" in name:
        return 0.5 + 0.1 * torch.randn(shape, generator=g)
    return 0.2 * torch.randn(shape, generator=g)


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The retrieval model's state dict as the release names it (fine-tuned layout, type-routed MoE)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "backbone.patch_embed.weight": (D, 3, PATCH, PATCH), "backbone.patch_embed.bias": (D,),
        "backbone.class_embedding_vision": (D,), "backbone.type_embed_vision": (D,),
        "backbone.pos_embed_vision": (N + 1, D), "backbone.word_embedding.weight": (VOCAB, D),
        "backbone.type_embed_text": (D,), "backbone.layer_norm_text.weight": (D,),
        "backbone.layer_norm_text.bias": (D,), "backbone.pos_embed_text": (TEXT_POS, D),
        "backbone.pre_layrnorm.weight": (D,), "backbone.pre_layrnorm.bias": (D,),
        "backbone.norm.weight": (D,), "backbone.norm.bias": (D,),
        "itc_vision_proj_head.weight": (D, D), "itc_text_proj_head.weight": (D, D),
        "itm_head.weight": (2, D), "itm_head.bias": (2,),
    }
    mlp = {"fc1.weight": (HIDDEN, D), "fc1.bias": (HIDDEN,), "fc2.weight": (D, HIDDEN), "fc2.bias": (D,)}
    for i in range(DEPTH):
        p = f"backbone.encoder.layers.{i}."
        shapes.update({p + "attn.qkv.weight": (3 * D, D), p + "attn.q_bias": (D,), p + "attn.v_bias": (D,),
                       p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,), p + "norm1.weight": (D,),
                       p + "norm1.bias": (D,), p + "gamma_1": (D,), p + "gamma_2": (D,)})
        if i in MOE:
            shapes.update({p + "norm2_vl.weight": (D,), p + "norm2_vl.bias": (D,),
                           p + "mlp_moe.moe.gate.wg.weight": (EXPERTS, D), p + "mlp_moe.moe.vision_embed": (D,),
                           p + "mlp_moe.moe.text_embed": (D,)})
            for e in range(EXPERTS):
                shapes.update({f"{p}mlp_moe.moe.experts.experts.{e}.{k}": s for k, s in mlp.items()})
        else:
            for side in ("imag", "text"):
                shapes.update({p + f"norm2_{side}.weight": (D,), p + f"norm2_{side}.bias": (D,)})
                shapes.update({p + f"mlp_{side}.{k}": s for k, s in mlp.items()})
    state = {k: _rand(s, g, k) for k, s in shapes.items()}
    state["itc_temp"] = torch.tensor(0.05)
    state["backbone.position_ids_vision"] = torch.arange(N + 1).expand(1, -1)
    state["backbone.position_ids_text"] = torch.arange(TEXT_POS)
    return state


# ----------------------------------------------------------------------------- the released forward, by hand
def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, (D,), sd[p + ".weight"], sd[p + ".bias"], EPS)


def _mlp(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    h = x @ sd[p + ".fc1.weight"].T + sd[p + ".fc1.bias"]
    return (h * torch.sigmoid(1.702 * h)) @ sd[p + ".fc2.weight"].T + sd[p + ".fc2.bias"]  # quick_gelu


def released_forward(sd: dict, pixels=None, ids=None, att=None) -> tuple[torch.Tensor, int]:
    """``MultiwayTransformer.forward`` in 'vision', 'text' or 'vl' mode (top-2 MoE, the second expert the next
    highest gate, no capacity limit); returns the normed tokens and the number of image tokens."""
    parts, masks, n_img = [], [], 0
    if pixels is not None:
        patches = F.conv2d(pixels, sd["backbone.patch_embed.weight"], sd["backbone.patch_embed.bias"], stride=PATCH)
        patches = patches.flatten(2).transpose(1, 2)
        cls = sd["backbone.class_embedding_vision"].expand(pixels.shape[0], 1, D)
        parts.append(torch.cat([cls, patches], 1) + sd["backbone.pos_embed_vision"] + sd["backbone.type_embed_vision"])
        masks.append(torch.ones(pixels.shape[0], N + 1))
        n_img = N + 1
    if ids is not None:
        t = sd["backbone.word_embedding.weight"][ids]
        t = _ln(t, sd, "backbone.layer_norm_text")
        parts.append(t + sd["backbone.pos_embed_text"][: ids.shape[1]] + sd["backbone.type_embed_text"])
        masks.append(att.float())
    x = _ln(torch.cat(parts, 1), sd, "backbone.pre_layrnorm")
    mask = torch.cat(masks, 1).bool()
    b, n, _ = x.shape
    for i in range(DEPTH):
        p = f"backbone.encoder.layers.{i}."
        h = _ln(x, sd, p + "norm1")
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(D), sd[p + "attn.v_bias"]])
        qkv = (h @ sd[p + "attn.qkv.weight"].T + bias).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (D // HEADS) ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        a = ((a @ v).transpose(1, 2).reshape(b, n, D)) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + a * sd[p + "gamma_1"]
        if i in MOE:
            h = _ln(x, sd, p + "norm2_vl")
            typ = torch.where(torch.arange(n)[:, None] < n_img, sd[p + "mlp_moe.moe.vision_embed"],
                              sd[p + "mlp_moe.moe.text_embed"])
            h = h + typ  # the router's and the experts' input
            gates = (h @ sd[p + "mlp_moe.moe.gate.wg.weight"].T).softmax(-1)  # (B, n, E)
            top = gates.topk(2, -1)
            w = top.values / top.values.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for e in range(EXPERTS):
                y = _mlp(h, sd, f"{p}mlp_moe.moe.experts.experts.{e}")
                out = out + y * ((top.indices == e).float() * w).sum(-1, keepdim=True)
        else:
            out = torch.cat([_mlp(_ln(x[:, :n_img], sd, p + "norm2_imag"), sd, p + "mlp_imag"),
                             _mlp(_ln(x[:, n_img:], sd, p + "norm2_text"), sd, p + "mlp_text")], 1)
        x = x + out * sd[p + "gamma_2"]
    return _ln(x, sd, "backbone.norm"), n_img


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    from evlp.api import load

    sd = released_state()
    src = tmp_path_factory.mktemp("eve") / "eve_tiny_release.pth"
    torch.save({"model": sd, "config": {"image_res": IMG, "k_test": 128}}, src)
    res = import_eve(src, src.parent / "converted", tokenizer="tiny", model="eve_tiny")
    assert res.config.eve.moe_layers == list(MOE) and res.config.eve.num_experts == EXPERTS
    assert set(res.ignored) == {"backbone.position_ids_vision", "backbone.position_ids_text"}
    assert res.fresh and all(k.startswith(("mlm_head.", "decoder.")) for k in res.fresh)
    return sd, load(res.path, device="cpu")


def test_converted_model_reproduces_the_released_forward(imported) -> None:
    sd, enc = imported
    model = enc.model
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, IMG, IMG, generator=g)
    ids = torch.randint(5, 400, (2, 10), generator=g)
    att = torch.ones(2, 10, dtype=torch.long)
    att[1, 6:] = 0  # padding at the end of the second caption
    with torch.no_grad():
        img, _ = released_forward(sd, pixels=pixels)
        txt, _ = released_forward(sd, ids=ids, att=att)
        joint, n_img = released_forward(sd, pixels, ids, att)
        want_image = F.normalize(img[:, 0] @ sd["itc_vision_proj_head.weight"].T, dim=-1)
        want_text = F.normalize(txt[:, 0] @ sd["itc_text_proj_head.weight"].T, dim=-1)
        want_itm = joint[:, n_img] @ sd["itm_head.weight"].T + sd["itm_head.bias"]
        torch.testing.assert_close(model.encode_image(pixels)["x"], want_image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(ids, att)["x"], want_text, atol=1e-5, rtol=1e-4)
        tokens = model.forward_joint(pixels, ids, att)
        real = torch.cat([torch.ones(2, n_img, dtype=torch.bool), att.bool()], 1)  # padding outputs differ
        torch.testing.assert_close(tokens[real], joint[real], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.itm_head(tokens[:, model.itm_index]), want_itm, atol=1e-5, rtol=1e-4)
    assert model.logit_scales.detach().exp().item() == pytest.approx(1 / 0.05, rel=1e-5)
    assert enc.run_config["data"]["mean"] == [0.5, 0.5, 0.5]


def test_heads_follow_the_released_loaders_precedence() -> None:
    sd = released_state()
    sd["mitm_head.weight"], sd["mitm_head.bias"] = torch.ones(2, D), torch.zeros(2)
    sd["itc_vl_vision_proj_head.weight"] = torch.eye(D)
    conv = convert_eve(sd)
    assert torch.equal(conv.state["itm_head.weight"], torch.ones(2, D))
    assert torch.equal(conv.state["image_proj.weight"], torch.eye(D))
    assert torch.equal(conv.state["text_proj.weight"], sd["itc_text_proj_head.weight"])
    assert {"itm_head.weight", "itm_head.bias", "itc_vision_proj_head.weight"} <= set(conv.ignored)
    stacked = conv.state["blocks.2.moe.experts.fc1.weight"]
    assert stacked.shape == (EXPERTS, HIDDEN, D)
    assert torch.equal(stacked[3], sd["backbone.encoder.layers.2.mlp_moe.moe.experts.experts.3.fc1.weight"])
    assert conv.state["logit_scales"].item() == pytest.approx(math.log(20.0))


def test_unknown_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    sd = released_state()
    with pytest.raises(CheckpointError, match="backbone.encoder.layers.0.relative_position_bias"):
        convert_eve({**sd, "backbone.encoder.layers.0.relative_position_bias": torch.zeros(3)})
    for name, state in (
        ("missing", {k: v for k, v in sd.items() if k != "backbone.encoder.layers.1.norm1.bias"}),
        ("shape", {**sd, "backbone.encoder.layers.1.attn.q_bias": torch.zeros(D + 1)}),
    ):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": state}, path)
        with pytest.raises(CheckpointError, match=r"blocks\.1\.(norm1\.bias|attn\.q_bias)"):
            import_eve(path, tmp_path / f"out_{name}", tokenizer="tiny", model="eve_tiny")
        assert not (tmp_path / f"out_{name}").exists()
