"""``evlp sweep glue|retrieval|vision`` (filled by a later issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import not_available

app = typer.Typer(help="Run every downstream task of a family and collect one results table.", no_args_is_help=True)

_CKPT = typer.Option(None, "--ckpt", help="Run folder, checkpoint or exported model.")


@app.command("glue")
def glue(ckpt: Optional[Path] = _CKPT) -> None:
    """All nine GLUE tasks."""
    not_available("sweep glue", "a later issue")


@app.command("retrieval")
def retrieval(ckpt: Optional[Path] = _CKPT) -> None:
    """COCO and Flickr30K retrieval fine-tuning."""
    not_available("sweep retrieval", "a later issue")


@app.command("vision")
def vision(ckpt: Optional[Path] = _CKPT) -> None:
    """ImageNet, CIFAR-10 and CIFAR-100: linear probe and fine-tuning."""
    not_available("sweep vision", "a later issue")
