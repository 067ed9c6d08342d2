"""``evlp finetune imagenet|glue|retrieval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from evlp_cli._common import (
    CKPT,
    OUT,
    OVERRIDES,
    RESUME,
    ROOT,
    STOP_AFTER,
    config_option,
    data_option,
    is_main,
    launchable,
    render_training,
)

app = typer.Typer(help="Fine-tune a pretrained checkpoint downstream.", no_args_is_help=True)


def _run(command: str, config: Optional[str], overrides: Optional[list[str]], resume: bool,
         stop_after: Optional[int], **options: Any) -> None:
    """Resolve the config (recipe, or the run's own with --resume <- options <- overrides), fine-tune with a progress
    bar, and render the run and its results (rank 0 only)."""
    from evlp.config.commands import resolve_training_config
    from evlp_cli import _render

    cfg = resolve_training_config(command, config=config, overrides=overrides or [], resume=resume, **options)
    if command == "imagenet":
        from evlp.train.imagenet import finetune_imagenet as finetune
    elif command == "glue":
        from evlp.train.glue import finetune_glue as finetune
    else:
        from evlp.train.retrieval import finetune_retrieval as finetune
    result = finetune(cfg, resume=resume, stop_after=stop_after, progress=_render.RichProgress() if is_main() else None)
    render_training(result)


@app.command("imagenet")
@launchable
def imagenet(
    ckpt: Optional[Path] = CKPT,
    linear: bool = typer.Option(False, "--linear", help="Linear probe: freeze the image tower, train LN + Linear."),
    data: Optional[str] = data_option(None, "ImageFolder with train/ and val/", implied="imagenet, or --config's"),
    root: Optional[Path] = ROOT,
    config: Optional[str] = config_option("imagenet"),
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """ImageNet-1k fine-tuning (layer decay 0.81, RandAugment, mixup/cutmix) or linear probe; top-1/top-5."""
    _run("imagenet", config, overrides, resume, stop_after, ckpt=ckpt, linear=linear, data=data, root=root, out=out)


@app.command("glue")
@launchable
def glue(
    task: str = typer.Option(..., "--task", "-t", help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli."),
    ckpt: Optional[Path] = CKPT,
    root: Optional[Path] = ROOT,
    config: Optional[str] = config_option("glue"),
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """GLUE fine-tuning of the text tower (+ pooler + classifier) on ROOT/glue/<task>; metrics over the whole dev set."""
    _run("glue", config, overrides, resume, stop_after, task=task, ckpt=ckpt, root=root, out=out)


@app.command("retrieval")
@launchable
def retrieval(
    ckpt: Optional[Path] = CKPT,
    data: Optional[str] = data_option(None, "coco, flickr30k, or a folder in their layout",
                                      implied="coco, or --config's"),
    root: Optional[Path] = ROOT,
    config: Optional[str] = config_option("retrieval"),
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """COCO / Flickr30K retrieval fine-tuning: CLIP ITC on x (EVE: ITC + ITM, test also re-ranked, RR@rerank_k),
    best checkpoint by val mean recall, test R@K."""
    _run("retrieval", config, overrides, resume, stop_after, ckpt=ckpt, data=data, root=root, out=out)
