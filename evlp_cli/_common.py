"""Small helpers shared by the command modules (no torch)."""

from __future__ import annotations

from evlp.errors import NotAvailableError


def not_available(what: str, issue: str) -> None:
    """Raise the exit-2 error of a command that a later release fills."""
    raise NotAvailableError(f"`evlp {what}` is not available yet in evlp; it arrives with {issue}")


def complete_recipes(incomplete: str) -> list[str]:
    """TAB completion of shipped recipe names (torch-free)."""
    from evlp.config.recipes import list_recipes

    return [r.name for r in list_recipes() if r.name.startswith(incomplete)]


def complete_models(incomplete: str) -> list[str]:
    """TAB completion of model names (torch-free)."""
    from evlp.config.presets import MODEL_PRESETS

    return [n for n in sorted(MODEL_PRESETS) if n.startswith(incomplete)]
