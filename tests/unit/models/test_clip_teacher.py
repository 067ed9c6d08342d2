"""A CLIP image tower (transformers' layout) as the KD teacher, offline: tiny random CLIP models saved to folders.

The target is checked against an independent forward of ``CLIPVisionModelWithProjection`` on the image as
transformers' own ``CLIPImageProcessor`` normalises it, so that skipping the re-normalisation, or using the
wrong constants, fails.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evlp.config import PretrainConfig, TeacherConfig, load_config
from evlp.errors import DataNotFoundError
from evlp.models.teacher import IMAGENET_MEAN, IMAGENET_STD, build_clip_teacher

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 8, "projection_dim": 16}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``CLIPVisionModelWithProjection`` saved with ``save_pretrained`` (32 px, 16-d embedding)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = tmp_path_factory.mktemp("clip") / "tiny-clip-vision"
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(out)
    return out


def _student_batch(size: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] and the same images as the student's batch (ImageNet mean/std)."""
    raw = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return raw, (raw - mean) / std


def _reference(folder: Path, raw: torch.Tensor) -> torch.Tensor:
    """``image_embeds`` of the saved model on ``raw`` (already at its size) as CLIP's processor normalises it."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_convert_rgb=False)
    pixels = processor(images=list(raw), return_tensors="pt", input_data_format="channels_first")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels).image_embeds


def test_target_is_the_projected_embedding_of_the_clip_normalised_image(clip_dir: Path) -> None:
    teacher = build_clip_teacher(TeacherConfig(name="clip", name_or_path=str(clip_dir)))
    assert teacher.width == VISION["projection_dim"] and teacher.img_size == VISION["image_size"]
    raw, batch = _student_batch(VISION["image_size"])
    torch.testing.assert_close(teacher(batch), _reference(clip_dir, raw), rtol=1e-4, atol=1e-5)


def test_a_student_sized_image_is_resized_to_clip_size_first(clip_dir: Path) -> None:
    teacher = build_clip_teacher(TeacherConfig(name="clip", name_or_path=str(clip_dir)))
    raw, batch = _student_batch(64)  # the student trains at 64 px, the CLIP model takes 32
    resized = F.interpolate(raw, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(teacher(batch), _reference(clip_dir, resized), rtol=1e-4, atol=1e-5)


def test_teacher_is_frozen_in_eval_mode_and_its_target_has_no_graph(clip_dir: Path) -> None:
    teacher = build_clip_teacher(TeacherConfig(name="clip", name_or_path=str(clip_dir)))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    _, batch = _student_batch(32)
    out = teacher(batch.requires_grad_(True))
    assert out.grad_fn is None and not out.requires_grad


def test_a_whole_clip_model_folder_gives_its_image_features(tmp_path: Path) -> None:
    """A ``CLIPModel`` folder (text tower included): the target equals ``CLIPModel.get_image_features``."""
    from transformers import CLIPConfig, CLIPModel

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {k: v for k, v in VISION.items() if k != "projection_dim"}
    torch.manual_seed(1)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).eval()
    full.save_pretrained(tmp_path / "clip")
    teacher = build_clip_teacher(TeacherConfig(name="clip", name_or_path=str(tmp_path / "clip")))
    assert teacher.width == 24
    _, batch = _student_batch(32)
    pixels = teacher.clip_pixels(batch)
    with torch.no_grad():
        want = full.get_image_features(pixel_values=pixels)
    want = want if torch.is_tensor(want) else want.pooler_output
    torch.testing.assert_close(teacher(batch), want, rtol=1e-4, atol=1e-5)


def test_missing_folder_is_one_line_naming_it_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-clip-here"
    with pytest.raises(DataNotFoundError) as err:
        build_clip_teacher(TeacherConfig(name="clip", name_or_path=str(missing)))
    text = str(err.value)
    assert "\n" not in text and str(missing) in text and "model.teacher.name_or_path=DIR" in text


def test_tiny_pretraining_run_with_a_clip_teacher(synth_data: Path, tmp_path: Path, clip_dir: Path) -> None:
    """The config takes the target width and input size from the CLIP model; one step runs end to end."""
    from evlp.models import resolve_model_config
    from evlp.train.pretrain import pretrain

    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, "tiny", [
        f"data.root={synth_data}", f"out={run}", "data.num_workers=0", "data.val=null", "train.max_steps=1",
        "train.batch_size=8", "train.log_every=1", "loss.memory_bank_size=16", "model.teacher.name=clip",
        f"model.teacher.name_or_path={clip_dir}"])
    resolved = resolve_model_config(cfg.model)
    assert (resolved.teacher.width, resolved.teacher.img_size, resolved.target_dim) == (16, 32, 16)
    assert resolved.teacher.checkpoint is None  # the weights are the folder's
    pretrain(dataclasses.replace(cfg))
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1 and logged["kd_loss"] > 0
