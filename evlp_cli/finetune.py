"""``evlp finetune imagenet|glue|retrieval`` (filled by the downstream issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import not_available

app = typer.Typer(help="Fine-tune a pretrained checkpoint downstream.", no_args_is_help=True)

_CKPT = typer.Option(None, "--ckpt", help="Run folder, checkpoint or exported model.")


@app.command("imagenet")
def imagenet(
    ckpt: Optional[Path] = _CKPT, linear: bool = typer.Option(False, "--linear", help="Linear probe.")
) -> None:
    """ImageNet-1k fine-tuning or linear probe of the image tower."""
    not_available("finetune imagenet", "the downstream issue (#5)")


@app.command("glue")
def glue(ckpt: Optional[Path] = _CKPT, task: str = typer.Option("all", "--task", help="GLUE task.")) -> None:
    """GLUE fine-tuning of the text tower."""
    not_available("finetune glue", "the downstream issue (#5)")


@app.command("retrieval")
def retrieval(
    ckpt: Optional[Path] = _CKPT, data: str = typer.Option("coco", "--data", help="coco or flickr30k.")
) -> None:
    """COCO / Flickr30K retrieval fine-tuning."""
    not_available("finetune retrieval", "the downstream issue (#5)")
