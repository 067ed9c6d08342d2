"""``evlp finetune imagenet|glue|retrieval``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import complete_recipes, is_main

app = typer.Typer(help="Fine-tune a pretrained checkpoint downstream.", no_args_is_help=True)

_CKPT = typer.Option(None, "--ckpt", help="Run folder, checkpoint or exported model.")


def _config(schema: type, command: str, recipe: str, config: Optional[str], overrides: Optional[list[str]],
            resume: bool, **values: object) -> object:
    """Resolve a fine-tuning config: recipe (or the run's own config with --resume) <- options <- overrides."""
    from evlp.checkpoint import CONFIG
    from evlp.config import load_config

    extra = {k: str(v) for k, v in values.items() if v is not None}
    if config is None:
        saved = Path(str(values["out"])) / CONFIG if values.get("out") is not None else None
        config = str(saved) if resume and saved is not None and saved.is_file() else recipe
    return load_config(schema, config, overrides or [], command=command, extra=extra)


def _run(finetune: object, cfg: object, resume: bool, show_result: str = "result_table") -> None:
    """Run a fine-tuning entry point with a progress bar and render its run and results (rank 0 only)."""
    from evlp_cli import _render

    result = finetune(cfg, resume=resume, progress=_render.RichProgress() if is_main() else None)  # type: ignore[operator]
    if is_main():
        _render.run_summary(result.run)
        for r in result.results:
            getattr(_render, show_result)(r)


_CONFIG = typer.Option(None, "--config", "-c", autocompletion=complete_recipes,
                       help="Recipe name or YAML path (default: the task's recipe; with --resume the run's own).")
_ROOT = typer.Option(None, "--root", help="Data root (default: paths.data = ./data).")
_OUT = typer.Option(None, "--out", "-o", help="Fine-tuning run folder.")
_RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint.")
_OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. train.epochs=3.")




@app.command("imagenet")
def imagenet(
    ckpt: Optional[Path] = _CKPT,
    linear: bool = typer.Option(False, "--linear", help="Linear probe: freeze the image tower, train LN + Linear."),
    data: str = typer.Option("imagenet", "--data", "-d", help="ImageFolder under --root with train/ and val/."),
    root: Optional[Path] = _ROOT,
    config: Optional[str] = _CONFIG,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """ImageNet-1k fine-tuning (layer decay 0.81, RandAugment, mixup/cutmix) or linear probe; top-1/top-5."""
    from evlp.config.imagenet import ImageNetConfig
    from evlp.train.imagenet import finetune_imagenet
    mode = "linear" if linear else "imagenet"
    cfg = _config(ImageNetConfig, "imagenet", mode, config, overrides, resume, ckpt=ckpt, data=root, dataset=data,
                  out=out or Path("runs") / f"{mode}_{data}", **({"linear": True} if linear else {}))
    _run(finetune_imagenet, cfg, resume)


@app.command("glue")
def glue(
    task: str = typer.Option(..., "--task", "-t", help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli."),
    ckpt: Optional[Path] = _CKPT,
    root: Optional[Path] = _ROOT,
    config: Optional[str] = _CONFIG,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """GLUE fine-tuning of the text tower (+ pooler + classifier), metrics over the whole dev set."""
    from evlp.config.glue import GlueConfig
    from evlp.config.recipes import list_recipes
    from evlp.train.glue import finetune_glue

    recipe = task if task in {r.name for r in list_recipes("glue")} else "sst2"
    cfg = _config(GlueConfig, "glue", recipe, config, overrides, resume, ckpt=ckpt, data=root, task=task,
                  out=out or Path("runs") / f"glue_{task}")
    _run(finetune_glue, cfg, resume)


@app.command("retrieval")
def retrieval(
    ckpt: Optional[Path] = _CKPT,
    data: str = typer.Option("coco", "--data", "-d", help="coco, flickr30k, or a folder in that layout under --root."),
    root: Optional[Path] = _ROOT,
    config: Optional[str] = _CONFIG,
    out: Optional[Path] = _OUT,
    resume: bool = _RESUME,
    overrides: Optional[list[str]] = _OVERRIDES,
) -> None:
    """COCO / Flickr30K retrieval fine-tuning: CLIP ITC on x, best checkpoint by val mean recall, test R@K."""
    from evlp.config.recipes import list_recipes
    from evlp.config.retrieval import RetrievalFinetuneConfig
    from evlp.train.retrieval import finetune_retrieval

    recipe = data if data in {r.name for r in list_recipes("retrieval")} else "coco"
    cfg = _config(RetrievalFinetuneConfig, "retrieval", recipe, config, overrides, resume, ckpt=ckpt, data=root,
                  dataset=data, out=out or Path("runs") / f"retrieval_{data}")
    _run(finetune_retrieval, cfg, resume, "retrieval_table")
