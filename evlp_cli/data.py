"""``evlp data synth|download|info|verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import not_available

app = typer.Typer(help="Fetch, synthesise and inspect datasets.", no_args_is_help=True)


@app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (train shards + test index)."),
    train: int = typer.Option(20000, "--train", min=1, help="Training samples (webdataset shards)."),
    test: int = typer.Option(500, "--test", min=1, help="Held-out test images (Karpathy-style index)."),
    val: int = typer.Option(0, "--val", min=0, help="Held-out validation images."),
    seed: int = typer.Option(0, "--seed", help="Everything written depends only on this seed."),
    image_size: int = typer.Option(64, "--image-size", min=16, help="Image side in pixels."),
) -> None:
    """Write a synthetic image-caption set (coloured shapes, compositional captions) in the real layouts."""
    from evlp.data.synth import synthesize
    from evlp_cli import _render

    _render.synth_summary(synthesize(out, n_train=train, n_test=test, n_val=val, seed=seed, image_size=image_size))


@app.command("download")
def download(name: str = typer.Argument(..., help="cc3m, cc12m, coco, flickr, imagenet or glue.")) -> None:
    """Fetch and prepare a dataset."""
    not_available(f"data download {name}", "the data issue (#4)")


@app.command("info")
def info(root: Optional[Path] = typer.Argument(None, help="Data root.")) -> None:
    """What datasets, splits and counts a data root holds."""
    not_available("data info", "the data issue (#4)")


@app.command("verify")
def verify(root: Optional[Path] = typer.Argument(None, help="Data root.")) -> None:
    """Open every shard and file and check counts against the manifests."""
    not_available("data verify", "the data issue (#4)")
