"""S-SMKE shapes, exact parameter count, and the blocks against hand-written forwards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evlp.config import ModelConfig, from_dict
from evlp.models import build_model, build_teacher, model_config, model_info
from evlp.models.blocks import PostLNBlock, SharedBlock


def _tiny() -> ModelConfig:
    return model_config("s_smke_tiny")


def test_s_smke_has_exactly_117_318_146_student_parameters() -> None:
    info = model_info(model_config("s_smke"))
    # independent count from the architecture's shapes (reference.md 1.7)
    d, v, p, ff = 768, 30522, 512, 3072
    layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d  # attention + MLP + 2 LayerNorms
    text = v * d + p * d + 2 * d + 2 * d + 6 * layer
    image = (3 * 16 * 16 * d + d) + d + 196 * d + 2 * d + 6 * layer
    shared = 3 * d * d + 2 * d + d * d + d + d * ff + ff + ff * d + d + 4 * d + 2 * d
    extra = 2 * d + d + 2 * d + d * d + d + 2
    assert info.parts == {"text tower": text, "image tower": image, "shared block": shared,
                          "token types, KD head, logit scales": extra}
    assert info.student_total == text + image + shared + extra == 117_318_146
    assert info.trainable == info.student_total
    assert 85e6 < info.teacher < 87e6  # BEiTv2-B/16, frozen, counted apart


def test_tiny_preset_limits() -> None:
    cfg = _tiny()
    assert cfg.shared.width <= 128 and cfg.text.num_layers <= 2 and cfg.image.depth <= 2
    assert cfg.image.img_size <= 64 and cfg.text.vocab_size <= 2048


def test_forward_shapes_and_normalisation() -> None:
    torch.manual_seed(0)
    cfg = _tiny()
    model = build_model(cfg).eval()
    b, t = 3, cfg.text.max_length
    pixels = torch.randn(b, 3, cfg.image.img_size, cfg.image.img_size)
    ids = torch.randint(5, cfg.text.vocab_size, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    out = model(pixels, ids, mask)
    d = cfg.shared.width
    for m in ("image", "text"):
        assert out[f"x_{m}"].shape == (b, d)
        assert out[f"x_interm_{m}"].shape == (b, int(d * cfg.shared.mlp_ratio))
        assert out[f"kd_{m}"].shape == (b, cfg.teacher.width)
        torch.testing.assert_close(out[f"x_{m}"].norm(dim=-1), torch.ones(b))
        torch.testing.assert_close(out[f"x_interm_{m}"].norm(dim=-1), torch.ones(b))
    assert model.image.pos_embed.shape == (1, (cfg.image.img_size // cfg.image.patch_size) ** 2, cfg.image.width)


def test_text_embedding_ignores_padding() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    short = model.encode_text(ids, torch.ones_like(ids))["x"]
    padded_ids = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 7, dtype=torch.long)], dim=1)
    padded = model.encode_text(padded_ids, padded_mask)["x"]
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


def _manual_shared(block: SharedBlock, x: torch.Tensor, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared block written out by hand: pre-LN, q/v biases, masked softmax, LayerScale."""
    b, t, d = x.shape
    h = block.attn.num_heads
    hd = d // h
    y = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, 1e-6)
    w = block.attn.qkv.weight
    q = y @ w[:d].T + block.attn.q_bias
    k = y @ w[d:2 * d].T
    v = y @ w[2 * d:].T + block.attn.v_bias
    out = torch.zeros(b, t, d)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * hd, (hi + 1) * hd)
            scores = q[bi, :, sl] @ k[bi, :, sl].T / math.sqrt(hd)  # (T, T)
            if pad is not None:
                scores = scores.masked_fill(pad[bi][None, :].bool(), float("-inf"))
            out[bi, :, sl] = scores.softmax(-1) @ v[bi, :, sl]
    x = x + block.ls1.gamma * (out @ block.attn.proj.weight.T + block.attn.proj.bias)
    z = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias, 1e-6)
    pre = z @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    mlp = F.gelu(pre) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return pre[:, 0], x + block.ls2.gamma * mlp


def test_shared_block_matches_hand_written_forward() -> None:
    torch.manual_seed(0)
    block = SharedBlock(32, 4, 4.0, layer_scale_init=0.2).eval()
    with torch.no_grad():
        block.attn.q_bias.normal_()
        block.attn.v_bias.normal_()
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]])
    for mask in (None, pad):
        interm, out = block(x, mask)
        ref_interm, ref_out = _manual_shared(block, x, mask)
        torch.testing.assert_close(interm, ref_interm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert block.ls1.gamma.unique().item() == pytest.approx(0.2)
    assert block.attn.qkv.bias is None


def test_post_ln_block_matches_formula() -> None:
    torch.manual_seed(0)
    block = PostLNBlock(16, 2).eval()
    x = torch.randn(2, 5, 16)
    attn = block.attn(x)
    y = F.layer_norm(x + attn, (16,), block.norm1.weight, block.norm1.bias, 1e-6)
    want = F.layer_norm(y + block.mlp(y), (16,), block.norm2.weight, block.norm2.bias, 1e-6)
    torch.testing.assert_close(block(x), want)


def test_token_type_and_logit_scale_inits() -> None:
    cfg = _tiny()
    model = build_model(cfg)
    # exact to float32 rounding: the default atol (1e-5) would accept anything in [0, 2e-5]
    torch.testing.assert_close(model.token_type_scale.gamma.detach(),
                               torch.full((cfg.shared.width,), cfg.tte_scale_init), rtol=1e-6, atol=0)
    assert cfg.tte_scale_init == ModelConfig().tte_scale_init == 1e-5  # the paper's value is the default
    other = from_dict(ModelConfig, {"name": "s_smke_tiny", "tte_scale_init": 3e-5})
    torch.testing.assert_close(build_model(other).token_type_scale.gamma.detach(),
                               torch.full((other.shared.width,), 3e-5), rtol=1e-6, atol=0)
    torch.testing.assert_close(model.logit_scales.detach(), torch.full((2,), math.log(1 / 0.07)))
    with torch.no_grad():
        model.logit_scales.copy_(torch.tensor([-1.0, 9.0]))
    model.clamp_logit_scales()
    torch.testing.assert_close(model.logit_scales.detach(), torch.tensor([0.0, math.log(100.0)]))
    w = model.head.weight
    assert w.abs().max() <= 0.02 + 1e-7 and w.std() > 0.005  # truncated at +-1 std


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    cfg = _tiny().teacher
    teacher = build_teacher(cfg)
    assert not any(p.requires_grad for p in teacher.parameters())
    wrapper = torch.nn.Sequential(teacher)
    wrapper.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, requires_grad=True)
    target = teacher(x)
    assert target.shape == (2, cfg.width) and not target.requires_grad
    torch.testing.assert_close(teacher(x), target)  # deterministic: no dropout / drop-path
    assert isinstance(teacher.model.norm, torch.nn.Identity)
    assert teacher.model.rel_pos_bias is not None  # shared relative position bias


def test_unknown_model_name_lists_choices() -> None:
    from evlp.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 's_smke'.*choose one of: .*s_smke, s_smke_tiny"):
        model_config("s_smk")


def test_projections_when_widths_differ() -> None:
    cfg = from_dict(ModelConfig, {"name": "s_smke_tiny", "text": {"hidden_size": 32, "num_heads": 4},
                                  "teacher": {"width": 48, "num_heads": 4}})
    model = build_model(cfg).eval()
    out = model.encode_text(torch.tensor([[2, 9, 3]]), torch.ones(1, 3, dtype=torch.long))
    assert out["x"].shape == (1, 64) and out["kd"].shape == (1, 48)
