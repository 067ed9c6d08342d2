"""A training run's state on disk: atomic, verified checkpoints written by every rank, loading them back, the
schedule's position after a resume, and ``metrics.jsonl`` trimmed to a checkpoint.

Used by :func:`evlp.train.loop.fit` only; the on-disk layout is documented in :mod:`evlp.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from evlp.checkpoint import (
    CKPT_DIR,
    SHARDED_WEIGHTS,
    TRAINER_STATE,
    checkpoint_name,
    file_manifest,
    mark_latest,
    prune_checkpoints,
    read_json,
    write_json,
)
from evlp.config.loader import differences, lookup, write_atomic
from evlp.config.schema import OptimConfig, TrainConfig
from evlp.errors import CheckpointError, ConfigError
from evlp.train.guard import Control, write_failure
from evlp.train.strategy import is_sharded
from evlp.train.task import Task

SCHEDULER_STATE = "scheduler.pt"
TASK_STATE = "task_state.safetensors"


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after ``last_step`` (they will be logged again after a resume), and lines cut by
    a crash (with a warning)."""
    if not path.is_file():
        return
    keep, cut = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            cut += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            keep.append(line)
    if cut:
        warnings.warn(f"{path}: dropped {cut} cut line(s) left by an interrupted run", stacklevel=3)
    write_atomic(path, "".join(line + "\n" for line in keep))


def schedule_record(optim: OptimConfig, train: TrainConfig, total: int, lr: float) -> dict[str, Any]:
    """The settings a resume may change, as saved in each checkpoint to report what a resume changes."""
    record = {"optim": dataclasses.asdict(optim), "total_steps": total, "peak_lr": lr,
              "train": {k: getattr(train, k) for k in ("epochs", "max_steps", "log_every", "ckpt_every",
                                                       "keep_checkpoints", "eval_every", "precision", "strategy",
                                                       "fsdp_sharding")}}
    return json.loads(json.dumps(record))  # tuples as lists, as they come back from the checkpoint


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key old -> new"`` for every setting of ``now`` that differs from ``saved`` (keys ``saved`` lacks are
    passed over)."""
    return [f"{k} {lookup(saved, k)} -> {lookup(now, k)}" for k in differences(saved, now, common_only=True)]


class Checkpointer:
    """Writes checkpoints atomically: every rank writes into ``step_N.tmp``, then rank 0 records every file's
    size and sha256 in ``trainer_state.json`` (written last) and renames the folder into place. A checkpoint of
    non-finite weights is never written; a failed write (a full disk) removes the partial folder on every rank
    and leaves the previous checkpoint as ``latest``.

    Under FSDP (``train.strategy=fsdp``) accelerate writes the model and optimizer as sharded state, each rank its
    own shards, into the same temporary folder; the record, the rename and the checks are the same."""

    def __init__(self, accelerator: Any, task: Task, run_dir: Path, control: Control, scheduler: Any, keep: int,
                 files: dict[str, str]) -> None:
        self.acc, self.task, self.run_dir, self.control, self.keep = accelerator, task, run_dir, control, keep
        self.scheduler = scheduler
        self.last: Path | None = None  # the newest complete checkpoint: the one loaded, then each one written
        self.files = files  # extra text files (name -> content) copied into every checkpoint

    def _write_own_part(self, tmp: Path) -> None:
        self.acc.save_state(str(tmp), safe_serialization=True)
        write_json(tmp / f"data_state_rank{self.acc.process_index}.json", self.task.data_state())

    def _complete(self, tmp: Path, final: Path, state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        # the schedule's position, for the record: a resume rebuilds the schedule from its own config
        torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_STATE)
        task_state = {k: v.detach().contiguous().cpu() for k, v in self.task.state_dict().items()}
        if task_state:
            save_file(task_state, str(tmp / TASK_STATE))
        for name, text in self.files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        self.task.save_artifacts(tmp)
        write_json(tmp / TRAINER_STATE, {**state, "files": file_manifest(tmp)})  # last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        mark_latest(self.run_dir, final.name)
        prune_checkpoints(self.run_dir, self.keep)

    def _needed(self, previous: Path | None, module: Any) -> int:
        """Bytes a checkpoint takes: the previous one's recorded file sizes, else weights + two AdamW moments."""
        files = (read_json(previous / TRAINER_STATE, {}) or {}).get("files") if previous is not None else None
        if files:
            return sum(int(f["size"]) for f in files.values())
        return 3 * sum(p.numel() * p.element_size() for p in module.parameters())

    def save(self, step: int, state: dict[str, Any], module: Any) -> Path:
        acc = self.acc
        final = self.run_dir / CKPT_DIR / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        previous = self.last
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        error: BaseException | None = None
        try:
            self._write_own_part(tmp)
        except Exception as exc:  # noqa: BLE001 - reported below, after every rank knows
            error = exc
        failed = self.control.max(error is not None)[0]
        if not failed and acc.is_main_process:
            try:
                self._complete(tmp, final, state)
            except Exception as exc:  # noqa: BLE001
                error = exc
        failed = self.control.max(error is not None)[0]
        if failed:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                raise write_failure(error, tmp, step, self._needed(previous, module), previous) from error
            raise write_failure(error, tmp, step, 0, None) from error
        acc.wait_for_everyone()
        self.last = final
        return final

    def _check_layout(self, ckpt: Path) -> None:
        """A checkpoint resumes only into a run that holds the model the same way (sharded or not); a changed
        ``train.strategy`` is refused before anything is loaded."""
        sharded = (ckpt / SHARDED_WEIGHTS).is_dir()
        if sharded == is_sharded(self.acc):
            return
        if sharded:
            raise ConfigError(f"checkpoint {ckpt} is sharded (written with train.strategy=fsdp on several "
                              "processes) and this run is not; resume it with train.strategy=fsdp on several "
                              "processes")
        raise ConfigError(f"checkpoint {ckpt} is not sharded (written with train.strategy=ddp or by one process) and "
                          "this run shards the model; resume it with train.strategy=ddp")

    def load(self, ckpt: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        self._check_layout(ckpt)
        try:
            self.acc.load_state(str(ckpt))
            if (ckpt / TASK_STATE).is_file():
                self.task.load_state_dict(load_file(str(ckpt / TASK_STATE)))
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load checkpoint {ckpt} into this run ({first}); resume with the run's "
                                  "own settings") from exc
        self.last = ckpt
        state = read_json(ckpt / TRAINER_STATE)
        state["data_state"] = read_json(ckpt / f"data_state_rank{self.acc.process_index}.json")
        return state


def set_schedule_position(optimizer: Any, scheduler: Any, groups: list[dict[str, Any]], step: int) -> list[float]:
    """After a resume: the optimizer's hyper-parameters from this run's config (``groups``, the fresh groups
    without params) and the LR of the schedule at ``step``, so changed settings take effect from here."""
    for group, fresh in zip(optimizer.param_groups, groups):
        group.update(fresh)
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, as after `step` scheduler steps
    return lrs
