"""EVE: the shared encoder (masking, positions, padding, batch independence), the released EVE-Base layout, and
the masked signal pretraining's pieces (masks, normalised-pixel loss, MLM loss, a falling loss)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from evlp.models import build_model, model_config
from evlp.models.eve import EVE
from evlp.train.eve import EvePretrainModule, EvePretrainTask, patch_targets, random_patch_keep, random_text_mask

SPECIAL = torch.tensor([0, 2, 3])  # [PAD], [CLS], [SEP] of the tiny vocabulary
MASK_ID = 4


@pytest.fixture(scope="module")
def tiny() -> EVE:
    torch.manual_seed(0)
    return build_model(model_config("eve_tiny", text={"dropout": 0.0}, eve={"drop_path": 0.0})).eval()


def _caption(lengths: list[int], t: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    att = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):  # [CLS] w ... w [SEP] [PAD] ...
        ids[i, :n] = torch.randint(5, 500, (n,))
        ids[i, 0], ids[i, n - 1] = 2, 3
        att[i, :n] = 1
    return ids, att


def test_patch_keep_and_text_mask_shapes() -> None:
    torch.manual_seed(0)
    m = random_patch_keep(5, 64, 0.75)
    assert m.keep.shape == (5, 16) and m.masked.shape == (5, 64)
    assert (m.masked.sum(1) == 48).all()
    for keep, masked in zip(m.keep, m.masked):
        assert len(set(keep.tolist())) == 16 and not masked[keep].any()
    ids, att = _caption([24, 9, 3, 2])
    mlm = random_text_mask(ids, att, 0.5, SPECIAL)
    n = (att.sum(1) - 2).clamp_min(0)  # ordinary tokens: all but [CLS] and [SEP]
    expected = torch.where(n > 0, (n * 0.5).round().clamp_min(1), 0)
    assert mlm.sum(1).tolist() == expected.tolist()  # [11, 4, 1, 0]
    assert not mlm[torch.isin(ids, SPECIAL) | (att == 0)].any()


def test_encoder_never_sees_masked_patches_and_visible_ones_keep_their_position(tiny: EVE) -> None:
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64)
    m = random_patch_keep(2, 64, 0.75)
    with torch.no_grad():
        out = tiny.encode(pixels, keep=m.keep).tokens  # (B, 1+16, D)
        assert out.shape == (2, 17, 64)
        changed = pixels.clone()
        grid = m.masked.view(2, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2)  # (B, 64, 64) pixels
        changed[grid[:, None].expand_as(changed)] = 100.0  # scribble over every hidden patch
        assert torch.allclose(tiny.encode(changed, keep=m.keep).tokens, out, atol=1e-6)
        full = tiny.encode(pixels).tokens  # every patch, in order
        order = torch.arange(64)[None].expand(2, -1)
        assert torch.allclose(tiny.encode(pixels, keep=order).tokens, full, atol=1e-5)
        perm = torch.stack([torch.randperm(64) for _ in range(2)])  # shuffled: each patch moves with its position
        shuffled = tiny.encode(pixels, keep=perm).tokens[:, 1:]
        assert torch.allclose(shuffled, full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 64)), atol=1e-5)


def test_embeddings_ignore_padding_and_the_rest_of_the_batch(tiny: EVE) -> None:
    torch.manual_seed(2)
    ids, att = _caption([7, 12, 24])
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        text = tiny.encode_text(ids, att)["x"]
        image = tiny.encode_image(pixels)["x"]
        assert text.shape == image.shape == (3, 64)
        assert torch.allclose(text.norm(dim=-1), torch.ones(3))
        for i in range(3):  # alone, and cut to its own length: the same embedding
            n = int(att[i].sum())
            assert torch.allclose(tiny.encode_text(ids[i:i + 1, :n], att[i:i + 1, :n])["x"], text[i:i + 1], atol=1e-5)
            assert torch.allclose(tiny.encode_image(pixels[i:i + 1])["x"], image[i:i + 1], atol=1e-5)
        tiny.train()  # training: padding takes no expert slot
        enc = tiny.encode(pixels, ids, att)
        tiny.eval()
        padding = torch.cat([torch.zeros(3, 65, dtype=torch.bool), att == 0], 1).reshape(-1)
        assert len(enc.routings) == 2 and padding.any()
        for r in enc.routings:
            assert not r.kept[padding].any() and r.kept[~padding].any()
        joint = tiny.forward_joint(pixels, ids, att)
        assert joint.shape == (3, 1 + 64 + 24, 64) and tiny.itm_index == 65
        assert tiny.itm_head(joint[:, tiny.itm_index]).shape == (3, 2)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    from evlp.models import enable_grad_checkpointing

    torch.manual_seed(7)
    model = build_model(model_config("eve_tiny", eve={"depth": 2, "moe_layers": [1]})).train()
    pixels, (ids, att) = torch.randn(2, 3, 64, 64), _caption([9, 24])
    keep, mlm = random_patch_keep(2, 64, 0.75).keep, random_text_mask(ids, att, 0.5, SPECIAL)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)  # drop path and the Gumbel draw of the second expert: the same in the recompute
        out = model(pixels, keep, ids, att, mlm)
        (out["pixels"].square().mean() + out["mlm_logits"].logsumexp(-1).mean() + out["aux_loss"]).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert enable_grad_checkpointing(model) == [""]
    again = grads()
    assert plain.keys() == again.keys() and "blocks.1.moe.router.weight" in plain
    assert all(torch.allclose(plain[k], again[k], atol=1e-6) for k in plain)


def test_eve_base_has_the_released_layout() -> None:
    """The shapes of github ssyze/EVE's config_vlmoB_base64k.json (12 x 768, FFN 3072, 64k vocab, 32 experts in
    blocks 10-11, modality FFNs elsewhere), so every released tensor has a home."""
    with torch.device("meta"):
        model = build_model(model_config("eve_base"))
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state["embed.word_embeddings.weight"] == (64000, 768)
    assert state["embed.image_pos_embed"] == (197, 768) and state["embed.text_pos_embed"] == (196, 768)
    assert state["embed.patch_embed.weight"] == (768, 3, 16, 16)
    for i in range(12):
        assert state[f"blocks.{i}.attn.qkv.weight"] == (2304, 768) and f"blocks.{i}.attn.q_bias" in state
        moe = i in (10, 11)
        assert (f"blocks.{i}.moe.router.weight" in state) == moe
        assert (f"blocks.{i}.mlp_image.fc1.weight" in state) == (f"blocks.{i}.mlp_text.fc2.weight" in state) != moe
    assert state["blocks.10.moe.experts.fc1.weight"] == (32, 3072, 768)  # [e]: expert e's fc1.weight
    assert state["blocks.11.moe.experts.fc2.weight"] == (32, 768, 3072)
    assert state["blocks.11.moe.image_type"] == state["blocks.11.moe.text_type"] == (768,)
    assert [type(b.drop_path).__name__ for b in model.blocks][:2] == ["Identity", "DropPath"]
    assert math.isclose(model.blocks[-1].drop_path.drop_prob, 0.1)


def test_normalised_pixel_targets_match_a_loop() -> None:
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 16, 24)
    got = patch_targets(pixels, 8)
    assert got.shape == (2, 6, 192)
    for b in range(2):
        for n in range(6):
            r, c = divmod(n, 3)
            patch = pixels[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8].permute(1, 2, 0).reshape(-1)
            want = (patch - patch.mean()) / torch.sqrt(patch.var() + 1e-6)
            assert torch.allclose(got[b, n], want, atol=1e-5)
    assert torch.allclose(patch_targets(pixels, 8, normalize=False)[1, 4], pixels[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))


def _task(**eve: object) -> SimpleNamespace:
    """What EvePretrainTask's forward and loss read, without data or a tokenizer."""
    t = SimpleNamespace(cfg=SimpleNamespace(model=model_config("eve_tiny", eve=eve)), special_ids=SPECIAL,
                        mask_token_id=MASK_ID, _moe_outputs=EvePretrainTask._moe_outputs)
    t._sample_losses = lambda *a: EvePretrainTask._sample_losses(t, *a)
    return t


def test_pixel_and_mlm_losses_count_only_masked_positions_and_the_encoder_gets_mask_tokens() -> None:
    torch.manual_seed(4)
    b, n, p, v = 3, 64, 192, 512
    pixels = torch.randn(b, 3, 64, 64)
    ids, att = _caption([10, 24, 5])
    seen = {}

    def stub(px, keep, masked_ids, attention, mlm):  # a module that predicts noise
        seen.update(keep=keep, ids=masked_ids, mlm=mlm)
        return {"pixels": torch.randn(b, n, p), "mlm_logits": torch.randn(int(mlm.sum()), v),
                "aux_loss": torch.tensor(1.5), "routings": []}

    task = _task()
    out = EvePretrainTask.forward(task, stub, {"image": pixels, "input_ids": ids, "attention_mask": att})
    mlm = seen["mlm"]
    assert torch.equal(seen["ids"], ids.masked_fill(mlm, MASK_ID)) and mlm.any()
    assert seen["keep"].shape == (b, 16)
    mask = SimpleNamespace(masked=torch.ones(b, n, dtype=torch.bool).scatter(1, seen["keep"], False))
    assert out["image_count"].tolist() == [48.0] * b and out["text_count"].tolist() == mlm.sum(1).float().tolist()
    torch.manual_seed(5)
    fake = {"pixels": torch.randn(b, n, p), "mlm_logits": torch.randn(int(mlm.sum()), v), "aux_loss": torch.tensor(0.),
            "routings": []}
    sums = EvePretrainTask._sample_losses(task, fake, pixels, ids, mask.masked, mlm, 8)
    target = patch_targets(pixels, 8)
    positions = mlm.nonzero().tolist()
    for i in range(b):
        errs = [float(((fake["pixels"][i, j] - target[i, j]) ** 2).mean()) for j in range(n) if mask.masked[i, j]]
        assert math.isclose(float(sums["image_err"][i]), sum(errs), rel_tol=1e-5) and sums["image_count"][i] == 48
        nll = [float(-fake["mlm_logits"][m].log_softmax(-1)[ids[r, c]]) for m, (r, c) in enumerate(positions) if r == i]
        assert math.isclose(float(sums["text_nll"][i]), sum(nll), rel_tol=1e-5, abs_tol=1e-6)
        assert int(sums["text_count"][i]) == len(nll)
    moe = {"moe_aux": torch.tensor(1.5), "moe_load": torch.tensor([0.1, 0.2, 0.3, 0.4]), "moe_dropped": torch.tensor(0.1)}
    loss, metrics = EvePretrainTask.loss(task, {**sums, **moe}, {}, None)
    image = sums["image_err"].sum() / sums["image_count"].sum()
    text = sums["text_nll"].sum() / sums["text_count"].sum()
    assert torch.allclose(loss, image + text + 1e-3 * 1.5)  # model.eve.aux_loss_weight
    assert torch.allclose(metrics["image_loss"], image) and torch.allclose(metrics["text_loss"], text)
    assert math.isclose(float(metrics["moe_load_max"]), 1.6, rel_tol=1e-6)
    assert math.isclose(float(metrics["moe_drop_frac"]), 0.1, rel_tol=1e-6)


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(6)
    t = _task(drop_path=0.0, depth=2, moe_layers=[1])
    model = EvePretrainModule(build_model(t.cfg.model)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    smooth = F.interpolate(torch.randn(4, 3, 8, 8), size=64, mode="bilinear")  # learnable structure
    ids, att = _caption([12, 20, 8, 24])
    batch = {"image": smooth, "input_ids": ids, "attention_mask": att}
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # the same masks every step: a fixed batch
        loss, metrics = EvePretrainTask.loss(t, EvePretrainTask.forward(t, model, batch), batch, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert metrics["moe_aux_loss"] >= 0.99 and 0 < metrics["moe_load_max"] <= 4
    assert losses[-1] < 0.6 * losses[0], losses


def test_config_problems_are_reported_together() -> None:
    from evlp.config import PretrainConfig, load_config
    from evlp.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, "eve_tiny", ["model.eve.moe_layers=[1,4]", "model.eve.image_mask_ratio=1.0",
                                                 "model.eve.top_k=5", "model.teacher.enabled=true"])
    text = str(err.value)
    for needle in ("model.eve.moe_layers", "model.eve.image_mask_ratio", "model.eve.top_k", "model.teacher.enabled"):
        assert needle in text, needle
    load_config(PretrainConfig, "eve", [])  # the shipped recipe is valid
