"""`evlp finetune imagenet [--linear]` end to end on a tiny generated ImageFolder of coloured shapes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from evlp.checkpoint import WEIGHTS, best_checkpoint, find_checkpoint, load_student_state_dict
from evlp.config import load_config
from evlp.config.imagenet import ImageNetConfig
from evlp.dist import DistInfo
from evlp.eval.imagenet import evaluate_imagenet, load_image_classifier
from evlp.train.imagenet import ImageNetTask, finetune_imagenet

SHAPES = {"bar": (230, 200, 30), "circle": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 80, 220)}


def make_shapes(root: Path, n_train: int = 40, n_val: int = 12, size: int = 64, seed: int = 0) -> None:
    """``root/{train,val}/<shape>/NNN.png``: one large shape of the class's colour on a grey background."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in SHAPES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                grey = rng.randint(100, 150)
                img = Image.new("RGB", (size, size), (grey, grey, grey))
                draw = ImageDraw.Draw(img)
                r = rng.randint(size // 4, size * 2 // 5)
                cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
                fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in colour)
                if name == "circle":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
                elif name == "square":
                    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
                elif name == "triangle":
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
                else:
                    draw.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=fill)
                img.save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_shapes(root / "shapes")
    return root


def _cfg(tiny_run: Path, root: Path, out: Path, *extra: str) -> ImageNetConfig:
    return load_config(ImageNetConfig, "tiny", [f"ckpt={tiny_run}", f"data={root}", f"out={out}", *extra],
                       command="imagenet")


def _starting_point(cfg: ImageNetConfig) -> tuple[torch.nn.Module, dict[str, float]]:
    """The module exactly as `fit` starts it (same seed before build_module) and its val scores."""
    from accelerate.utils import set_seed

    task = ImageNetTask(cfg)
    set_seed(cfg.train.seed)
    module = task.build_module()
    return module, task.evaluate(module, DistInfo())


def test_finetune_beats_its_starting_point(tiny_run: Path, shapes_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_run, shapes_root, tmp_path / "ft")
    _, before = _starting_point(cfg)
    result = finetune_imagenet(cfg)
    run = result.run
    assert run.steps == run.total_steps == cfg.train.epochs * (160 // 16)
    assert len(run.validations) == cfg.train.epochs and run.best_metric == max(v["top1"] for v in run.validations)
    best = best_checkpoint(tmp_path / "ft")
    assert best is not None and (best / WEIGHTS).is_file()

    (res,) = result.results
    assert res.metrics["top1"] > before["top1"] + 20
    assert res.metrics["top1"] == pytest.approx(run.best_metric)  # the same exact evaluation, on the best weights
    saved = json.loads((tmp_path / "ft" / "eval" / "imagenet_shapes_val.json").read_text())
    assert {"task", "dataset", "split", "checkpoint", "n_images", "n_classes", "metrics", "protocol",
            "config_hash", "seconds"} <= set(saved)
    assert (saved["task"], saved["dataset"], saved["split"]) == ("imagenet", "shapes", "val")
    assert (saved["n_images"], saved["n_classes"]) == (48, 4)
    assert saved["metrics"] == res.metrics and set(saved["metrics"]) == {"top1", "top5"}
    assert saved["checkpoint"] == str(best)
    proto = saved["protocol"]
    assert proto["mode"] == "fine-tune" and proto["img_size"] == 64 and proto["layer_decay"] == 0.81
    assert proto["epochs"] == cfg.train.epochs
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["results"][0]["metrics"] == res.metrics

    # the checkpoint reads back on its own: class names, and the same scores from a fresh process's view
    loaded = load_image_classifier(tmp_path / "ft", device="cpu")
    assert loaded.classes == sorted(SHAPES) and loaded.path == best
    again = evaluate_imagenet(tmp_path / "ft", shapes_root, num_workers=0)
    assert again.metrics == res.metrics


def test_linear_probe_leaves_the_backbone_untouched(tiny_run: Path, shapes_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_run, shapes_root, tmp_path / "lin", "linear=true")
    start, before = _starting_point(cfg)
    result = finetune_imagenet(cfg)
    (res,) = result.results
    assert res.metrics["top1"] > before["top1"] + 20
    saved = json.loads((tmp_path / "lin" / "eval" / "imagenet-linear_shapes_val.json").read_text())
    assert saved["protocol"]["mode"] == "linear probe" and saved["protocol"]["layer_decay"] is None
    assert saved["metrics"] == res.metrics

    trained = load_file(str(find_checkpoint(tmp_path / "lin") / WEIGHTS))
    pretrained = load_student_state_dict(find_checkpoint(tiny_run))
    backbone = {k[len("backbone."):]: v for k, v in trained.items() if k.startswith("backbone.")}
    assert backbone and set(backbone) == {k[len("image."):] for k in pretrained if k.startswith("image.")}
    for key, value in backbone.items():
        assert torch.equal(value, pretrained[f"image.{key}"]), key  # bit-exact
    assert not torch.equal(trained["head.weight"], start.head.weight.detach())
    assert not torch.equal(trained["fc_norm.weight"], start.fc_norm.weight.detach())


def test_stopped_run_resumes_to_the_end(tiny_run: Path, shapes_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_run, shapes_root, tmp_path / "run", "train.epochs=2", "auto_augment=none")
    first = finetune_imagenet(cfg, stop_after=13)
    assert first.run.steps == 13 and first.results == []
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000013" / "data_state_rank0.json").read_text())
    assert state == {"batches": {"epoch": 1, "batch": 3}}
    second = finetune_imagenet(cfg, resume=True)
    assert second.run.resumed_from == 13 and second.run.steps == second.run.total_steps == 20
    assert (tmp_path / "run" / "eval" / "imagenet_shapes_val.json").is_file()
