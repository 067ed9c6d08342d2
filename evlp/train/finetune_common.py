"""What every fine-tuning entry point shares: the result object, the run folder's records (``config.yaml``,
``env.json``, ``summary.json``), resume checks, and scoring the best checkpoint once training is done.

A fine-tuning entry point reads like::

    with open_run(cfg, resume=resume, fixed=("task",)) as start:   # lock, checks; nothing written yet
        run = fit(task, cfg.optim, cfg.train, cfg.out, resume_from=start.resume_from,
                  files={CONFIG: task.checkpoint_config()}, records=start.records)
        return finish_run(run, lambda ckpt: [...EvalResults of ckpt...])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.checkpoint import write_json
from evlp.config.loader import dump_yaml, to_dict
from evlp.eval.results import EvalResult
from evlp.train.loop import RunResult
from evlp.train.runs import is_main_process, open_run

__all__ = ["FinetuneResult", "checkpoint_config", "eval_path", "final_checkpoint", "finish_run", "is_main_process",
           "open_run", "write_summary"]

SUMMARY = "summary.json"
EVAL_DIR = "eval"


@dataclass
class FinetuneResult:
    """A fine-tuning run and the scores of its best checkpoint.

    Attributes:
        run: what training did (steps, best validation metric, checkpoints).
        results: one :class:`EvalResult` per evaluated split, already written under ``RUN/eval/``; empty on
            processes other than the main one and for runs stopped early (``stop_after``).
    """

    run: RunResult
    results: list[EvalResult] = field(default_factory=list)


def checkpoint_config(model: Any, finetune: Any, **sections: Any) -> str:
    """The ``config.yaml`` placed into each fine-tuning checkpoint: the pretrained model's config (``model``), the
    fine-tuning config (``finetune``) and any task-specific ``sections`` (e.g. the classifier's shape)."""
    return dump_yaml({"model": to_dict(model), "finetune": to_dict(finetune),
                      **{k: to_dict(v) for k, v in sections.items()}})


def final_checkpoint(run: RunResult) -> Path | None:
    """The checkpoint to report: the best by validation (``RUN/checkpoints/best``), else the last; None while the
    run is unfinished (stopped by ``stop_after``)."""
    if run.steps < run.total_steps:
        return None
    return run.best_checkpoint or run.checkpoint


def eval_path(run_dir: str | os.PathLike[str], task: str, dataset: str, split: str) -> Path:
    """Where a fine-tuning run writes one split's result: ``RUN/eval/<task>_<dataset>_<split>.json``."""
    return Path(run_dir) / EVAL_DIR / f"{task}_{dataset}_{split}.json"


def write_summary(result: FinetuneResult) -> None:
    """Write ``RUN/summary.json``: the run's figures, its validations and where each result JSON is."""
    run = result.run
    write_json(Path(run.run_dir) / SUMMARY, {
        "steps": run.steps, "total_steps": run.total_steps, "samples": run.samples, "seconds": run.seconds,
        "samples_per_s": run.samples_per_s, "world_size": run.world_size, "precision": run.precision,
        "peak_lr": run.peak_lr, "metrics": run.metrics, "best_metric": run.best_metric,
        "best_checkpoint": str(run.best_checkpoint) if run.best_checkpoint else None,
        "checkpoint": str(run.checkpoint) if run.checkpoint else None, "validations": run.validations,
        "resumed_from": run.resumed_from, "notes": run.notes,
        "results": [{"dataset": r.dataset, "split": r.split, "metrics": r.metrics, "path": r.path}
                    for r in result.results],
    })


def finish_run(run: RunResult, score: Callable[[Path], list[EvalResult]]) -> FinetuneResult:
    """Score the final checkpoint (:func:`final_checkpoint`) with ``score`` on the main process and write
    ``RUN/summary.json``; other processes return the run alone.

    Args:
        run: what :func:`evlp.train.loop.fit` returned.
        score: checkpoint folder -> its written results (called once, only for a finished run).
    """
    result = FinetuneResult(run=run)
    if not is_main_process():
        return result
    ckpt = final_checkpoint(run)
    if ckpt is not None:
        result.results = score(ckpt)
    write_summary(result)
    return result
