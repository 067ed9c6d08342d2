"""``evlp sweep glue|retrieval|vision|all|run|report``: every downstream task of a checkpoint, or any grid, in one
resumable, parallel job with one results table (the work is in :mod:`evlp.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from evlp_cli._common import OVERRIDES, ROOT, recipe_completer

app = typer.Typer(help="Run every downstream task of a checkpoint (or any grid of settings) and collect one results "
                  "table; resumable and parallel.", no_args_is_help=True)

_CKPT = typer.Option(None, "--ckpt", help="The pretraining run folder, checkpoint or export to evaluate (a run "
                     "folder means its latest checkpoint, fixed when the sweep starts).")
_OUT = typer.Option(None, "--out", "-o", help="The sweep folder (default: sweeps/<family>-<run name>); run the same "
                    "command again to resume it.")
_CONFIG = typer.Option(None, "--config", "-c", autocompletion=recipe_completer(),
                       help="Train every fine-tune with the recipe of this name (e.g. tiny) instead of each task's own.")
_ONLY = typer.Option(None, "--only", help="Only these tasks: comma-separated names, globs or families (cola,rte or "
                     "'zeroshot-*' or glue).")
_SKIP = typer.Option(None, "--skip", help="Leave out these tasks (comma-separated names, globs or families).")
_DRY = typer.Option(False, "--dry-run", help="Print the plan (what runs, resumes, is kept or skipped) and exit.")
_DEVICES = typer.Option(None, "--devices", help="GPU indices, one run per GPU at once: 0,1,2,3.")
_JOBS = typer.Option(None, "--jobs", "-j", min=1, help="Runs at once on CPU (the cores are shared out).")
_SEEDS = typer.Option(1, "--seeds", min=1, help="Run each training task with N seeds (the recipe's seed and the next "
                      "ones); the table shows mean ± standard deviation.")


def _names(values: Optional[list[str]]) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def _default_out(family: str, ckpt: Optional[Path]) -> Path:
    name = Path(ckpt).resolve().name if ckpt is not None else "sweep"
    if name.startswith("step_") and ckpt is not None:
        name = Path(ckpt).resolve().parent.parent.name
    return Path("sweeps") / f"{family}-{name}"


def _execute(runs: list[Any], out: Path, info: dict[str, Any], only: Optional[list[str]], skip: Optional[list[str]],
             dry_run: bool, devices: Optional[str], jobs: Optional[int]) -> None:
    """Select, then print the plan (``--dry-run``) or run the sweep, render the table and set the exit code."""
    from evlp.sweep import Sweep, build_report, make_slots, select, write_report
    from evlp_cli import _render

    runs = select(runs, _names(only), _names(skip))
    slots = make_slots(devices, jobs)
    sweep = Sweep(out, runs, slots, info=info)
    if dry_run:
        _render.sweep_plan(sweep.merge(), {r.key for r in runs}, out)
        return
    live = _render.SweepLive(out, len(runs))
    sweep.on_event, sweep.on_tick = live.event, live.tick
    with live:
        ledger = sweep.run()
    report = build_report(ledger)
    json_path, md_path = write_report(report, ledger.info)
    _render.sweep_table(report, json_path, md_path)
    if sweep.stopping is not None:
        from evlp.train.guard import STOP_SIGNALS

        _render.error(f"sweep stopped by {sweep.stopping}; run the same command again to resume it")
        raise typer.Exit(STOP_SIGNALS.get(sweep.stopping, 130))
    failed = [r for r in report.failures if r.run.key in {run.key for run in runs}]
    if failed:
        _render.sweep_failures(report, failed)
        raise typer.Exit(1)


def _family(family: str, ckpt: Optional[Path], root: Optional[Path], out: Optional[Path], config: Optional[str],
            only: Optional[list[str]], skip: Optional[list[str]], dry_run: bool, devices: Optional[str],
            jobs: Optional[int], seeds: int, overrides: Optional[list[str]]) -> None:
    from evlp.sweep import family_plan, sweep_settings

    settings = sweep_settings(ckpt, root, config=config, overrides=overrides, seeds=seeds)
    out = out or _default_out(family, ckpt)
    info = {"family": family, "checkpoint": str(settings.ckpt), "root": str(settings.root), "config": config,
            "overrides": settings.overrides, "seeds": seeds}
    _execute(family_plan(family, settings), out, info, only, skip, dry_run, devices, jobs)


def _family_command(family: str, doc: str) -> None:
    def command(
        ckpt: Optional[Path] = _CKPT, root: Optional[Path] = ROOT, out: Optional[Path] = _OUT,
        config: Optional[str] = _CONFIG, only: Optional[list[str]] = _ONLY, skip: Optional[list[str]] = _SKIP,
        dry_run: bool = _DRY, devices: Optional[str] = _DEVICES, jobs: Optional[int] = _JOBS, seeds: int = _SEEDS,
        overrides: Optional[list[str]] = OVERRIDES,
    ) -> None:
        _family(family, ckpt, root, out, config, only, skip, dry_run, devices, jobs, seeds, overrides)

    command.__doc__ = doc
    app.command(family)(command)


_family_command("glue", "The nine GLUE tasks (MNLI on matched and mismatched dev), one fine-tune each; GLUE average.")
_family_command("retrieval", "Zero-shot COCO 5k and Flickr30K 1k retrieval of the checkpoint, then retrieval "
                "fine-tuning and test on both.")
_family_command("vision", "ImageNet zero-shot, linear probe and fine-tune; CIFAR-10/100 zero-shot and linear probe "
                "when ROOT/cifar10, ROOT/cifar100 exist.")
_family_command("all", "glue, retrieval and vision in one sweep.")


# ---------------------------------------------------------------------- grids
def _parse_command(argv: list[str], ckpt: Optional[Path], root: Path, where: str) -> tuple[list[str], dict[str, Any], list[str]]:
    """Parse a spec's ``evlp`` command with the real command definitions: (command path, its options, argv)."""
    from evlp.errors import ConfigError
    from evlp_cli.main import app as root_app

    group: Any = typer.main.get_command(root_app)
    context = type(group.make_context("evlp", ["--help"], resilient_parsing=True))  # typer's own click Context
    ctx = context(group, info_name="evlp")
    path: list[str] = []
    rest = list(argv)
    while hasattr(group, "list_commands"):  # a group (typer may vendor click: no isinstance checks)
        if not rest or rest[0].startswith("-"):
            raise ConfigError(f"{where}: incomplete command `evlp {' '.join(argv)}`")
        sub = group.get_command(ctx, rest[0])
        if sub is None:
            raise ConfigError(f"{where}: unknown command `evlp {' '.join([*path, rest[0]])}`")
        path.append(rest.pop(0))
        group, ctx = sub, context(sub, info_name=path[-1], parent=ctx)
    supported = (["pretrain"], ["finetune", "glue"], ["finetune", "imagenet"], ["finetune", "retrieval"],
                 ["eval", "retrieval"], ["eval", "zeroshot"])
    if path not in [list(s) for s in supported]:
        raise ConfigError(f"{where}: `evlp {' '.join(path)}` cannot be swept; sweep one of: "
                          + ", ".join(" ".join(s) for s in supported))
    if path[0] == "eval":  # the sweep's --ckpt and --root, unless the command names its own
        rest += ["--ckpt", str(ckpt)] if "--ckpt" not in rest and ckpt is not None else []
        rest += ["--root", str(root)] if "--root" not in rest else []
    try:
        params = group.make_context(path[-1], list(rest), parent=ctx).params
    except Exception as exc:  # noqa: BLE001 - click's usage errors (typer may vendor click)
        if not hasattr(exc, "format_message"):
            raise
        raise ConfigError(f"{where}: `evlp {' '.join([*path, *rest])}`: {exc.format_message()}") from None
    for name in ("out", "resume", "stop_after"):
        if params.get(name):
            raise ConfigError(f"{where}: the sweep sets --{name.replace('_', '-')} itself; drop it from the command")
    return path, params, rest


@app.command("run")
def run(
    spec: Path = typer.Argument(..., help="Sweep spec YAML: `command:` (an evlp command), `grid:` (key -> values; "
                                "config keys such as optim.lr, train.seed, or options such as --split) and "
                                "`overrides:`; or `runs:` a list of such blocks."),
    ckpt: Optional[Path] = _CKPT, root: Optional[Path] = ROOT, out: Optional[Path] = _OUT,
    only: Optional[list[str]] = _ONLY, skip: Optional[list[str]] = _SKIP, dry_run: bool = _DRY,
    devices: Optional[str] = _DEVICES, jobs: Optional[int] = _JOBS, seeds: int = _SEEDS,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Any grid of settings over any training or evaluation command, e.g. learning rate x seed for one GLUE task."""
    from evlp.sweep import GridSpec, read_spec, spec_plan, sweep_settings

    settings = sweep_settings(ckpt, root, overrides=overrides, seeds=seeds, required=False)
    specs = []
    for i, block in enumerate(read_spec(spec)):
        path, params, argv = _parse_command(block["argv"], settings.ckpt, settings.root, f"{spec}: block {i + 1}")
        options = {k: params.get(k) for k in ("task", "ckpt", "data", "root", "linear", "config") if k in params}
        if options.get("ckpt") is not None:
            options["ckpt"] = str(Path(options["ckpt"]).resolve())
        options = {k: v for k, v in options.items() if v is not None}
        if path[0] != "eval" and "ckpt" not in options and settings.ckpt is None and path != ["pretrain"]:
            from evlp.errors import ConfigError

            raise ConfigError(f"{spec}: block {i + 1}: needs a checkpoint: --ckpt on the sweep or in its command")
        specs.append(GridSpec(name=block["name"], command=path, params=options, argv=argv,
                              overrides=[*(params.get("overrides") or []), *block["overrides"]], grid=block["grid"]))
    info = {"spec": str(spec.resolve()), "checkpoint": str(settings.ckpt) if settings.ckpt else None,
            "root": str(settings.root), "overrides": settings.overrides, "seeds": seeds}
    _execute(spec_plan(specs, settings), out or Path("sweeps") / spec.stem, info, only, skip, dry_run, devices, jobs)


@app.command("report")
def report(
    folder: Path = typer.Argument(..., help="A sweep folder (the --out of an `evlp sweep` command)."),
) -> None:
    """Render a sweep's results table again from its ledger and result files; runs nothing."""
    from evlp.sweep import Ledger, load_report, write_report
    from evlp_cli import _render

    rep = load_report(folder)
    json_path, md_path = write_report(rep, Ledger.read(folder).info)
    _render.sweep_table(rep, json_path, md_path)
    if rep.failures:
        _render.sweep_failures(rep, rep.failures)
