"""What a sweep runs: one :class:`SweepRun` per process, planned and checked before anything starts.

A family sweep (``glue``, ``retrieval``, ``vision``, ``all``) or a grid spec becomes a list of runs. Each run is
an ``evlp`` command line (a fine-tune, a pretraining or an evaluation), the result files it writes, the rows of
the results table it fills (metric, the paper's figure), a cost used to start the longest runs first, and an
identity hash:

- training runs (``pretrain``, ``finetune ...``) are resolved here exactly as the command line resolves them
  (:func:`evlp.config.commands.resolve_training_config`); the hash is that of the resolved config (the run
  folder left out), and the child is started with that config file, so what was hashed is what trains;
- evaluations hash their command line (with the concrete checkpoint folder).

A changed setting therefore gives a new hash and a new run folder, never an old result.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evlp.errors import ConfigError, UnknownNameError
from evlp.registry import did_you_mean
from evlp.sweep.rows import (
    DATASET_LABELS,
    ROWS_OF,
    Row,
    eval_row,
    zeroshot_classification_row,
    zeroshot_retrieval_row,
)

FAMILIES = ("glue", "retrieval", "vision")
"""The family sweeps; ``all`` is all three."""

@dataclass
class SweepRun:
    """One process of a sweep."""

    key: str
    """Unique within the sweep: the task, plus ``~name=value,...`` for grid points and seeds."""
    task: str
    """What ``--only``/``--skip`` select (``cola``, ``zeroshot-coco``, ``linear-imagenet``, a spec's name)."""
    family: str
    command: list[str]
    """The evlp command (``["finetune", "glue"]``)."""
    argv: list[str]
    """Its arguments, without ``--out``/``--resume`` (the sweep adds those)."""
    kind: str
    """``train`` (writes a run folder, resumable) or ``eval`` (writes one result file)."""
    config_hash: str
    rows: list[Row]
    config_text: str | None = None
    """The resolved config of a training run (its ``out`` set by the sweep)."""
    seed: int | None = None
    group: str = ""
    """Runs of one group are the seeds of one setting (aggregated to mean and std)."""
    point: dict[str, Any] = field(default_factory=dict)
    """The grid values of this run (seed excluded)."""
    cost: float = 1.0
    overrides: list[str] = field(default_factory=list)
    """The ``KEY=VALUE`` settings a training run was resolved with (shown in plans; its config file holds all)."""
    missing: str | None = None
    """Why it cannot run (data not found) and the command that fixes it; then it is skipped."""

    @property
    def folder_name(self) -> str:
        """``<task>-<hash12>`` with characters that are awkward in paths replaced: the same settings share a
        folder whatever the run is called (a plain run is seed 1 of a ``--seeds N`` sweep)."""
        return f"{re.sub(r'[^A-Za-z0-9._=,+-]+', '_', self.task)}-{self.config_hash[:12]}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config_text")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SweepRun:
        d = dict(d)
        d["rows"] = [Row(**r) for r in d.get("rows", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- the settings every run shares
@dataclass
class SweepSettings:
    """What the sweep's own flags give every run."""

    ckpt: Path | None
    """The concrete checkpoint folder (a run folder resolved to its latest checkpoint)."""
    root: Path
    """The data root (absolute)."""
    config: str | None = None
    """``--config``: the recipe of that name for every training run instead of each task's own."""
    overrides: list[str] = field(default_factory=list)
    seeds: int = 1


def _display_ckpt(ckpt: Path | None) -> list[str]:
    return ["--ckpt", str(ckpt)] if ckpt is not None else []


def training_run(key: str, task: str, family: str, command: list[str], options: dict[str, Any],
                 settings: SweepSettings, rows_of: Any, *, config: str | None = None,
                 overrides: list[str] | None = None, seed: int | None = None, group: str = "",
                 point: dict[str, Any] | None = None) -> SweepRun:
    """A training run: resolve its config now (bad settings fail the whole sweep before it starts)."""
    from evlp.config import dump_yaml, to_dict
    from evlp.config.commands import resolve_training_config

    name = command[-1]
    all_overrides = [*settings.overrides, *(overrides or [])]
    if seed is not None:
        all_overrides.append(f"train.seed={seed}")
    try:
        cfg = resolve_training_config(name, config=config if config is not None else settings.config,
                                      overrides=all_overrides, out="__sweep__", **options)
    except ConfigError as exc:
        raise ConfigError(f"sweep run '{key}' ({' '.join(['evlp', *command])}): {exc}") from None
    data = to_dict(cfg)
    data["out"] = ""
    config_hash = _hash(data)
    argv = ["--task", str(options["task"])] if name == "glue" else []
    rows = rows_of(cfg)
    shown = [*(["--config", str(config or settings.config)] if (config or settings.config) else []), *all_overrides]
    return SweepRun(key=key, task=task, family=family, command=command, argv=argv, kind="train",
                    config_hash=config_hash, rows=rows, config_text=dump_yaml(data), seed=cfg.train.seed,
                    group=group or key, point=point or {}, cost=_training_cost(cfg, name), overrides=shown)


def eval_run(key: str, task: str, family: str, command: list[str], argv: list[str], rows: list[Row],
             *, group: str = "", point: dict[str, Any] | None = None, cost: float = 0.0) -> SweepRun:
    """An evaluation: identified by its command line."""
    return SweepRun(key=key, task=task, family=family, command=command, argv=argv, kind="eval",
                    config_hash=_hash({"command": command, "argv": argv}), rows=rows, group=group or key,
                    point=point or {}, cost=cost)


def _training_cost(cfg: Any, command: str) -> float:
    """Samples the run trains on: max_steps x the samples of an optimizer step (``global_batch_size``, else
    ``batch_size x grad_accum``: a sweep run is one process), else epochs x the training set's size when cheap
    to know."""
    train = cfg.train
    if train.max_steps:
        return float(train.max_steps * (train.global_batch_size or train.batch_size * train.grad_accum))
    return float(train.epochs * max(_train_size(cfg, command), 1))


def _train_size(cfg: Any, command: str) -> int:
    root = Path(getattr(cfg, "data_root", "") or ".")
    try:
        if command == "glue":
            with open(root / "glue" / cfg.task / "train.jsonl", "rb") as fh:
                return sum(1 for _ in fh)
        if command == "imagenet":
            n = 0
            with os.scandir(root / cfg.dataset / "train") as classes:
                for c in classes:
                    if c.is_dir():
                        n += sum(1 for _ in os.scandir(c.path))
            return n
        if command == "retrieval":
            return 10_000 * len(list((root / cfg.dataset / "train").glob("*.tar")))
    except OSError:
        return 0
    return 0


# ---------------------------------------------------------------------- data checks
def _missing(paths: list[Path], fix: str) -> str | None:
    absent = [p for p in paths if not p.exists()]
    if not absent:
        return None
    return f"{absent[0]} not found; fix: {fix}"


# ---------------------------------------------------------------------- families
def _seeded(make: Any, key: str, settings: SweepSettings, base_seed: Any) -> list[SweepRun]:
    """``settings.seeds`` runs of one training setting: the recipe's seed (``base_seed()``, resolved only when
    there are several seeds), then the next ones."""
    if settings.seeds <= 1:
        return [make(key, None)]
    base = base_seed()
    return [make(f"{key}~seed={base + i}", base + i) for i in range(settings.seeds)]


def _recipe_seed(command: str, options: dict[str, Any], settings: SweepSettings, config: str | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> int:
    """The seed a training run would use without a seed override (0 when its settings do not resolve: the run's
    own resolution reports the problem, naming the run)."""
    from evlp.config.commands import resolve_training_config

    try:
        cfg = resolve_training_config(command, config=config if config is not None else settings.config,
                                      overrides=[*settings.overrides, *overrides], out="__sweep__", **options)
    except ConfigError:
        return 0
    return int(cfg.train.seed)


def _train_family_runs(key: str, task: str, family: str, command: list[str], options: dict[str, Any],
                       settings: SweepSettings, missing: str | None) -> list[SweepRun]:
    name = command[-1]

    def make(run_key: str, seed: int | None) -> SweepRun:
        run = training_run(run_key, task, family, command, options, settings, ROWS_OF[name], seed=seed, group=key)
        run.missing = missing
        return run

    if missing:  # one skipped record, whatever the number of seeds
        return [make(key, None)]
    return _seeded(make, key, settings, lambda: _recipe_seed(name, options, settings))


def glue_plan(settings: SweepSettings) -> list[SweepRun]:
    """The nine GLUE tasks (MNLI scored on matched and mismatched)."""
    from evlp.data.layouts import GLUE_TASKS

    runs = []
    for task, spec in GLUE_TASKS.items():
        folder = settings.root / "glue" / task
        missing = _missing([folder / f"{s}.jsonl" for s in ("train", *spec.validation)],
                           f"evlp data download glue --task {task} --out {settings.root}")
        options = {"task": task, "ckpt": settings.ckpt, "root": settings.root}
        runs += _train_family_runs(task, task, "glue", ["finetune", "glue"], options, settings, missing)
    return runs


def retrieval_plan(settings: SweepSettings) -> list[SweepRun]:
    """Zero-shot COCO 5k and Flickr 1k of the checkpoint, then retrieval fine-tuning and test on both."""
    from evlp.data.layouts import KARPATHY_INDEX, TRAIN_SHARDS

    runs = []
    for dataset, fetch in (("coco", "coco"), ("flickr30k", "flickr --archive flickr30k-images.tar.gz")):
        folder = settings.root / dataset
        fix = f"evlp data download {fetch} --out {settings.root}"
        run = eval_run(f"zeroshot-{dataset}", f"zeroshot-{dataset}", "retrieval", ["eval", "retrieval"],
                       [*_display_ckpt(settings.ckpt), "--data", dataset, "--root", str(settings.root), "--split",
                        "test"], [zeroshot_retrieval_row(dataset)], cost=0.0)
        run.missing = _missing([folder / KARPATHY_INDEX], fix)
        runs.append(run)
    for dataset, fetch in (("coco", "coco"), ("flickr30k", "flickr --archive flickr30k-images.tar.gz")):
        folder = settings.root / dataset
        missing = _missing([folder / KARPATHY_INDEX, folder / TRAIN_SHARDS],
                           f"evlp data download {fetch} --out {settings.root}")
        options = {"ckpt": settings.ckpt, "data": dataset, "root": settings.root}
        runs += _train_family_runs(f"finetune-{dataset}", f"finetune-{dataset}", "retrieval",
                                   ["finetune", "retrieval"], options, settings, missing)
    return runs


def vision_plan(settings: SweepSettings) -> list[SweepRun]:
    """ImageNet zero-shot, linear probe and fine-tune; CIFAR-10/100 zero-shot and linear probe when present."""
    runs = []
    for dataset in ("imagenet", "cifar10", "cifar100"):
        folder = settings.root / dataset
        if dataset == "imagenet":
            fix = f"evlp data download imagenet --out {settings.root}"
        else:
            fix = f"place an ImageFolder of {DATASET_LABELS[dataset]} at {folder}/train and {folder}/val (optional)"
        run = eval_run(f"zeroshot-{dataset}", f"zeroshot-{dataset}", "vision", ["eval", "zeroshot"],
                       [*_display_ckpt(settings.ckpt), "--data", dataset, "--root", str(settings.root), "--split",
                        "val"], [zeroshot_classification_row(dataset)], cost=0.0)
        run.missing = _missing([folder / "val"], fix)
        runs.append(run)
        missing = _missing([folder / "train", folder / "val"], fix)
        modes = ("linear", "finetune") if dataset == "imagenet" else ("linear",)
        for mode in modes:
            options = {"ckpt": settings.ckpt, "data": dataset, "root": settings.root, "linear": mode == "linear"}
            runs += _train_family_runs(f"{mode}-{dataset}", f"{mode}-{dataset}", "vision",
                                       ["finetune", "imagenet"], options, settings, missing)
    return runs


def family_plan(family: str, settings: SweepSettings) -> list[SweepRun]:
    """The runs of ``glue``, ``retrieval``, ``vision`` or ``all``."""
    builders = {"glue": glue_plan, "retrieval": retrieval_plan, "vision": vision_plan}
    if family == "all":
        return [r for f in FAMILIES for r in builders[f](settings)]
    if family not in builders:
        raise UnknownNameError(f"unknown sweep '{family}'{did_you_mean(family, (*FAMILIES, 'all'))}; "
                               f"choose one of: {', '.join((*FAMILIES, 'all'))}")
    return builders[family](settings)


# ---------------------------------------------------------------------- grids (``evlp sweep run SPEC.yaml``)
@dataclass
class GridSpec:
    """One block of a sweep spec: a command, the values every run shares and the grid over the rest.

    Grid keys are config keys (``optim.lr``) for training commands and options (``--split``) for any command;
    ``train.seed`` is the seed dimension: its runs are aggregated to mean and standard deviation.
    """

    name: str
    command: list[str]
    params: dict[str, Any]
    """The command's parsed options (``task``, ``ckpt``, ``data``, ``root``, ``config``, ``linear`` ...)."""
    argv: list[str]
    """The command's own arguments as written (for evaluations)."""
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order written (the last key varies fastest)."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def spec_plan(specs: list[GridSpec], settings: SweepSettings) -> list[SweepRun]:
    """The runs of a grid spec: each block's grid points (times ``settings.seeds`` for training commands)."""
    from evlp.config.commands import TRAINING_COMMANDS

    runs: list[SweepRun] = []
    for spec in specs:
        name = spec.command[-1] if spec.command[0] in ("pretrain", "finetune") else None
        training = name in TRAINING_COMMANDS
        for point in grid_points(spec.grid):
            options = {k: v for k, v in point.items() if k.startswith("--")}
            values = {k: v for k, v in point.items() if not k.startswith("--")}
            seed = values.pop("train.seed", None)
            shown = {**{k: v for k, v in point.items() if k != "train.seed"}}
            label = ",".join(f"{k}={_fmt(v)}" for k, v in shown.items())
            group = f"{spec.name}~{label}" if label else spec.name
            if training:
                params = {**spec.params}
                params.setdefault("ckpt", settings.ckpt)
                params.setdefault("root", settings.root)
                for k, v in options.items():
                    params[k.lstrip("-").replace("-", "_")] = v
                config = params.pop("config", None)
                overrides = [*spec.overrides, *(f"{k}={_fmt(v)}" for k, v in values.items())]
                seeds = [seed] if seed is not None else (
                    [None] if settings.seeds <= 1 else
                    [_recipe_seed(name, params, settings, config, overrides) + i for i in range(settings.seeds)])
                for s in seeds:
                    key = group if s is None or (seed is None and settings.seeds <= 1) else f"{group}~seed={s}"
                    run = training_run(key, spec.name, "run", spec.command, params, settings, ROWS_OF[name],
                                       config=config, overrides=overrides, seed=s, group=group, point=shown)
                    for row in run.rows:  # a grid's points are not the nine tasks of a GLUE score
                        row.glue = False
                    runs.append(run)
            else:
                if values or seed is not None:
                    raise ConfigError(f"sweep spec '{spec.name}': `evlp {' '.join(spec.command)}` takes no config "
                                      f"overrides ({', '.join(values) or 'train.seed'}); grid over its options "
                                      "(--split, --data ...) instead")
                argv = list(spec.argv)
                if settings.ckpt is not None and "--ckpt" not in argv:
                    argv += ["--ckpt", str(settings.ckpt)]
                for k, v in options.items():
                    argv += [k, str(v)] if not isinstance(v, bool) else ([k] if v else [])
                runs.append(eval_run(group, spec.name, "run", spec.command, argv,
                                     [eval_row(spec.command, argv)], group=group, point=shown))
    return runs


# ---------------------------------------------------------------------- selection
def select(runs: list[SweepRun], only: list[str], skip: list[str]) -> list[SweepRun]:
    """Keep the runs whose task, key or family matches a pattern of ``only`` (all when empty) and none of ``skip``.

    Raises:
        UnknownNameError: a pattern that matches no run (names the tasks there are).
    """
    tasks = sorted({r.task for r in runs})

    def hits(run: SweepRun, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for name in (run.task, run.key, run.family))

    for pattern in (*only, *skip):
        if not any(hits(r, pattern) for r in runs):
            raise UnknownNameError(f"'{pattern}' matches no task of this sweep{did_you_mean(pattern, tuple(tasks))}; "
                                   f"tasks: {', '.join(tasks)}")
    return [r for r in runs if (not only or any(hits(r, p) for p in only)) and not any(hits(r, p) for p in skip)]
