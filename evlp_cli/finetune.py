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
    render_training,
)

app = typer.Typer(help="Fine-tune a pretrained checkpoint downstream.", no_args_is_help=True)


def _dataset(data: str, root: Optional[Path]) -> dict[str, Any]:
    """``--data``/``--root`` as the fine-tuning config's ``data`` (the root) and ``dataset`` (a folder in it)."""
    from evlp.data.location import dataset_folder, is_path

    if root is None and not is_path(data):  # a bare name without --root: paths.data decides the root
        return {"dataset": data}
    folder = dataset_folder(data, root)
    return {"data": folder.parent, "dataset": folder.name}


def _run(finetune: Any, schema: type, command: str, recipe: str, config: Optional[str], overrides: Optional[list[str]],
         resume: bool, stop_after: Optional[int], **values: object) -> None:
    """Resolve the config (recipe, or the run's own with --resume <- options <- overrides), fine-tune with a progress
    bar, and render the run and its results (rank 0 only)."""
    from evlp.config import load_config
    from evlp.train.runs import run_recipe
    from evlp_cli import _render

    extra = {k: str(v) for k, v in values.items() if v is not None}
    cfg = load_config(schema, run_recipe(config, values.get("out"), resume, recipe), overrides or [], command=command,
                      extra=extra)
    result = finetune(cfg, resume=resume, stop_after=stop_after, progress=_render.RichProgress() if is_main() else None)
    render_training(result)


@app.command("imagenet")
def imagenet(
    ckpt: Optional[Path] = CKPT,
    linear: bool = typer.Option(False, "--linear", help="Linear probe: freeze the image tower, train LN + Linear."),
    data: str = data_option("imagenet", "ImageFolder with train/ and val/"),
    root: Optional[Path] = ROOT,
    config: Optional[str] = config_option("imagenet"),
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """ImageNet-1k fine-tuning (layer decay 0.81, RandAugment, mixup/cutmix) or linear probe; top-1/top-5."""
    from evlp.config.imagenet import ImageNetConfig
    from evlp.train.imagenet import finetune_imagenet

    mode = "linear" if linear else "imagenet"
    where = _dataset(data, root)
    _run(finetune_imagenet, ImageNetConfig, "imagenet", mode, config, overrides, resume, stop_after, ckpt=ckpt,
         out=out or Path("runs") / f"{mode}_{where['dataset']}", **where, **({"linear": True} if linear else {}))


@app.command("glue")
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
    from evlp.config.glue import GlueConfig
    from evlp.config.recipes import list_recipes
    from evlp.train.glue import finetune_glue

    recipe = task if task in {r.name for r in list_recipes("glue")} else "sst2"
    _run(finetune_glue, GlueConfig, "glue", recipe, config, overrides, resume, stop_after, ckpt=ckpt, data=root,
         task=task, out=out or Path("runs") / f"glue_{task}")


@app.command("retrieval")
def retrieval(
    ckpt: Optional[Path] = CKPT,
    data: str = data_option("coco", "coco, flickr30k, or a folder in their layout"),
    root: Optional[Path] = ROOT,
    config: Optional[str] = config_option("retrieval"),
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """COCO / Flickr30K retrieval fine-tuning: CLIP ITC on x, best checkpoint by val mean recall, test R@K."""
    from evlp.config.recipes import list_recipes
    from evlp.config.retrieval import RetrievalFinetuneConfig
    from evlp.train.retrieval import finetune_retrieval

    where = _dataset(data, root)
    recipe = where["dataset"] if where["dataset"] in {r.name for r in list_recipes("retrieval")} else "coco"
    _run(finetune_retrieval, RetrievalFinetuneConfig, "retrieval", recipe, config, overrides, resume, stop_after,
         ckpt=ckpt, out=out or Path("runs") / f"retrieval_{where['dataset']}", **where)
