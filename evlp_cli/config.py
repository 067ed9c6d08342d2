"""``evlp config list|show``."""

from __future__ import annotations

from typing import Optional

import typer

from evlp_cli._common import complete_recipes

app = typer.Typer(help="List and show the shipped YAML recipes.", no_args_is_help=True)


@app.command("list")
def list_configs() -> None:
    """The shipped recipes, by command."""
    from evlp.config.recipes import list_recipes
    from evlp_cli import _render

    _render.name_table("recipes", [(r.command, r.name, r.description) for r in list_recipes()],
                       ("command", "name", "description"))


@app.command("show")
def show(
    name: str = typer.Argument(..., autocompletion=complete_recipes, help="Recipe name or YAML path."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides to apply."),
    command: Optional[str] = typer.Option(None, "--command", help="Which command's schema the recipe follows "
                                          "(default: the folder the recipe ships in)."),
) -> None:
    """The fully resolved config of a recipe (defaults + recipe + overrides), as YAML; nothing is run."""
    from evlp.config.recipes import show_recipe
    from evlp_cli import _render

    cmd, text = show_recipe(name, overrides or [], command)
    _render.info(f"# evlp {cmd if cmd == 'pretrain' else 'finetune ' + cmd} config")
    _render.yaml_text(text)
