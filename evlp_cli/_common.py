"""Small helpers shared by the command modules (no torch)."""

from __future__ import annotations

import os

from evlp.errors import NotAvailableError


def is_main() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (only rank 0 renders)."""
    return int(os.environ.get("RANK", "0")) == 0


def not_available(what: str, issue: str) -> None:
    """Raise the exit-2 error of a command that a later release fills."""
    raise NotAvailableError(f"`evlp {what}` is not available yet in evlp; it arrives with {issue}")


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
