"""The ZeroVL dual encoder: embeddings against the towers run by hand, the fixed temperature (a buffer: no
gradient, no optimizer state, not saved) against a learned one, parameter counts, locks and the presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evlp.config import ModelConfig, PretrainConfig, load_config
from evlp.errors import ConfigError
from evlp.models import build_model, model_config, model_info
from evlp.models.dual import DualEncoder
from evlp.models.lock import apply_locks
from evlp.train.optim import build_optimizer


def _tiny(**overrides: object) -> ModelConfig:
    return model_config("zerovl_tiny", **overrides)


def _inputs(cfg: ModelConfig, b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(b, 3, cfg.image.img_size, cfg.image.img_size, generator=g)
    ids = torch.randint(5, cfg.text.vocab_size, (b, cfg.text.max_length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # one padded caption
    return pixels, ids, mask


def test_embeddings_are_the_projected_cls_tokens_normalised() -> None:
    torch.manual_seed(0)
    cfg = _tiny()
    model = build_model(cfg).eval()
    assert isinstance(model, DualEncoder) and cfg.embed_width == cfg.embed_dim == 32
    pixels, ids, mask = _inputs(cfg)
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        # by hand: each tower's first token, a linear map without bias, then the L2 norm
        z_image = model.image(pixels)[:, 0] @ model.image_proj.weight.T
        z_text = model.text.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0] @ model.text_proj.weight.T
        both = model(pixels, ids, mask)
    assert model.image_proj.bias is None and model.text_proj.bias is None
    for got, z in ((image, z_image), (text, z_text)):
        assert got["x"].shape == got["z"].shape == (3, 32)
        torch.testing.assert_close(got["z"], z)
        torch.testing.assert_close(got["x"], z / z.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(got["x"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(both["x_image"], image["x"])
    torch.testing.assert_close(both["z_text"], text["z"])


def _itc_step(model: DualEncoder, cfg: ModelConfig) -> torch.Tensor:
    pixels, ids, mask = _inputs(cfg)
    image, text = model.encode_image(pixels)["x"], model.encode_text(ids, mask)["x"]
    logits = model.logit_scales.exp()[0] * image @ text.T
    labels = torch.arange(len(logits))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return loss


def test_a_fixed_temperature_gets_no_gradient_and_no_optimizer_state() -> None:
    cfg = _tiny()
    assert not cfg.learnable_temperature and cfg.init_temperature == 0.02
    model = build_model(cfg)
    assert "logit_scales" not in dict(model.named_parameters())
    assert "logit_scales" not in model.state_dict()  # the config rebuilds it; checkpoints do not hold it
    torch.testing.assert_close(model.logit_scales, torch.tensor([math.log(50.0)]))
    _itc_step(model, cfg)
    assert model.logit_scales.grad is None and not model.logit_scales.requires_grad
    optimizer = build_optimizer(model, PretrainConfig().optim, 1e-3)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.logit_scales) not in held
    assert held == {id(p) for p in model.parameters()}  # everything else trains
    before = model.logit_scales.clone()
    optimizer.step()
    model.clamp_logit_scales()
    assert torch.equal(model.logit_scales, before)
    info = model_info(cfg)
    assert info.student_total == sum(p.numel() for p in model.parameters()) == sum(info.parts.values())


def test_a_learned_temperature_trains_and_is_clamped() -> None:
    cfg = _tiny(learnable_temperature=True, max_logit_scale=40.0)
    model = build_model(cfg)
    assert isinstance(model.logit_scales, torch.nn.Parameter) and "logit_scales" in model.state_dict()
    _itc_step(model, cfg)
    assert model.logit_scales.grad is not None and model.logit_scales.grad.abs().item() > 0
    model.clamp_logit_scales()  # log(50) > log(40)
    torch.testing.assert_close(model.logit_scales, torch.tensor([math.log(40.0)]))
    info = model_info(cfg)
    assert info.parts["projections, logit scale"] == 2 * 64 * 32 + 1


def test_zerovl_preset_counts_bert_base_and_vit_b16() -> None:
    info = model_info(model_config("zerovl"))
    d, v, p, ff = 768, 30522, 512, 3072
    layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d  # attention + MLP + 2 LayerNorms
    text = v * d + p * d + 2 * d + 2 * d + 12 * layer  # word, position, token-type embeddings + LayerNorm
    image = 3 * 16 * 16 * d + d + d + 197 * d + 12 * layer + 2 * d  # patch embed, CLS, pos embed, blocks, norm
    assert info.parts == {"text tower": text, "image tower": image, "projections": 2 * d * 512}
    assert info.teacher == 0


def test_locks_and_grad_checkpointing_reach_the_towers() -> None:
    cfg = _tiny(image={"lock": True}, text={"unlocked_layers": 1})
    model = build_model(cfg)
    apply_locks(model, cfg)
    assert not any(p.requires_grad for p in model.image.parameters())
    assert any(p.requires_grad for p in model.text.parameters())
    assert not model.text.model.embeddings.word_embeddings.weight.requires_grad
    assert all(p.requires_grad for p in (model.image_proj.weight, model.text_proj.weight))
    model.set_grad_checkpointing(True)
    text = model.text.model  # transformers >= 5 calls it activation checkpointing
    assert model.image.grad_checkpointing
    assert getattr(text, "is_activation_checkpointing", None) or text.is_gradient_checkpointing
    loss = _itc_step(model.train(), cfg)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.name=zerovl_tiny", "model.teacher.enabled=true"], "has no KD head"),
    (["model.name=s_smke_tiny", "model.learnable_temperature=false"], "only the dual encoder"),
    (["model.name=s_smke_tiny", "loss.mixup_beta=0.1"], "model.arch=dual"),
    (["model.name=zerovl_tiny", "loss.mixup_beta=-1"], "mixup_beta: must be >= 0"),
])
def test_settings_that_do_not_fit_the_dual_encoder_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, overrides)
