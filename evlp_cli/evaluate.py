"""``evlp eval retrieval|zeroshot``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import ROOT, data_option, is_main, launchable, resolve_data

app = typer.Typer(help="Evaluate a checkpoint: COCO/Flickr retrieval R@K, ImageNet zero-shot.", no_args_is_help=True)


@app.command("retrieval")
@launchable
def retrieval(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run folder, checkpoint or exported model."),
    data: str = data_option("coco", "A Karpathy-style index: its folder (or the JSON, dataset_coco.json ...)"),
    root: Optional[Path] = ROOT,
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
    rerank: int = typer.Option(0, "--rerank", min=0, metavar="K",
                               help="Also re-rank each query's ITC top-K with the model's ITM head (EVE): a "
                                    "separate RR@K result beside the dual-encoder one."),
) -> None:
    """Image-text retrieval, Karpathy protocol: TR@1/5/10, IR@1/5/10, RSUM (each image encoded once)."""
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval_all
    from evlp_cli import _render

    results = evaluate_retrieval_all(
        RetrievalEvalConfig(
            ckpt=str(ckpt),
            data=str(resolve_data(data, root)),
            split=split,
            out=str(out) if out else None,
            images_root=str(images_root) if images_root else None,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            rerank=rerank,
        )
    )
    if is_main():
        for result in results:
            _render.evaluation(result)


@app.command("zeroshot")
@launchable
def zeroshot(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run folder, checkpoint or exported model."),
    data: str = data_option("imagenet", "ImageNet or any ImageFolder (its folder, or its split folder)"),
    root: Optional[Path] = ROOT,
    split: str = typer.Option("val", "--split", help="Split folder of the ImageFolder."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class names: a file with one name per line "
                                           "(sorted folder order), a JSON list or a JSON {folder: name} map."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates with {} (default: the 80 "
                                             "OpenAI ImageNet templates)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Result JSON (default: RUN/eval/zeroshot_<data>_<split>.json)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    num_workers: int = typer.Option(2, "--num-workers", min=0),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
) -> None:
    """Zero-shot classification: class prototypes from prompt templates, top-1 / top-5."""
    from evlp.eval.zeroshot import ZeroShotConfig, evaluate_zeroshot
    from evlp_cli import _render

    result = evaluate_zeroshot(ZeroShotConfig(
        ckpt=str(ckpt), data=str(resolve_data(data, root)), split=split, classes=str(classes) if classes else None,
        templates=str(templates) if templates else None, out=str(out) if out else None, batch_size=batch_size,
        num_workers=num_workers, device=device))
    if is_main():
        _render.evaluation(result)
