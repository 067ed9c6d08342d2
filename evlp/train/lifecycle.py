"""One run lifecycle for every training command (``evlp pretrain``, every ``evlp finetune``).

:func:`train` takes a resolved config and a task factory and does, in order: lock and check the run folder
(:func:`evlp.train.runs.open_run`), build the task, :func:`evlp.train.loop.fit` (which writes the run's
records once any resume has loaded), score the final checkpoint on the main process, write
``RUN/summary.json``, and return one :class:`TrainingResult` holding typed evaluation results::

    CLI -> config -> train(cfg, make_task, score=...) -> fit(task) -> task -> models/data/losses
                                      <- TrainingResult(run, [EvalResult ...]) <- rendered by type

The decisions every command shares live here or below it, once: which checkpoint is scored
(:func:`final_checkpoint`), where results go (:func:`evlp.checkpoint.eval_path`), which checkpoint a resume
continues from (:func:`evlp.train.runs.check_run_dir`), how ``train.global_batch_size`` splits over the launch
(:mod:`evlp.train.batching`), and the experiment tracker (:mod:`evlp.train.tracking`), which lives from the first
step to the final scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.checkpoint import CONFIG, write_json
from evlp.config.loader import dump_yaml, to_dict
from evlp.config.schema import TrainConfig
from evlp.dist import is_main_process
from evlp.eval.results import EvalResult
from evlp.train.batching import launched_world_size, per_process_train
from evlp.train.loop import RunResult, fit
from evlp.train.runs import RunStart, open_run
from evlp.train.task import Progress, Task
from evlp.train.tracking import Tracking, result_scalars

__all__ = ["TrainingResult", "checkpoint_config", "final_checkpoint", "train", "write_summary"]

SUMMARY = "summary.json"
BATCH_FIXED = ("train.global_batch_size",)
"""What no resume may change besides :data:`evlp.train.runs.ALWAYS_FIXED` (batch size, accumulation, seed)."""


@dataclass
class TrainingResult:
    """A training run and the scores of its final checkpoint.

    Attributes:
        run: what training did (steps, figures, validations, checkpoints).
        results: one typed :class:`~evlp.eval.results.EvalResult` per evaluated split, already written under
            ``RUN/eval/``; empty on processes other than the main one and for unfinished runs (``stop_after``).
    """

    run: RunResult
    results: list[EvalResult] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        """The run's own figures read through (``result.steps`` is ``result.run.steps``)."""
        if name.startswith("__") or name == "run":
            raise AttributeError(name)
        return getattr(self.run, name)

    @property
    def eval(self) -> EvalResult | None:
        """The first result (a pretraining run's own retrieval validation), or None."""
        return self.results[0] if self.results else None


def checkpoint_config(model: Any, finetune: Any, **sections: Any) -> str:
    """The ``config.yaml`` placed into each fine-tuning checkpoint: the pretrained model's config (``model``), the
    fine-tuning config (``finetune``) and any task-specific ``sections`` (e.g. the classifier's shape)."""
    return dump_yaml({"model": to_dict(model), "finetune": to_dict(finetune),
                      **{k: to_dict(v) for k, v in sections.items()}})


def final_checkpoint(run: RunResult) -> Path | None:
    """The checkpoint to score: the best by validation (``RUN/checkpoints/best``), else the last; None while the
    run is unfinished (stopped by ``stop_after``)."""
    if run.steps < run.total_steps:
        return None
    return run.best_checkpoint or run.checkpoint


def write_summary(result: TrainingResult) -> None:
    """Write ``RUN/summary.json``: the run's figures, its validations and each result (with where it is)."""
    run = result.run
    write_json(Path(run.run_dir) / SUMMARY, {
        "steps": run.steps, "total_steps": run.total_steps, "samples": run.samples, "seconds": run.seconds,
        "samples_per_s": run.samples_per_s, "world_size": run.world_size, "precision": run.precision,
        "peak_lr": run.peak_lr, "metrics": run.metrics, "best_metric": run.best_metric,
        "best_checkpoint": str(run.best_checkpoint) if run.best_checkpoint else None,
        "checkpoint": str(run.checkpoint) if run.checkpoint else None, "validations": run.validations,
        "skipped_samples": run.skipped_samples, "resumed_from": run.resumed_from, "notes": run.notes,
        "batch": run.batch,
        "eval": result.eval.to_json() if result.eval is not None else None,
        "results": [{"task": r.task, "dataset": r.dataset, "split": r.split, "metrics": r.metrics, "path": r.path}
                    for r in result.results],
    })


@contextmanager
def _launch_batch(cfg: Any, train: TrainConfig) -> Iterator[None]:
    """``cfg.train`` is ``train`` (this launch's micro-batch and accumulation) while the run lasts, since the tasks
    read their batch size from ``cfg.train``; the caller's config is given back unchanged."""
    given, cfg.train = cfg.train, train
    try:
        yield
    finally:
        cfg.train = given


def train(cfg: Any, make_task: Callable[[RunStart], Task], *, resume: bool = False, stop_after: int | None = None,
          progress: Progress | None = None, fixed: Iterable[str] = (),
          score: Callable[[Path], list[EvalResult]] | None = None) -> TrainingResult:
    """Run one training command's whole lifecycle in the run folder ``cfg.out``.

    Args:
        cfg: the resolved config (with ``out``, ``optim`` and ``train`` sections).
        make_task: builds the task once the folder is locked and checked (it receives the :class:`RunStart`,
            e.g. the checkpoint a resume continues from).
        resume: continue the run from its newest complete checkpoint.
        stop_after: end this invocation after that many optimizer steps (no scores then).
        progress: receives progress on the main process.
        fixed: config keys a resume may not change, besides those every run fixes.
        score: final checkpoint -> its written results; called once, on the main process, for a finished run.

    Raises:
        ConfigError: the folder conflicts with ``resume``, is in use, or a fixed setting changed;
            ``train.global_batch_size`` does not split over the launch; the tracker's package is missing.
        TrainingDivergedError, RunInterrupted, CheckpointError: see :func:`evlp.train.loop.fit`.
    """
    launch_train = per_process_train(cfg.train, launched_world_size())  # refused here, before the folder is used
    tracking = Tracking.from_config(cfg)
    try:
        with open_run(cfg, resume=resume, fixed=(*BATCH_FIXED, *fixed)) as start, _launch_batch(cfg, launch_train):
            task = make_task(start)
            run = fit(task, cfg.optim, cfg.train, cfg.out, resume_from=start.resume_from, stop_after=stop_after,
                      files={CONFIG: task.checkpoint_config() or start.config_text}, records=start.records,
                      progress=progress, tracking=tracking)
            result = TrainingResult(run=run)
            if is_main_process():
                ckpt = final_checkpoint(run)
                if ckpt is not None and score is not None:
                    result.results = score(ckpt)
                    if tracking is not None:
                        tracking.log(result_scalars(result.results), run.steps)
                write_summary(result)
            return result
    finally:
        if tracking is not None:
            tracking.finish()
