"""``evlp model list|info`` and ``evlp export``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import complete_models

app = typer.Typer(help="List models and show their parameter counts.", no_args_is_help=True)


@app.command("list")
def list_models() -> None:
    """The registered model names."""
    from evlp.config.presets import MODEL_DESCRIPTIONS, MODEL_PRESETS
    from evlp_cli import _render

    _render.name_table("models", [(n, MODEL_DESCRIPTIONS.get(n, "")) for n in sorted(MODEL_PRESETS)],
                       ("name", "description"))


@app.command("info")
def info(
    name: str = typer.Argument(..., autocompletion=complete_models, help="Model name (see `evlp model list`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Model overrides, e.g. image.depth=12."),
) -> None:
    """Parameters per part and in total (the frozen teacher counted apart)."""
    from evlp.config.loader import parse_overrides
    from evlp.models import model_config, model_info
    from evlp_cli import _render

    _render.model_info(model_info(model_config(name, **parse_overrides(overrides or []))), as_json)


def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run folder (its latest checkpoint) or checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="Export folder (new or empty)."),
) -> None:
    """Write a standalone model folder (safetensors + config + tokenizer) that `evlp.load` reads."""
    from evlp.checkpoint import export_model
    from evlp_cli import _render

    dest = export_model(ckpt, out)
    _render.info(f"exported to {dest}")
    _render.out.print(str(dest), highlight=False)
