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
    command: str = typer.Option("pretrain", "--command", help="Which command's schema the recipe follows."),
) -> None:
    """The fully resolved config of a recipe (defaults + recipe + overrides), as YAML."""
    from evlp.config import CONFIG_SCHEMAS, dump_yaml, load_config
    from evlp.errors import ConfigError
    from evlp_cli import _render

    if command not in CONFIG_SCHEMAS:
        raise ConfigError(f"--command {command}: choose one of {', '.join(CONFIG_SCHEMAS)}")
    _render.yaml_text(dump_yaml(load_config(CONFIG_SCHEMAS[command], name, overrides or [], command=command)))
