"""``evlp eval retrieval|zeroshot``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import not_available

app = typer.Typer(help="Evaluate a checkpoint: COCO/Flickr retrieval R@K, ImageNet zero-shot.", no_args_is_help=True)


@app.command("retrieval")
def retrieval(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run folder, checkpoint or exported model."),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Karpathy-style index: folder or JSON (dataset_coco.json ...)."
    ),
    split: str = typer.Option("test", "--split", help="Split of the index to evaluate."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Result JSON (default: RUN/eval/retrieval_<data>_<split>.json)."
    ),
    images_root: Optional[Path] = typer.Option(
        None, "--images", help="Folder the index's image paths are relative to."
    ),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    num_workers: int = typer.Option(2, "--num-workers", min=0),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
) -> None:
    """Image-text retrieval, Karpathy protocol: TR@1/5/10, IR@1/5/10, RSUM (each image encoded once)."""
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval
    from evlp_cli import _render

    result = evaluate_retrieval(
        RetrievalEvalConfig(
            ckpt=str(ckpt),
            data=str(data),
            split=split,
            out=str(out) if out else None,
            images_root=str(images_root) if images_root else None,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
        )
    )
    _render.retrieval_table(result)


@app.command("zeroshot")
def zeroshot(
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Run folder, checkpoint or exported model."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageNet-1k val or an ImageFolder."),
) -> None:
    """ImageNet zero-shot top-1/top-5 with the 80 prompt templates."""
    not_available("eval zeroshot", "the downstream issue (#5)")
