"""How each training command turns its options into a resolved config: the one rule for the CLI and ``evlp sweep``.

``pretrain``, ``glue``, ``imagenet`` and ``retrieval`` each pick a default recipe from their options (the GLUE
task's own recipe, ``linear`` for a linear probe, the retrieval dataset's recipe), map ``--data``/``--root`` to
their config fields, and resolve: defaults <- recipe (or ``--config``, or the run's own config on ``--resume``)
<- options <- ``KEY=VALUE`` overrides. ``evlp sweep`` resolves every run of a plan the same way before anything
runs, so a bad override fails the whole sweep at once and each run's config hash is the hash of what it will
train with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evlp.errors import ConfigError

TRAINING_COMMANDS = ("pretrain", "glue", "imagenet", "retrieval")
"""The commands whose settings are a config (the schemas of :data:`evlp.config.CONFIG_SCHEMAS`)."""


def finetune_data(data: str | None, root: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``--data``/``--root`` as a fine-tuning config's ``data`` (the root) and ``dataset`` (a folder in it)."""
    from evlp.data.location import dataset_folder, is_path

    if data is None:
        return {"data": str(root)} if root is not None else {}
    if root is None and not is_path(data):  # a bare name without --root: paths.data decides the root
        return {"dataset": data}
    folder = dataset_folder(data, root)
    return {"data": str(folder.parent), "dataset": folder.name}


def run_recipe(config: str | None, out: str | os.PathLike[str] | None, resume: bool, default: str) -> str:
    """The recipe a training command resolves its config from: ``--config`` when given; with ``--resume``, the
    run's own saved ``RUN/config.yaml``; else the command's ``default`` recipe."""
    from evlp.checkpoint import CONFIG

    if config is not None:
        return config
    saved = Path(out) / CONFIG if out is not None else None
    return str(saved) if resume and saved is not None and saved.is_file() else default


def _recipe_names(command: str) -> set[str]:
    from evlp.config.recipes import list_recipes

    return {r.name for r in list_recipes(command)}


def default_recipe(command: str, options: dict[str, Any]) -> str:
    """The recipe a command starts from when ``--config`` is not given."""
    if command == "pretrain":
        return "s_smke"
    if command == "glue":
        task = options.get("task")
        return task if task in _recipe_names("glue") else "sst2"
    if command == "imagenet":
        return "linear" if options.get("linear") else "imagenet"
    if command == "retrieval":
        dataset = finetune_data(options.get("data") or "coco", options.get("root")).get("dataset", "coco")
        return dataset if dataset in _recipe_names("retrieval") else "coco"
    raise ConfigError(f"'{command}' is not a training command; choose one of: {', '.join(TRAINING_COMMANDS)}")


def default_out(command: str, options: dict[str, Any]) -> Path:
    """The run folder a command writes when ``--out`` is not given."""
    if command == "glue":
        return Path("runs") / f"glue_{options['task']}"
    if command == "imagenet":
        dataset = finetune_data(options.get("data") or "imagenet", options.get("root")).get("dataset", "imagenet")
        return Path("runs") / f"{'linear' if options.get('linear') else 'imagenet'}_{dataset}"
    if command == "retrieval":
        dataset = finetune_data(options.get("data") or "coco", options.get("root")).get("dataset", "coco")
        return Path("runs") / f"retrieval_{dataset}"
    return Path("runs") / "pretrain"


def option_values(command: str, options: dict[str, Any]) -> dict[str, Any]:
    """The config values a command's options set (``extra`` of :func:`evlp.config.load_config`)."""
    out = options.get("out")
    if command == "pretrain":
        extra: dict[str, Any] = {}
        data, root = options.get("data"), options.get("root")
        if data is not None:
            from evlp.data.location import dataset_folder

            extra["data"] = {"root": str(dataset_folder(data, root))}
        if root is not None:
            extra["paths"] = {"data": str(root)}
        if out is not None:
            extra["out"] = str(out)
        return extra
    extra = {"out": str(out if out is not None else default_out(command, options))}
    if options.get("ckpt") is not None:
        extra["ckpt"] = str(options["ckpt"])
    if command == "glue":
        extra["task"] = options["task"]
        if options.get("root") is not None:
            extra["data"] = str(options["root"])
    elif command in ("imagenet", "retrieval"):  # without --data, the recipe's (or --config's) dataset stands
        extra.update(finetune_data(options.get("data"), options.get("root")))
        if command == "imagenet" and options.get("linear"):
            extra["linear"] = True
    return extra


def resolve_training_config(command: str, *, config: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                            resume: bool = False, **options: Any) -> Any:
    """Resolve the config of a training command from its options, as the command line does.

    Args:
        command: ``pretrain``, ``glue``, ``imagenet`` or ``retrieval``.
        config: ``--config`` (a recipe name or YAML path); None = the command's default recipe, or with
            ``resume`` the run's own saved config.
        overrides: ``KEY=VALUE`` strings, applied last.
        resume: ``--resume``.
        **options: the command's options: ``out``, ``ckpt``, ``data``, ``root``, ``task`` (glue), ``linear``
            (imagenet); None = not given.

    Raises:
        ConfigError: every problem of the resolved config, or an unknown command.
    """
    from evlp.config import CONFIG_SCHEMAS, load_config

    if command not in CONFIG_SCHEMAS:
        raise ConfigError(f"'{command}' is not a training command; choose one of: {', '.join(TRAINING_COMMANDS)}")
    extra = option_values(command, options)
    recipe = run_recipe(config, extra.get("out"), resume, default_recipe(command, options))
    return load_config(CONFIG_SCHEMAS[command], recipe, list(overrides), command=command, extra=extra)
