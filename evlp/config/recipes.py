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


RUNTIME_INPUTS = {"ckpt": "<given with --ckpt>"}
"""Settings a command takes at run time (no recipe holds them); shown as placeholders by :func:`show_recipe`."""


def recipe_command(name: str, command: str | None = None) -> str:
    """The command whose schema a recipe follows: ``command`` when given; the folder of a shipped recipe (the
    pretraining one when several commands ship that name, as with ``tiny``); ``pretrain`` for other files.

    Raises:
        UnknownNameError: ``command`` is not a command with recipes.
    """
    from evlp.config import CONFIG_SCHEMAS

    if command is not None:
        if command not in CONFIG_SCHEMAS:
            raise UnknownNameError(f"--command {command}: choose one of {', '.join(CONFIG_SCHEMAS)}"
                                   f"{did_you_mean(command, list(CONFIG_SCHEMAS))}")
        return command
    path = find_recipe(name)
    return path.parent.name if path.parent.name in CONFIG_SCHEMAS and path.parent == recipe_dir() / path.parent.name \
        else "pretrain"


def show_recipe(name: str, overrides: list[str] | tuple[str, ...] = (), command: str | None = None
                ) -> tuple[str, str]:
    """``(command, resolved YAML)`` of a recipe with overrides, without running anything; settings given only
    at run time (``--ckpt``) are filled with placeholders instead of being demanded.

    Raises:
        ConfigError: unknown recipe or command, or bad overrides.
    """
    import dataclasses

    from evlp.config import CONFIG_SCHEMAS
    from evlp.config.loader import dump_yaml, load_config

    cmd = recipe_command(name, command)
    schema = CONFIG_SCHEMAS[cmd]
    names = {f.name for f in dataclasses.fields(schema)}
    given = {o.split("=", 1)[0] for o in overrides}
    extra = {k: v for k, v in RUNTIME_INPUTS.items() if k in names and k not in given}
    return cmd, dump_yaml(load_config(schema, name, list(overrides), command=cmd, extra=extra))
