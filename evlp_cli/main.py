"""The ``evlp`` command: a thin Typer app over the ``evlp`` library.

Only typer, rich and torch-free parts of evlp are imported here; commands import the heavy parts in
their bodies, so ``evlp --help`` and TAB completion stay fast.
"""

from __future__ import annotations

import os
import sys
import typer

from evlp import __version__
from evlp.errors import EvlpError, worker_message
from evlp_cli import config as config_cmd
from evlp_cli import data, evaluate, finetune, model, pretrain, quickstart, sweep
from evlp_cli import bench

app = typer.Typer(
    name="evlp",
    help="Efficient vision-language pretraining from pretrained unimodal encoders (S-SMKE).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evlp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Efficient vision-language pretraining from pretrained unimodal encoders (S-SMKE)."""


app.add_typer(data.app, name="data")
app.command("pretrain", no_args_is_help=False)(pretrain.pretrain)
app.add_typer(finetune.app, name="finetune")
app.add_typer(evaluate.app, name="eval")
app.add_typer(sweep.app, name="sweep")
app.add_typer(bench.app, name="bench")
app.add_typer(model.app, name="model")
app.add_typer(config_cmd.app, name="config")
app.command("quickstart")(quickstart.quickstart)
app.command("export")(model.export)


def _quiet_except_errors() -> None:
    """Only rank 0 renders and logs: the other ranks of a launch show only their errors."""
    import logging
    import warnings

    warnings.showwarning = lambda *args, **kwargs: None
    logging.disable(logging.WARNING)


def _stopped_on_every_rank(exc: EvlpError) -> bool:
    """A stop signal ends every rank at the same step with the same message: rank 0 reports it."""
    from evlp.train.guard import RunInterrupted

    return isinstance(exc, RunInterrupted)


def main() -> None:
    """Console entry point: run the app, map evlp errors to one red line and an exit code.

    An error raised in a ``DataLoader`` worker shows as the worker's own message, without the traceback
    that torch adds to it (unless ``EVLP_DEBUG=1``).
    """
    debug = os.environ.get("EVLP_DEBUG", "") not in ("", "0")
    if int(os.environ.get("RANK", "0")) != 0 and not debug:  # not rank 0 (as evlp.dist.is_main_process)
        _quiet_except_errors()
    elif not debug:
        import warnings

        def _one_line(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            from evlp_cli import _render

            _render.warn(str(message))

        warnings.showwarning = _one_line
    try:
        app()
    except EvlpError as exc:
        if debug:
            raise
        from evlp_cli import _render

        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            _render.error(worker_message(str(exc)))  # an error in a DataLoader worker: its own message only
        elif not _stopped_on_every_rank(exc):
            _render.error(f"rank {rank}: {worker_message(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        from evlp_cli import _render

        _render.error("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        if debug:
            raise
        from evlp_cli import _render

        _render.error(f"{type(exc).__name__}: {worker_message(str(exc))} (run with EVLP_DEBUG=1 for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
