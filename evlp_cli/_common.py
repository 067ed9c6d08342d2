"""Small helpers and the options shared by the command modules (no torch).

One vocabulary for every command (the README's "Common flags" table): ``--root`` the data root,
``--data`` a dataset name under it or a folder path, ``--ckpt`` a model to start from or evaluate, ``--out``
the run folder or result file, ``--config`` a recipe, ``--resume``, ``--stop-after``, and ``KEY=VALUE``
overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def is_main() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (only rank 0 renders)."""
    from evlp.dist import is_main_process

    return is_main_process()


def recipe_completer(command: str | None = None):  # noqa: ANN201 - a Typer autocompletion callback
    """TAB completion of the shipped recipe names of ``command`` (all commands when None); torch-free."""

    def complete(incomplete: str) -> list[str]:
        from evlp.config.recipes import list_recipes

        return sorted({r.name for r in list_recipes(command) if r.name.startswith(incomplete)})

    return complete


complete_recipes = recipe_completer()


def complete_models(incomplete: str) -> list[str]:
    """TAB completion of model names (torch-free)."""
    from evlp.config.presets import MODEL_PRESETS

    return [n for n in sorted(MODEL_PRESETS) if n.startswith(incomplete)]


def data_option(default: Optional[str], what: str, *, implied: Optional[str] = None) -> Any:
    """``--data NAME|DIR``: a dataset name under ``--root`` or a folder path (``evlp.data.location``).

    ``implied``: the dataset a training command uses when ``--data`` is not given (its recipe's or its config's),
    shown in the help while the option itself defaults to None, so that a ``--config`` file's dataset stands.
    """
    shown = f" (default: {default or implied})" if default or implied else ""
    return typer.Option(default, "--data", "-d", help=f"{what}: a dataset name under --root, or a folder path{shown}.")


ROOT = typer.Option(None, "--root", help="Data root holding one folder per dataset (default: paths.data = ./data).")
CKPT = typer.Option(None, "--ckpt", help="Run folder, checkpoint or exported model.")
OUT = typer.Option(None, "--out", "-o", help="Run folder.")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its latest complete checkpoint.")
STOP_AFTER = typer.Option(None, "--stop-after", min=1, help="End after this many steps (checkpointed), keeping the "
                          "full schedule; continue later with --resume (e.g. for cluster time limits).")
OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. train.batch_size=128.")


def config_option(command: str) -> Any:
    """``--config NAME|YAML`` with completion of ``command``'s recipes."""
    return typer.Option(None, "--config", "-c", autocompletion=recipe_completer(command),
                        help="Recipe name or YAML path (default: the command's recipe; with --resume the run's own).")


def resolve_data(data: Optional[str], root: Optional[Path]) -> Optional[Path]:
    """The folder ``--data`` means under ``--root`` (None when ``--data`` is not given)."""
    from evlp.data.location import dataset_folder

    return None if data is None else dataset_folder(data, root)


def render_training(result: Any) -> None:
    """The end of a training command on rank 0: the run's table, then each result by its type."""
    if not is_main():
        return
    from evlp_cli import _render

    _render.run_summary(result.run)
    for r in result.results:
        _render.evaluation(r)
