"""``evlp model list|info|import-eve`` and ``evlp export``."""

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


@app.command("import-eve")
def import_eve(
    file: Path = typer.Argument(..., help="The released EVE checkpoint (github ssyze/EVE; .pth or .safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="The new evlp model folder."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="The tokenizer the weights were trained with: the "
                                  "release's BPE tokenizer folder."),
    model: str = typer.Option("eve_base", "--model", autocompletion=complete_models,
                              help="The preset the settings start from (sizes the file fixes are read from it)."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Model overrides, e.g. eve.num_heads=16 for EVE-Large."),
) -> None:
    """Convert the authors' released EVE weights into an evlp model for `evlp eval retrieval` / `finetune`."""
    from evlp.config.loader import parse_overrides
    from evlp.models.convert_eve import import_eve as convert
    from evlp_cli import _render

    res = convert(file, out, tokenizer=tokenizer, model=model, overrides=parse_overrides(overrides or []))
    _render.info(f"converted {file} into {res.path}: {len(res.ignored)} released tensors ignored "
                 f"({', '.join(sorted(res.ignored)) or 'none'}); {len(res.fresh)} evlp-only tensors keep their init")
    _render.out.print(str(res.path), highlight=False)


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
