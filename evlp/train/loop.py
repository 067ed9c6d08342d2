"""The one training loop: accelerate for devices, DDP and precision; any :class:`~evlp.train.task.Task`.

Why this module is long: the loop's named steps (setup, resume, one optimisation step, logging, validation,
checkpointing, stopping) share one run state (``_Run``) and read best together; what they delegate already lives
beside it (batch split, state on disk, guards, tracking, optimizer).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evlp.checkpoint import CKPT_DIR, append_jsonl, best_checkpoint, checkpoint_name, mark_best, step_of
from evlp.config.loader import write_atomic
from evlp.config.schema import OptimConfig, TrainConfig
from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.models import place_module
from evlp.train.batching import batch_plan, launched_world_size, per_process_train
from evlp.train.grad_cache import check_grad_cache, grad_cache_step
from evlp.train.guard import (
    STOP_SIGNALS,
    Control,
    NonFinite,
    RunInterrupted,
    StopSignals,
    TrainingDivergedError,
    weights_finite,
)
from evlp.train.optim import build_optimizer, build_scheduler, peak_lr, warmup_steps
from evlp.train.state import Checkpointer, changes, schedule_record, set_schedule_position, trim_metrics
from evlp.train.strategy import build_accelerator, full_weights, prepare, sharding_note
from evlp.train.task import Progress, Task
from evlp.train.tracking import Tracking

__all__ = ["RunInterrupted", "RunResult", "TrainingDivergedError", "fit", "resolve_precision"]

METRICS = "metrics.jsonl"


@dataclass
class RunResult:
    """What a training run did."""

    run_dir: Path
    checkpoint: Path | None
    steps: int
    total_steps: int
    samples: int
    seconds: float
    samples_per_s: float
    world_size: int
    precision: str
    peak_lr: float
    metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    """The task's monitored validation metric at its best (tasks that validate)."""
    best_checkpoint: Path | None = None
    validations: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    skipped_samples: int = 0
    eval: Any = None
    """An :class:`~evlp.eval.results.EvalResult` when the run evaluated itself."""
    notes: list[str] = field(default_factory=list)
    """What the run reported besides figures (e.g. the settings a resume changed and how they apply)."""
    batch: dict[str, int] = field(default_factory=dict)
    """The batch split of this launch: world_size, micro_batch, grad_accum, global_batch."""


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on CUDA GPUs that support it, else ``no``.

    Raises:
        ConfigError: fp16 without a CUDA device.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use train.precision=bf16 or no on CPU")
    return precision


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on ``device`` (other values unchanged)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def fit(
    task: Task,
    optim: OptimConfig,
    train: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume_from: Path | None = None,
    stop_after: int | None = None,
    files: dict[str, str] | None = None,
    records: dict[str, str] | None = None,
    progress: Progress | None = None,
    tracking: Tracking | None = None,
) -> RunResult:
    """Train ``task`` and write checkpoints and ``metrics.jsonl`` into ``run_dir``.

    Args:
        task: the objective.
        optim: optimizer and schedule settings.
        train: batch, length, precision, logging and checkpoint settings.
        run_dir: the run folder.
        resume_from: continue from this checkpoint (model, optimizer, RNG, task state and data position); the
            LR schedule and optimizer settings are this call's, continued from the checkpoint's step.
        stop_after: end this invocation once this many optimizer steps are done (with a checkpoint), keeping
            the schedule of the whole run, e.g. to fit a cluster time limit; continue later with a resume.
        files: text files to place into every checkpoint (e.g. ``config.yaml``).
        records: text files written into ``run_dir`` once setup and any resume succeeded (``config.yaml``,
            ``env.json``), so a failed resume leaves the folder as it was.
        progress: receives progress on the main process.
        tracking: the experiment tracker to start (main process) and log every record into; the caller
            finishes it.

    Raises:
        ConfigError: ``train.global_batch_size`` does not split over this launch's processes.
        TrainingDivergedError: the loss or the weights became NaN/inf (no checkpoint of them is written).
        RunInterrupted: SIGTERM/SIGINT/SIGUSR1 ended the run after a checkpoint.
        CheckpointError: a checkpoint could not be written (full disk) or loaded.
    """
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    precision = resolve_precision(train.precision)
    launched = launched_world_size()
    train = per_process_train(train, launched)  # the micro-batch and accumulation of this launch
    accelerator = build_accelerator(train, precision, find_unused_parameters=task.find_unused_parameters)
    dist = DistInfo(rank=accelerator.process_index, world_size=accelerator.num_processes,
                    local_rank=accelerator.local_process_index)
    if launched != dist.world_size:
        raise ConfigError(f"the launcher started {launched} processes but accelerate set up {dist.world_size}; "
                          "check `accelerate config` / the launch flags (--multi_gpu, --num_processes)")
    control = Control(dist.world_size)
    try:
        with StopSignals() as signals:
            return _Run(task, optim, train, run_dir, accelerator, dist, control, signals, progress, tracking).run(
                resume_from, stop_after, files or {}, records or {}, set_seed)
    finally:
        control.close()
        accelerator.end_training()


class _DataStopped(Exception):
    """The data stream ended because a stop signal reached its workers."""


class _Run:
    """One invocation of :func:`fit`, in named steps: setup, resume, one optimisation step, logging,
    validation, checkpointing, stopping."""

    def __init__(self, task: Task, optim: OptimConfig, train: TrainConfig, run_dir: Path, accelerator: Any,
                 dist: DistInfo, control: Control, signals: StopSignals, progress: Progress | None,
                 tracking: Tracking | None = None) -> None:
        self.task, self.optim, self.train, self.run_dir = task, optim, train, run_dir
        self.tracking = tracking if accelerator.is_main_process else None
        self.acc, self.dist, self.control, self.signals = accelerator, dist, control, signals
        self.progress = progress if accelerator.is_main_process else None
        self.step = self.samples = 0
        self.elapsed = 0.0
        self.best: float | None = None
        self.validations: list[dict[str, float]] = []
        self.last_metrics: dict[str, float] = {}
        self.notes: list[str] = []

    # ------------------------------------------------------------------ setup
    def _setup(self, set_seed: Any) -> None:
        task, train, optim, dist = self.task, self.train, self.optim, self.dist
        torch.set_float32_matmul_precision(train.matmul_precision)
        set_seed(train.seed)  # identical initialisation on every rank (teacher included)
        module = task.build_module()
        task.to(self.acc.device)
        self.plan = batch_plan(train, dist.world_size)  # train holds this launch's micro-batch and accumulation
        check_grad_cache(task, train.grad_cache, self.plan.micro_batch)
        self.global_batch = self.plan.global_batch
        self.notes += [self.plan.describe()] if self.plan.derived else []
        self.steps_per_epoch = max(1, task.samples_per_epoch() // self.global_batch)
        self.total = train.max_steps or train.epochs * self.steps_per_epoch
        self.lr = peak_lr(optim, self.global_batch)
        place_module(module, self.acc.device, grad_checkpointing=train.grad_checkpointing,
                     compile_backend=train.compile_backend if train.compile else None)
        optimizer = build_optimizer(module, optim, self.lr, groups=task.param_groups(module, optim),
                                    device=self.acc.device)
        self.scheduler = build_scheduler(optimizer, optim, self.total)
        self.fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.module, self.optimizer = prepare(self.acc, module, optimizer)  # DDP or FSDP (train.strategy)
        self.notes += sharding_note(self.acc, train, self.module)
        self.ckpt = Checkpointer(self.acc, task, self.run_dir, self.control, self.scheduler,
                                 train.keep_checkpoints, self.files)
        self.nonfinite = NonFinite(self.acc.device)
        self.monitor = task.monitor
        self.maximize = task.monitor_mode == "max"
        self.validates = task.monitor is not None
        self.eval_every = train.eval_every or self.steps_per_epoch
        # saved with, and compared to, checkpoints
        self.settings = {**schedule_record(optim, train, self.total, self.lr), "batch": self.plan.as_record()}

    def _resume(self, ckpt: Path) -> dict | None:
        state = self.ckpt.load(ckpt)
        self.step, self.samples, self.elapsed = state["step"], state["samples"], state.get("seconds", 0.0)
        self.best = state.get("best_metric")
        lrs = set_schedule_position(self.optimizer, self.scheduler, self.fresh_groups, self.step)
        saved = state.get("settings")
        changed = changes(saved, self.settings) if saved else []
        if changed:
            self.notes.append(f"resumed at step {self.step} with changed settings: {'; '.join(changed)}; they "
                              f"take effect from step {self.step + 1} (learning rate now {lrs[0]:.4g}, "
                              f"{self.total} steps in all)")
        return state["data_state"]

    def _write_records(self, records: dict[str, str], resumed: bool) -> None:
        if not self.acc.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in records.items():
            write_atomic(self.run_dir / name, text)
        if resumed:
            trim_metrics(self.run_dir / METRICS, self.step)
        else:
            (self.run_dir / METRICS).unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "total_steps": self.total,
                "epoch": self.step / self.steps_per_epoch, "seconds": self.elapsed + time.perf_counter() - self.t0,
                "world_size": self.dist.world_size, "global_batch": self.global_batch,
                "metrics": self.last_metrics, "best_metric": self.best, "monitor": self.monitor,
                "settings": self.settings}

    def _check_finite(self, weights: bool) -> None:
        """Stop with :class:`TrainingDivergedError` if any rank saw a non-finite loss (or, with ``weights``,
        holds a non-finite parameter)."""
        first = self.nonfinite.first_step()
        bad_weights = weights and not weights_finite(self.module)
        big = 1 << 62
        any_bad, earliest, weights_bad = self.control.max(first >= 0, big - first if first >= 0 else 0, bad_weights)
        if not (any_bad or weights_bad):
            return
        at = f"at step {big - earliest}" if any_bad else f"by step {self.step}"
        what = "the loss became non-finite (NaN or inf)" if any_bad else "the weights became non-finite"
        good = self.ckpt.last
        lower = f"{self.optim.lr / 4:.3g}"
        where = (f"the last good checkpoint is {good} (step {step_of(good)}); continue from it with a lower learning "
                 f"rate: the same command with --resume optim.lr={lower}" if good is not None else
                 f"no checkpoint was written before; start again with a lower learning rate (optim.lr={lower}) "
                 "or optim.grad_clip=1.0")
        raise TrainingDivergedError(f"{what} {at}; nothing after it is saved; {where}")

    def _save(self) -> Path:
        self._check_finite(weights=True)
        return self.ckpt.save(self.step, self._state(), self.module)

    def _saved_now(self) -> bool:
        """Whether the newest checkpoint (the one written or resumed from) is of the current step."""
        return self.ckpt.last is not None and step_of(self.ckpt.last) == self.step

    # ------------------------------------------------------------------ one step
    def _optimisation_step(self, batches: Any) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        acc, module = self.acc, self.module
        try:
            batch = to_device(next(batches), acc.device)
        except StopIteration:  # a finite stream's end is no worker's death: nothing to wait for
            raise
        except Exception:
            # a stop signal that also reached the DataLoader's workers (a scheduler signalling every process)
            # can end them while we wait for a batch: one process stops at its last completed step (the error can
            # come before the signal of the worker's death: worker_stop waits a moment for it)
            if self.dist.world_size == 1 and self.signals.worker_stop():
                raise _DataStopped from None
            raise
        batch = self.task.on_device(batch)
        self.task.before_step(acc.unwrap_model(module), self.step, self.total)
        with acc.accumulate(module):
            if self.train.grad_cache > 1:  # the contrastive loss of the whole batch, chunk by chunk
                # inside an accumulation step the accumulate context already skips the synchronisation
                inner = (lambda: acc.no_sync(module)) if acc.sync_gradients else contextlib.nullcontext
                loss, metrics = grad_cache_step(self.task, module, batch, self.dist, chunks=self.train.grad_cache,
                                                backward=acc.backward, autocast=acc.autocast, no_sync=inner)
            else:
                with acc.autocast():
                    loss, metrics = self.task.training_step(module, batch, self.dist)
                acc.backward(loss)
            if acc.sync_gradients and self.optim.grad_clip > 0:
                acc.clip_grad_norm_(module.parameters(), self.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite.observe(loss, self.step + 1)
        self.window["loss"].append(loss.detach())
        for k, v in metrics.items():
            self.window[k].append(v.detach())
        if not acc.sync_gradients:
            return False
        self.lr_used = self.optimizer.param_groups[0]["lr"]  # the LR the step just taken used
        self.scheduler.step()
        self.task.after_optimizer_step(acc.unwrap_model(module))
        self.step += 1
        self.samples += self.global_batch
        self.window_samples += self.global_batch
        return True

    def _record(self, record: dict[str, Any]) -> None:
        """A line of ``metrics.jsonl`` and the same figures to the tracker, at the record's step (main process)."""
        append_jsonl(self.run_dir / METRICS, record)
        if self.tracking is not None:
            self.tracking.log(record, record["step"])

    def _log(self) -> None:
        self._check_finite(weights=False)
        names = sorted(self.window)
        means = torch.stack([torch.stack(self.window[k]).float().mean() for k in names])
        means = self.acc.reduce(means, reduction="mean")
        now = time.perf_counter()
        self.last_metrics = {k: float(v) for k, v in zip(names, means.tolist())}
        self.last_metrics.update(lr=self.lr_used, samples_per_s=self.window_samples / max(now - self.t_window, 1e-9))
        self.window.clear()
        self.t_window, self.window_samples = now, 0
        if self.acc.is_main_process:
            self._record({"step": self.step, "epoch": self.step / self.steps_per_epoch, "samples": self.samples,
                          **self.last_metrics, "time": self.elapsed + now - self.t0})
            if self.progress is not None:
                self.progress.update(self.step, self.last_metrics)

    def _validate(self) -> None:
        self.module.eval()
        with full_weights(self.acc, self.module):  # FSDP: gathered once for the whole evaluation
            val = {k: float(v) for k, v in self.task.evaluate(self.acc.unwrap_model(self.module), self.dist).items()}
        self.module.train()
        self.validations.append({"step": self.step, **val})
        improved = self.monitor is not None and self.monitor in val and (
            self.best is None or (val[self.monitor] > self.best if self.maximize else val[self.monitor] < self.best))
        if improved:
            self.best = val[self.monitor]
        if self.acc.is_main_process:
            self._record({"step": self.step, **{f"val/{k}": v for k, v in val.items()}})
            if self.progress is not None:
                shown = " · ".join(f"{k} {v:.4g}" for k, v in val.items())
                self.progress.message(f"step {self.step} validation: {shown}" + (" (best)" if improved else ""))
        if improved:
            saved = self._save()
            if self.acc.is_main_process:
                mark_best(self.run_dir, saved.name)
            self.acc.wait_for_everyone()

    def _stop_if_signalled(self) -> None:
        code = self.control.max(self.signals.code)[0]
        if not code:
            return
        name = StopSignals.name_of(code)
        if not self._saved_now():
            self._save()
        ckpt = self.run_dir / CKPT_DIR / checkpoint_name(self.step)
        raise RunInterrupted(f"stopped by {name}: checkpoint at step {self.step} ({ckpt}); continue with --resume",
                             STOP_SIGNALS[name])

    # ------------------------------------------------------------------ the loop
    def run(self, resume_from: Path | None, stop_after: int | None, files: dict[str, str],
            records: dict[str, str], set_seed: Any) -> RunResult:
        self.files = files
        self._setup(set_seed)
        data_state = self._resume(resume_from) if resume_from is not None else None
        if resume_from is None:
            set_seed(self.train.seed + self.dist.rank)  # augmentation and dropout differ per rank
        self._write_records(records, resumed=resume_from is not None)
        resumed_from = self.step if resume_from is not None else None
        if self.tracking is not None:
            self.tracking.start(resumed_from, {f"batch.{k}": v for k, v in self.plan.as_record().items()})
        stop = min(self.total, stop_after) if stop_after else self.total
        if self.progress is not None:
            self.progress.message(
                f"world size {self.dist.world_size} · {self.acc.device.type} · precision {self.acc.mixed_precision} · "
                f"global batch {self.global_batch} · peak lr {self.lr:.3g} · "
                f"warmup {warmup_steps(self.optim, self.total)} · {self.steps_per_epoch} steps/epoch · "
                f"{self.total} steps" + (f" · resumed at step {self.step}" if resumed_from is not None else ""))
            for note in self.notes:
                self.progress.message(note)
            self.progress.start(self.total, self.step, self.task.name)
        try:
            self._loop(data_state, stop)
        finally:
            if self.progress is not None:
                self.progress.stop()
        seconds = time.perf_counter() - self.t0
        trained = self.step - (resumed_from or 0)
        return RunResult(
            run_dir=self.run_dir, checkpoint=self.ckpt.last,
            steps=self.step, total_steps=self.total, samples=self.samples, seconds=self.elapsed + seconds,
            samples_per_s=trained * self.global_batch / max(seconds, 1e-9), world_size=self.dist.world_size,
            precision=self.acc.mixed_precision, peak_lr=self.lr, metrics=self.last_metrics, best_metric=self.best,
            best_checkpoint=best_checkpoint(self.run_dir), validations=self.validations, resumed_from=resumed_from,
            skipped_samples=self.task.skipped_samples, notes=self.notes, batch=self.plan.as_record())

    def _loop(self, data_state: dict | None, stop: int) -> None:
        batches = iter(self.task.train_batches(self.dist, data_state))
        self.module.train()
        self.window: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.t0 = self.t_window = time.perf_counter()
        self.window_samples = 0
        try:
            self._steps(batches, stop)
        finally:
            if isinstance(batches, Generator):
                batches.close()  # ends the data stream's worker processes now, inside the signal handling

    def _steps(self, batches: Any, stop: int) -> None:
        train = self.train
        while self.step < stop:
            try:
                if not self._optimisation_step(batches):
                    continue
            except _DataStopped:
                self._stop_if_signalled()
            step = self.step
            if step % train.log_every == 0 or step == stop or step == 1:
                self._log()
            elif self.progress is not None:
                self.progress.update(step, {})
            if self.validates and (step % self.eval_every == 0 or step == self.total):
                self._validate()
            if (step % train.ckpt_every == 0 or step == stop) and not self._saved_now():
                self._save()
            self._stop_if_signalled()
