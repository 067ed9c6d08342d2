"""Checkpoint converters: synthetic files in the ORIGINAL key layouts (fairseq data2vec 2.0, unilm BEiTv2)
loaded into our modules must reproduce forwards written from the original layout with plain tensor ops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evlp.config.schema import ImageTowerConfig, TeacherConfig
from evlp.errors import CheckpointError
from evlp.models.convert import (
    convert_beitv2,
    convert_data2vec2_image,
    load_beitv2_teacher,
    load_data2vec2_image,
    load_foreign_state_dict,
    load_timm_weights,
)
from evlp.models.image import Data2Vec2ImageTower
from evlp.models.teacher import FrozenTeacher, build_beit

IMG, PATCH, WIDTH, HEADS, HIDDEN = 32, 8, 32, 4, 128
GRID = IMG // PATCH  # 4 x 4 patches
N = GRID * GRID
EPS = 1e-6
D2V = "modality_encoders.IMAGE."
BLOCK_PARTS = {"attn.proj.weight": (WIDTH, WIDTH), "attn.proj.bias": (WIDTH,),
               "norm1.weight": (WIDTH,), "norm1.bias": (WIDTH,),
               "norm2.weight": (WIDTH,), "norm2.bias": (WIDTH,),
               "mlp.fc1.weight": (HIDDEN, WIDTH), "mlp.fc1.bias": (HIDDEN,),
               "mlp.fc2.weight": (WIDTH, HIDDEN), "mlp.fc2.bias": (WIDTH,)}


def _rand(shape: tuple[int, ...], gen: torch.Generator, name: str) -> torch.Tensor:
    if "norm" in name and name.endswith("weight"):  # LayerNorm gains near 1, but not 1
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.2 * torch.randn(shape, generator=gen)


def _d2v_checkpoint(blocks: int = 3, seed: int = 0) -> dict:
    """fairseq's layout: weights under ``model``, with decoder and EMA keys the converter must drop."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        D2V + "local_encoder.proj.weight": (WIDTH, 3, PATCH, PATCH),
        D2V + "local_encoder.proj.bias": (WIDTH,),
        D2V + "extra_tokens": (1, 1, WIDTH), D2V + "fixed_positional_encoder.positions": (1, N, WIDTH),
        D2V + "context_encoder.norm.weight": (WIDTH,), D2V + "context_encoder.norm.bias": (WIDTH,),
        D2V + "decoder.blocks.0.0.weight": (WIDTH, WIDTH, 3), D2V + "decoder.proj.weight": (WIDTH, WIDTH),
        "_ema.blocks.0.attn.qkv.weight": (3 * WIDTH, WIDTH),
    }
    for i in range(blocks):
        shapes[f"blocks.{i}.attn.qkv.weight"] = (3 * WIDTH, WIDTH)
        shapes[f"blocks.{i}.attn.qkv.bias"] = (3 * WIDTH,)
        shapes.update({f"blocks.{i}.{k}": s for k, s in BLOCK_PARTS.items()})
    model = {k: _rand(s, g, k) for k, s in shapes.items()}
    return {"model": model, "cfg": {"model": {"embed_dim": WIDTH, "depth": blocks}}, "optimizer_history": []}


def _rel_index() -> torch.Tensor:
    """BEiT's relative position index, by brute force over token pairs (query i, key j)."""
    num_rel = (2 * GRID - 1) ** 2 + 3
    idx = torch.empty(N + 1, N + 1, dtype=torch.long)
    for i in range(N):
        for j in range(N):
            dh, dw = i // GRID - j // GRID, i % GRID - j % GRID
            idx[i + 1, j + 1] = (dh + GRID - 1) * (2 * GRID - 1) + (dw + GRID - 1)
    idx[0, :] = num_rel - 3
    idx[:, 0] = num_rel - 2
    idx[0, 0] = num_rel - 1
    return idx


def _beit_checkpoint(blocks: int = 2, seed: int = 1) -> dict:
    """unilm BEiTv2's pretraining layout, including everything the converter must drop."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, WIDTH), "mask_token": (1, 1, WIDTH),
              "patch_embed.proj.weight": (WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": (WIDTH,),
              "rel_pos_bias.relative_position_bias_table": ((2 * GRID - 1) ** 2 + 3, HEADS),
              "norm.weight": (WIDTH,), "norm.bias": (WIDTH,),
              "lm_head.weight": (8192, WIDTH), "lm_head.bias": (8192,)}
    for prefix in [f"blocks.{i}." for i in range(blocks)] + [f"cls_pt_layers.{j}." for j in range(2)]:
        shapes.update({prefix + "gamma_1": (WIDTH,), prefix + "gamma_2": (WIDTH,),
                       prefix + "attn.qkv.weight": (3 * WIDTH, WIDTH),
                       prefix + "attn.q_bias": (WIDTH,), prefix + "attn.v_bias": (WIDTH,)})
        shapes.update({prefix + k: s for k, s in BLOCK_PARTS.items()})
    model = {k: _rand(s, g, k) for k, s in shapes.items()}
    model["rel_pos_bias.relative_position_index"] = _rel_index()
    return {"model": model}


# --- independent forwards, from the original layouts, with plain tensor ops -----------------------

def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _patches(img: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Conv with stride = kernel as a matmul over row-major patches: (B, 3, H, W) -> (B, N, D)."""
    bsz = img.shape[0]
    p = img.reshape(bsz, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(bsz, N, -1)
    return p @ w.reshape(WIDTH, -1).T + b


def _attn(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    bsz, t, d = x.shape
    hd = d // HEADS
    q, k, v = (x @ w_qkv.T + b_qkv).split(d, dim=-1)  # (B, T, D) each, heads contiguous
    q, k, v = (z.reshape(bsz, t, HEADS, hd).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if bias is not None:
        scores = scores + bias
    out = scores.softmax(-1) @ v  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(bsz, t, d) @ w_o.T + b_o


def _mlp(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    h = _gelu(x @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
    return h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"]


def _d2v_reference(s: dict, img: torch.Tensor, depth: int) -> torch.Tensor:
    x = _patches(img, s[D2V + "local_encoder.proj.weight"], s[D2V + "local_encoder.proj.bias"])
    x = x + s[D2V + "fixed_positional_encoder.positions"]
    x = torch.cat([s[D2V + "extra_tokens"].expand(img.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
    x = _ln(x, s[D2V + "context_encoder.norm.weight"], s[D2V + "context_encoder.norm.bias"])
    for i in range(depth):
        p = f"blocks.{i}."
        a = _attn(x, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"],
                  s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        x = _ln(x + a, s[p + "norm1.weight"], s[p + "norm1.bias"])
        x = _ln(x + _mlp(x, s, p), s[p + "norm2.weight"], s[p + "norm2.bias"])
    return x


def _beit_reference_cls(s: dict, img: torch.Tensor, depth: int) -> torch.Tensor:
    x = _patches(img, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"])
    x = torch.cat([s["cls_token"].expand(img.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
    table = s["rel_pos_bias.relative_position_bias_table"]
    bias = table[_rel_index().view(-1)].view(N + 1, N + 1, HEADS).permute(2, 0, 1)  # (H, 1+N, 1+N)
    for i in range(depth):
        p = f"blocks.{i}."
        b_qkv = torch.cat([s[p + "attn.q_bias"], torch.zeros(WIDTH), s[p + "attn.v_bias"]])
        h = _ln(x, s[p + "norm1.weight"], s[p + "norm1.bias"])
        x = x + s[p + "gamma_1"] * _attn(h, s[p + "attn.qkv.weight"], b_qkv, s[p + "attn.proj.weight"],
                                         s[p + "attn.proj.bias"], bias)
        x = x + s[p + "gamma_2"] * _mlp(_ln(x, s[p + "norm2.weight"], s[p + "norm2.bias"]), s, p)
    return x[:, 0]  # no final norm


def _tower(width: int = WIDTH, depth: int = 2) -> Data2Vec2ImageTower:
    return Data2Vec2ImageTower(ImageTowerConfig(img_size=IMG, patch_size=PATCH, width=width, depth=depth,
                                                num_heads=HEADS)).eval()


def _beit(depth: int = 2, img: int = IMG) -> torch.nn.Module:
    cfg = TeacherConfig(img_size=img, patch_size=PATCH, width=WIDTH, depth=depth, num_heads=HEADS)
    return build_beit(cfg)


def _save(ckpt: dict, path: Path) -> Path:
    torch.save(ckpt, path)
    return path


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


# --- data2vec 2.0 ---------------------------------------------------------------------------------

def test_data2vec2_truncated_forward_matches_original(tmp_path: Path) -> None:
    ckpt = _d2v_checkpoint(blocks=3)
    tower = _tower(depth=2)
    load_data2vec2_image(tower, _save(ckpt, tmp_path / "base_imagenet.pt"), depth=2)
    img = _images()
    with torch.no_grad():
        out = tower(img)
    assert out.shape == (3, 1 + N, WIDTH)
    torch.testing.assert_close(out, _d2v_reference(ckpt["model"], img, depth=2), atol=1e-5, rtol=1e-5)
    # the third block really is gone: with it, the original forward differs
    assert not torch.allclose(out, _d2v_reference(ckpt["model"], img, depth=3), atol=1e-3)


def test_data2vec2_keeps_exact_tensors_and_drops_the_rest(tmp_path: Path) -> None:
    raw = _d2v_checkpoint(blocks=3)["model"]
    tower = _tower(depth=2)
    load_data2vec2_image(tower, _save({"model": raw}, tmp_path / "d2v.pt"), depth=2)
    mapping = {D2V + "local_encoder.proj.weight": "patch_embed.proj.weight",
               D2V + "local_encoder.proj.bias": "patch_embed.proj.bias",
               D2V + "extra_tokens": "cls_token", D2V + "fixed_positional_encoder.positions": "pos_embed",
               D2V + "context_encoder.norm.weight": "norm_pre.weight",
               D2V + "context_encoder.norm.bias": "norm_pre.bias"}
    mapping.update({k: k for k in raw if k.startswith(("blocks.0.", "blocks.1."))})
    loaded = tower.state_dict()
    assert set(loaded) == set(mapping.values())
    for src, dst in mapping.items():
        assert torch.equal(loaded[dst], raw[src]), dst
    converted = convert_data2vec2_image(raw, depth=2)
    assert set(converted) == set(mapping.values())
    dropped = set(raw) - set(mapping)
    assert dropped == {k for k in raw if "decoder" in k or "_ema" in k or k.startswith("blocks.2.")}
    assert {k for k in dropped if k.startswith("blocks.")} == {k for k in raw if k.startswith("blocks.2.")}


# --- BEiTv2 ---------------------------------------------------------------------------------------

def test_beitv2_teacher_target_matches_original(tmp_path: Path) -> None:
    ckpt = _beit_checkpoint(blocks=2)
    model = _beit(depth=2)
    load_beitv2_teacher(model, _save(ckpt, tmp_path / "beitv2_base_patch16_224_pt1k.pth"))
    teacher = FrozenTeacher(model, "cls")
    img = _images()
    out = teacher(img)
    assert out.shape == (3, WIDTH)
    torch.testing.assert_close(out, _beit_reference_cls(ckpt["model"], img, depth=2), atol=1e-5, rtol=1e-5)


def test_beitv2_teacher_runs_on_the_flash_kernel(tmp_path: Path) -> None:
    """The shared relative position bias reaches scaled_dot_product_attention as a mask its CPU flash kernel
    takes (a 3-D one has no flash kernel: sdpa_kernel(FLASH_ATTENTION) then raises), with the same target."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ckpt = _beit_checkpoint(blocks=2)
    model = _beit(depth=2)
    load_beitv2_teacher(model, _save(ckpt, tmp_path / "beitv2_base_patch16_224_pt1k.pth"))
    img = _images()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = FrozenTeacher(model, "cls")(img)
    torch.testing.assert_close(out, _beit_reference_cls(ckpt["model"], img, depth=2), atol=1e-5, rtol=1e-5)


def test_beitv2_keeps_exact_tensors_and_drops_the_rest(tmp_path: Path) -> None:
    raw = _beit_checkpoint(blocks=2)["model"]
    model = _beit(depth=2)
    load_beitv2_teacher(model, _save({"model": raw}, tmp_path / "beit.pth"))
    loaded = model.state_dict()
    dropped = {k for k in raw if k.startswith(("mask_token", "lm_head.", "cls_pt_layers.", "norm."))
               or k.endswith("relative_position_index")}
    assert set(loaded) == set(raw) - dropped
    for k, v in loaded.items():
        assert torch.equal(v, raw[k]), k
    assert set(convert_beitv2(raw)) == set(raw) - dropped
    index = raw["rel_pos_bias.relative_position_index"]
    assert torch.equal(model.rel_pos_bias.relative_position_index, index)


def test_beitv2_rejects_a_different_relative_position_index(tmp_path: Path) -> None:
    ckpt = _beit_checkpoint()
    ckpt["model"]["rel_pos_bias.relative_position_index"] = _rel_index().T.contiguous()
    with pytest.raises(CheckpointError, match="relative_position_index"):
        load_beitv2_teacher(_beit(), _save(ckpt, tmp_path / "beit.pth"))


# --- errors ---------------------------------------------------------------------------------------

def test_wrong_width_names_the_key_both_shapes_and_the_config(tmp_path: Path) -> None:
    path = _save(_d2v_checkpoint(), tmp_path / "d2v.pt")
    with pytest.raises(CheckpointError) as err:
        load_data2vec2_image(_tower(width=48), path, depth=2)
    msg = str(err.value)
    first = next(iter(_tower(width=48).state_dict()))  # the first mismatch in the module's order
    assert first == "cls_token" and msg.startswith("cls_token ")
    assert "(1, 1, 32)" in msg and "(1, 1, 48)" in msg
    assert "model.image.width" in msg and "\n" not in msg


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    ckpt = _d2v_checkpoint()
    ckpt["model"][D2V + "alibi_scale"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_data2vec2_image(_tower(), _save(ckpt, tmp_path / "d2v.pt"), depth=2)
    msg = str(err.value)
    assert "data2vec2 converter" in msg and "1 unexpected" in msg and "alibi_scale" in msg
    assert "0 missing" in msg and str(tmp_path / "d2v.pt") in msg


def test_missing_block_key_is_named(tmp_path: Path) -> None:
    ckpt = _d2v_checkpoint()
    del ckpt["model"]["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError) as err:
        load_data2vec2_image(_tower(), _save(ckpt, tmp_path / "d2v.pt"), depth=2)
    assert "1 missing" in str(err.value) and "blocks.1.mlp.fc2.bias" in str(err.value)


def test_beit_depth_mismatch_lists_unexpected_blocks(tmp_path: Path) -> None:
    path = _save(_beit_checkpoint(blocks=3), tmp_path / "beit.pth")
    with pytest.raises(CheckpointError) as err:
        load_beitv2_teacher(_beit(depth=2), path)
    msg = str(err.value)
    assert "beitv2 converter" in msg and "unexpected" in msg and "blocks.2." in msg and "model.teacher" in msg


def test_depth_beyond_the_checkpoint(tmp_path: Path) -> None:
    path = _save(_d2v_checkpoint(blocks=3), tmp_path / "d2v.pt")
    with pytest.raises(CheckpointError, match=r"depth 4 .*\(3\)"):
        load_data2vec2_image(_tower(depth=4), path, depth=4)
    with pytest.raises(CheckpointError, match="depth 4"):
        convert_data2vec2_image(_d2v_checkpoint(blocks=3)["model"], depth=4)


@pytest.mark.parametrize(("loader", "url", "setting"), [
    (lambda p: load_data2vec2_image(_tower(), p, 2), "fairseq/data2vec2/base_imagenet.pt",
     "model.image.checkpoint"),
    (lambda p: load_beitv2_teacher(_beit(), p), "beitv2_base_patch16_224_pt1k.pth",
     "model.teacher.checkpoint"),
])
def test_missing_file_says_where_to_download(tmp_path: Path, loader, url: str, setting: str) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError) as err:
        loader(path)
    msg = str(err.value)
    assert str(path) in msg and url in msg and setting in msg and msg.count("https://") == 1


_CALLS: list[str] = []


def _record_call(tag: str) -> str:
    _CALLS.append(tag)
    return tag


class _Payload:
    """Unpickles by calling ``_record_call``: only an unsafe load would run it."""

    def __reduce__(self) -> tuple:
        return (_record_call, ("ran",))


def _assert_refusal(msg: str, path: Path) -> None:
    """The one message for a file of pickled objects: what it holds, that evlp loads tensors only, what to do
    instead, and never the advice to load it unsafely."""
    assert str(path) in msg and f"{__name__}._record_call" in msg and "\n" not in msg
    assert "code or pickled Python objects" in msg and "never unpickles" in msg and "only tensors" in msg
    assert "safetensors" in msg and "re-save only the tensors" in msg and "environment you trust" in msg
    assert "weights_only" not in msg and "False" not in msg and "add_safe_globals" not in msg


def test_pickled_objects_are_refused_not_loaded(tmp_path: Path) -> None:
    ckpt = _d2v_checkpoint()
    ckpt["cfg"] = _Payload()
    path = _save(ckpt, tmp_path / "base_imagenet.pt")
    with pytest.raises(CheckpointError) as err:
        load_data2vec2_image(_tower(), path, depth=2)
    _assert_refusal(str(err.value), path)
    assert _CALLS == []
    # the payload is real: an unsafe load would have run it (so the check above can fail)
    torch.load(path, weights_only=False)
    assert _CALLS == ["ran"]
    _CALLS.clear()


def test_every_torch_load_is_the_tensor_only_helper(tmp_path: Path) -> None:
    """Every torch.save file evlp reads goes through load_tensors: the foreign-weights loader, GLUE's pretrained
    pooler, and no other torch.load anywhere in the package."""
    import re

    import evlp
    from evlp.config.schema import TextTowerConfig
    from evlp.models.heads import source_pooler

    folder = tmp_path / "bert"
    folder.mkdir()
    path = _save({"bert.pooler.dense.weight": torch.zeros(4, 4), "bert.pooler.dense.bias": torch.zeros(4),
                  "config": _Payload()}, folder / "pytorch_model.bin")
    state, why = source_pooler(TextTowerConfig(name_or_path=str(folder)), 4)
    assert state is None
    _assert_refusal(why, path)
    assert _CALLS == []

    package = Path(evlp.__file__).parent
    calls = {f"{py.relative_to(package)}:{n}" for py in package.rglob("*.py")
             for n, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\btorch\.load\(", line)}
    assert len(calls) == 1 and calls.pop().startswith("models/convert.py:"), calls


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_foreign_state_dict(path)


# --- file reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"module": sd},
    lambda sd: {"state_dict": {k_: v for k_, v in sd.items()}},
    lambda sd: {"model_state": sd, "cfg": {"lr": 0.1}},
    lambda sd: {"model": {"module": sd}},
    lambda sd: {"state_dict": {"module." + k_: v for k_, v in sd.items()}},
])
def test_load_foreign_state_dict_unwraps(tmp_path: Path, wrap) -> None:
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    got = load_foreign_state_dict(_save(wrap(sd), tmp_path / "x.pt"))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_load_foreign_state_dict_reads_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(2, 3)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    assert torch.equal(load_foreign_state_dict(tmp_path / "x.safetensors")["a.weight"], sd["a.weight"])


def test_load_timm_weights_drops_only_the_classifier(tmp_path: Path) -> None:
    import timm

    src = timm.create_model("test_vit", num_classes=10)
    path = _save(src.state_dict(), tmp_path / "timm.pth")
    dst = timm.create_model("test_vit", num_classes=0)
    load_timm_weights(dst, path)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
