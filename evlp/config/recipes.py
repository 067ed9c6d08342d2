"""The shipped YAML recipes (``configs/<command>/<name>.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evlp.errors import UnknownNameError
from evlp.registry import did_you_mean


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe."""

    name: str
    command: str
    path: Path
    description: str


def recipe_dir() -> Path:
    """Where the recipes are: the checkout's ``configs/`` or the installed ``evlp._recipes``."""
    here = Path(__file__).resolve().parent.parent
    checkout = here.parent / "configs"
    if checkout.is_dir():
        return checkout
    return here / "_recipes"


def _description(path: Path) -> str:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # read_yaml reports bad bytes
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""


def list_recipes(command: str | None = None) -> list[Recipe]:
    """All shipped recipes, optionally only those of one command, sorted by command and name."""
    root = recipe_dir()
    out = []
    for path in sorted(root.glob("*/*.yaml")):
        if command is None or path.parent.name == command:
            out.append(Recipe(path.stem, path.parent.name, path, _description(path)))
    return out


def find_recipe(name: str, command: str | None = None) -> Path:
    """Resolve a recipe name (``tiny``, ``s_smke.yaml``, ``pretrain/tiny``) or a path to a YAML file.

    Raises:
        UnknownNameError: neither a file nor a shipped recipe; lists the recipes.
    """
    p = Path(name).expanduser()
    if p.is_file():
        return p
    stem = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    cmd, _, base = stem.rpartition("/")
    recipes = list_recipes()
    candidates = [r for r in recipes if r.name == base and (not cmd or r.command == cmd)]
    if len(candidates) > 1:  # the same name in several commands: the asked one, else pretraining's
        candidates = [r for r in candidates if r.command == (command or "pretrain")] or candidates
    if candidates:
        return candidates[0].path
    pool = [r for r in recipes if command is None or r.command == command] or recipes
    names = [r.name for r in pool]
    raise UnknownNameError(
        f"config '{name}' is neither a file nor a shipped recipe{did_you_mean(base, names)}; "
        f"shipped: {', '.join(names) or 'none'} (see `evlp config list`)"
    )
