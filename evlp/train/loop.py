"""The one training loop: accelerate for devices, DDP and precision; any :class:`~evlp.train.task.Task`."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evlp.checkpoint import (
    CKPT_DIR,
    TRAINER_STATE,
    append_jsonl,
    best_checkpoint,
    checkpoint_name,
    latest_checkpoint,
    mark_best,
    mark_latest,
    prune_checkpoints,
    read_json,
    write_json,
)
from evlp.config.schema import OptimConfig, TrainConfig
from evlp.dist import DistInfo
from evlp.errors import CheckpointError, ConfigError, EvlpError
from evlp.train.optim import build_optimizer, build_scheduler, peak_lr, warmup_steps
from evlp.train.task import Progress, Task

SCHEDULER_STATE = "scheduler.pt"
TASK_STATE = "task_state.safetensors"
METRICS = "metrics.jsonl"


class TrainingDivergedError(EvlpError):
    """The loss became NaN or infinite."""


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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after ``last_step`` (they will be logged again after a resume)."""
    import json

    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    from evlp.config.loader import write_atomic

    write_atomic(path, "".join(line + "\n" for line in keep))


class _Checkpointer:
    """Writes checkpoints atomically: every rank writes into ``step_N.tmp``, then rank 0 renames it."""

    def __init__(self, accelerator: Any, task: Task, run_dir: Path, scheduler: Any, keep: int,
                 files: dict[str, str]) -> None:
        self.acc, self.task, self.run_dir, self.scheduler, self.keep = accelerator, task, run_dir, scheduler, keep
        self.files = files  # extra text files (name -> content) copied into every checkpoint

    def save(self, step: int, state: dict[str, Any]) -> Path:
        from safetensors.torch import save_file

        acc = self.acc
        final = self.run_dir / CKPT_DIR / checkpoint_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        write_json(tmp / f"data_state_rank{acc.process_index}.json", self.task.data_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_STATE)
            task_state = {k: v.detach().contiguous().cpu() for k, v in self.task.state_dict().items()}
            if task_state:
                save_file(task_state, str(tmp / TASK_STATE))
            for name, text in self.files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            self.task.save_artifacts(tmp)
            write_json(tmp / TRAINER_STATE, state)  # written last: its presence marks a complete folder
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            mark_latest(self.run_dir, final.name)
            prune_checkpoints(self.run_dir, self.keep)
        acc.wait_for_everyone()
        return final

    def load(self, ckpt: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        self.acc.load_state(str(ckpt))
        self.scheduler.load_state_dict(torch.load(ckpt / SCHEDULER_STATE, weights_only=True))
        if (ckpt / TASK_STATE).is_file():
            self.task.load_state_dict(load_file(str(ckpt / TASK_STATE)))
        state = read_json(ckpt / TRAINER_STATE)
        state["data_state"] = read_json(ckpt / f"data_state_rank{self.acc.process_index}.json")
        return state


def fit(
    task: Task,
    optim: OptimConfig,
    train: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    stop_after: int | None = None,
    files: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Train ``task`` and write checkpoints and ``metrics.jsonl`` into ``run_dir``.

    Args:
        task: the objective.
        optim: optimizer and schedule settings.
        train: batch, length, precision, logging and checkpoint settings.
        run_dir: the run folder.
        resume: continue from the run's latest checkpoint (model, optimizer, scheduler, RNG, task state
            and data position).
        stop_after: end this invocation once this many optimizer steps are done (with a checkpoint), keeping
            the schedule of the whole run, e.g. to fit a cluster time limit; continue later with ``resume``.
        files: text files to place into every checkpoint (e.g. ``config.yaml``).
        progress: receives progress on the main process.

    Raises:
        CheckpointError: ``resume`` without a checkpoint to resume from.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    precision = resolve_precision(train.precision)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets accelerate set up multi-process CPU (gloo) runs
        mixed_precision=precision,
        gradient_accumulation_steps=train.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=getattr(task, "find_unused_parameters", False), gradient_as_bucket_view=True)],
    )
    dist = DistInfo(rank=accelerator.process_index, world_size=accelerator.num_processes,
                    local_rank=accelerator.local_process_index)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != dist.world_size:
        raise ConfigError(f"the launcher started {launched} processes but accelerate set up {dist.world_size}; "
                          "check `accelerate config` / the launch flags (--multi_gpu, --num_processes)")
    torch.set_float32_matmul_precision(train.matmul_precision)
    set_seed(train.seed)  # identical initialisation on every rank (teacher included)
    module = task.build_module()
    task.to(accelerator.device)

    global_batch = train.batch_size * dist.world_size * train.grad_accum
    steps_per_epoch = max(1, task.samples_per_epoch() // global_batch)
    total = train.max_steps or train.epochs * steps_per_epoch
    lr = peak_lr(optim, global_batch)
    groups = task.param_groups(module, optim) if callable(getattr(task, "param_groups", None)) else None
    optimizer = build_optimizer(module, optim, lr, groups=groups)
    scheduler = build_scheduler(optimizer, optim, total)
    module, optimizer = accelerator.prepare(module, optimizer)
    ckpt = _Checkpointer(accelerator, task, run_dir, scheduler, train.keep_checkpoints, files or {})

    step, samples, elapsed, data_state, resumed_from = 0, 0, 0.0, None, None
    best: float | None = None
    validations: list[dict[str, float]] = []
    monitor = getattr(task, "monitor", None)
    maximize = getattr(task, "monitor_mode", "max") == "max"
    validates = callable(getattr(task, "evaluate", None))
    eval_every = train.eval_every or steps_per_epoch
    if resume:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise CheckpointError(f"nothing to resume in {run_dir}: it has no complete checkpoint; "
                                  "start it without --resume")
        state = ckpt.load(latest)
        step, samples, elapsed = state["step"], state["samples"], state.get("seconds", 0.0)
        data_state, resumed_from, best = state["data_state"], step, state.get("best_metric")
    else:
        set_seed(train.seed + dist.rank)  # augmentation and dropout differ per rank
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _trim_metrics(run_dir / METRICS, step)
        else:
            (run_dir / METRICS).unlink(missing_ok=True)

    if progress is not None and accelerator.is_main_process:
        progress.message(
            f"world size {dist.world_size} · {accelerator.device.type} · precision {precision} · "
            f"global batch {global_batch} · peak lr {lr:.3g} · warmup {warmup_steps(optim, total)} · "
            f"{steps_per_epoch} steps/epoch · {total} steps" + (f" · resumed at step {step}" if resume else ""))
        progress.start(total, step, task.name)

    batches = iter(task.train_batches(dist, data_state))
    module.train()
    window: dict[str, list[torch.Tensor]] = defaultdict(list)
    last_metrics: dict[str, float] = {}
    t_start, t_window, window_samples = time.perf_counter(), time.perf_counter(), 0
    last_saved = step if resume else -1
    def trainer_state() -> dict[str, Any]:  # reads the loop's current values
        return {"step": step, "samples": samples, "total_steps": total, "epoch": step / steps_per_epoch,
                "seconds": elapsed + time.perf_counter() - t_start, "world_size": dist.world_size,
                "global_batch": global_batch, "metrics": last_metrics, "best_metric": best, "monitor": monitor}

    stop = min(total, stop_after) if stop_after else total
    while step < stop:
        batch = _to_device(next(batches), accelerator.device)
        with accelerator.accumulate(module):
            with accelerator.autocast():
                loss, metrics = task.training_step(module, batch, dist)
            accelerator.backward(loss)
            if accelerator.sync_gradients and optim.grad_clip > 0:
                accelerator.clip_grad_norm_(module.parameters(), optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window["loss"].append(loss.detach())
        for k, v in metrics.items():
            window[k].append(v.detach())
        if not accelerator.sync_gradients:
            continue
        lr_used = scheduler.get_last_lr()[0]  # the LR of the step just taken
        scheduler.step()
        task.after_optimizer_step(accelerator.unwrap_model(module))
        step += 1
        samples += global_batch
        window_samples += global_batch

        if step % train.log_every == 0 or step == stop or step == 1:
            names = sorted(window)
            means = torch.stack([torch.stack(window[k]).float().mean() for k in names])
            means = accelerator.reduce(means, reduction="mean")
            now = time.perf_counter()
            last_metrics = {k: float(v) for k, v in zip(names, means.tolist())}
            if not math.isfinite(last_metrics["loss"]):
                raise TrainingDivergedError(f"the loss is {last_metrics['loss']} at step {step}; lower optim.lr, "
                                            "enable optim.grad_clip or check the data")
            last_metrics.update(lr=lr_used, samples_per_s=window_samples / max(now - t_window, 1e-9))
            window.clear()
            t_window, window_samples = now, 0
            if accelerator.is_main_process:
                append_jsonl(run_dir / METRICS, {"step": step, "epoch": step / steps_per_epoch, "samples": samples,
                                                 **last_metrics, "time": elapsed + now - t_start})
                if progress is not None:
                    progress.update(step, last_metrics)
        elif progress is not None and accelerator.is_main_process:
            progress.update(step, {})

        if validates and (step % eval_every == 0 or step == total):
            module.eval()
            val = {k: float(v) for k, v in task.evaluate(accelerator.unwrap_model(module), dist).items()}
            module.train()
            validations.append({"step": step, **val})
            improved = monitor is not None and monitor in val and (
                best is None or (val[monitor] > best if maximize else val[monitor] < best))
            if improved:
                best = val[monitor]
            if accelerator.is_main_process:
                append_jsonl(run_dir / METRICS, {"step": step, **{f"val/{k}": v for k, v in val.items()}})
                if progress is not None:
                    shown = " · ".join(f"{k} {v:.4g}" for k, v in val.items())
                    progress.message(f"step {step} validation: {shown}" + (" (best)" if improved else ""))
            if improved:
                saved = ckpt.save(step, trainer_state())
                last_saved = step
                if accelerator.is_main_process:
                    mark_best(run_dir, saved.name)
                accelerator.wait_for_everyone()

        if (step % train.ckpt_every == 0 or step == stop) and last_saved != step:
            ckpt.save(step, trainer_state())
            last_saved = step

    seconds = time.perf_counter() - t_start
    if progress is not None and accelerator.is_main_process:
        progress.stop()
    final = latest_checkpoint(run_dir) if last_saved >= 0 else None
    trained = step - (resumed_from or 0)
    accelerator.end_training()
    return RunResult(
        run_dir=run_dir, checkpoint=final, steps=step, total_steps=total, samples=samples,
        seconds=elapsed + seconds, samples_per_s=trained * global_batch / max(seconds, 1e-9),
        world_size=dist.world_size, precision=precision, peak_lr=lr, metrics=last_metrics,
        best_metric=best, best_checkpoint=best_checkpoint(run_dir), validations=validations,
        resumed_from=resumed_from, skipped_samples=getattr(task, "skipped_samples", 0),
    )
