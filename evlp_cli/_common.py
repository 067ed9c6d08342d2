"""Small helpers and the options shared by the command modules (no torch).

One vocabulary for every command (the README's "Common flags" table): ``--root`` the data root,
``--data`` a dataset name under it or a folder path, ``--ckpt`` a model to start from or evaluate, ``--out``
the run folder or result file, ``--config`` a recipe, ``--resume``, ``--stop-after``, and ``KEY=VALUE``
overrides. Every training and evaluation command is :func:`launchable`: ``--num-processes`` and friends.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional

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


_LAUNCH_PANEL = "Several processes or machines (accelerate launch)"
_LAUNCH_OPTIONS: dict[str, tuple[Any, Any]] = {
    "num_processes": (Optional[int], typer.Option(
        None, "--num-processes", rich_help_panel=_LAUNCH_PANEL,
        help="Processes on this machine (one per GPU), started through accelerate launch.")),
    "num_machines": (int, typer.Option(1, "--num-machines", rich_help_panel=_LAUNCH_PANEL,
                                       help="Machines, each running this same command.")),
    "machine_rank": (int, typer.Option(0, "--machine-rank", rich_help_panel=_LAUNCH_PANEL,
                                       help="This machine's index (0: the main one).")),
    "main_address": (Optional[str], typer.Option(
        None, "--main-address", metavar="HOST:PORT", rich_help_panel=_LAUNCH_PANEL,
        help="Machine 0's address and a free port, the same on every machine.")),
}


def launchable(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the launch flags (``--num-processes``, ``--num-machines``, ``--machine-rank``,
    ``--main-address``).

    With them the command starts itself under ``accelerate launch`` (:mod:`evlp.launch`) and exits with the
    launch's exit code; without them, and in every process a launcher started, it runs here as before. The
    flags are added to the command's signature, so that every command spells and checks them the same way.
    """
    signature = inspect.signature(command)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
             for name, (annotation, option) in _LAUNCH_OPTIONS.items()]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        launch_if_asked(**{name: kwargs.pop(name) for name in _LAUNCH_OPTIONS})
        return command(*args, **kwargs)

    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore
    run.__annotations__ = {**command.__annotations__, **{n: a for n, (a, _) in _LAUNCH_OPTIONS.items()}}
    return run


def launch_if_asked(num_processes: Optional[int], num_machines: int, machine_rank: int,
                    main_address: Optional[str]) -> None:
    """Return to run the command here, or launch it on every process the flags ask for and exit with its code.

    Raises:
        ConfigError: a wrong launch flag (exit 2).
        typer.Exit: after the launch, with its exit code.
    """
    from evlp.launch import launched_by_a_launcher, needs_launcher, plan_launch, run_launch

    asked = num_processes is not None or num_machines != 1 or machine_rank != 0 or main_address is not None
    if not asked or launched_by_a_launcher():
        return
    plan = plan_launch(num_processes, num_machines, machine_rank, main_address)
    if not needs_launcher(plan):
        return
    if plan.num_machines > 1:
        from evlp_cli import _render

        _render.info(f"machine {plan.machine_rank} of {plan.num_machines} · {plan.num_processes} process(es) · "
                     f"meeting the others at {plan.address} (up to {plan.timeout_s:g} s)")
    raise typer.Exit(run_launch(plan, "evlp_cli.main", sys.argv[1:]))

