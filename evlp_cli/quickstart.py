"""``evlp quickstart``."""

from __future__ import annotations

from pathlib import Path

import typer


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Folder for data, run and results."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data and the run."),
) -> None:
    """Synthetic data -> tiny S-SMKE pretraining -> retrieval eval, on CPU in a few minutes (resumable)."""
    from evlp.quickstart import run_quickstart
    from evlp_cli import _render

    _render.quickstart_summary(run_quickstart(out, seed=seed, progress=_render.RichProgress(),
                                              log=_render.info))
