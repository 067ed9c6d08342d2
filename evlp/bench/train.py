"""``evlp bench train``: the pretraining step at the hardware limit, measured.

One pretraining step of a recipe (student + frozen teacher + ITC + KD with its memory bank + AdamW), on the real
data pipeline, timed after a warm-up: samples/s, the median step time, peak memory, and model FLOPs utilisation
(MFU) against the matmul rate this command measures on the same device (fp32 on CPU; bf16 or tf32 on GPU, as the
recipe's precision says). The step is broken into data wait, batched augmentation, teacher, student forward,
loss, backward and optimizer by synchronising the device between phases; the step time is the wall time of the whole step,
data wait included (on CPU the phases run one after the other anyway; on GPU the synchronisation costs a
little, so the figure is slightly conservative).

Model FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products of the
forward and backward passes, attention on the math kernel while counting) — the FLOPs the model needs, not the
ones a kernel happens to execute.

Two rates are measured: a large square product (the device's practical peak, ``mfu``), and the model's own
products, every one the step ran, replayed alone on random inputs of the same shapes and layouts
(``mfu_model_shapes``: how close the whole step comes to the speed the device reaches on exactly these
matrices; what is missing is the time outside them). Both are measured right after each timed step, and each
MFU is the median over the steps of the step's own ratio: on a shared machine a slow period slows a step and
the rates measured beside it alike, where one rate measured apart from the steps made the MFU of the same code
move by a tenth between runs. ``matmul_flops_per_s`` and ``model_matmul_flops_per_s`` are the best rates seen
(each replayed product at its best time); the ``*_all`` lists hold the per-step figures.

Weights are random (``pretrained=False``): speed does not depend on them and nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from evlp.bench.rates import Replay, count_flops, device_name, matmul_rate, sync
from evlp.config.schema import PretrainConfig
from evlp.dist import DistInfo


class _PhaseTimer:
    """Forward hooks that time a module's forward (device synchronised at both ends) while ``active``."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device, self.active, self.seconds, self._t0 = device, False, 0.0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *args: Any) -> None:
        if self.active:
            sync(self.device)
            self._t0 = time.perf_counter()

    def _post(self, *args: Any) -> None:
        if self.active:
            sync(self.device)
            self.seconds += time.perf_counter() - self._t0


def _synthetic_shards(cfg: PretrainConfig, n: int, folder: Path) -> PretrainConfig:
    """Point ``cfg`` at ``n`` synthetic image-caption pairs written into ``folder`` (when it has no data)."""
    from evlp.data.synth import synthesize

    synthesize(folder, n_train=n, n_test=1, seed=0, shard_size=max(n, 1), image_size=256)
    data = dataclasses.replace(cfg.data, root=str(folder), train=["train"], sources=[], val=None,
                               samples_per_epoch=None)
    return dataclasses.replace(cfg, data=data)


def _offline_model(model: Any) -> Any:
    """The model config resolved as training would; when its text model is not on this machine, the same
    architecture as a random BERT of the configured sizes with the uncased WordPiece vocabulary of the offline
    ``minilm`` package (the speed is the same; nothing is downloaded)."""
    from evlp.errors import EvlpError
    from evlp.models import resolve_model_config

    try:
        return resolve_model_config(model)
    except EvlpError:
        if model.text.name_or_path is None:
            raise
        text = dataclasses.replace(model.text, name_or_path=None, tokenizer="minilm")
        return resolve_model_config(dataclasses.replace(model, text=text))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB; the whole process


def bench_train(cfg: PretrainConfig, *, steps: int = 10, warmup: int = 2, device: str | None = None,
                synthetic_data: bool | None = None) -> dict[str, Any]:
    """Measure the pretraining step of ``cfg``.

    Args:
        cfg: the resolved pretraining config (``train.batch_size`` per step, ``train.precision``).
        steps: timed steps (median reported), after ``warmup`` untimed ones.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...; default CUDA when available.
        synthetic_data: write a temporary synthetic shard set instead of reading ``data.root`` (default: when
            ``data.root`` holds no shards).

    Returns:
        ``samples_per_s``, ``step_s`` (median), ``mfu`` (0-1, against a square product's rate),
        ``mfu_model_shapes`` (against the rate of the model's own products, :class:`~evlp.bench.rates.Replay`; both the median of
        the per-step ratios, module doc), ``peak_memory_bytes``, ``breakdown_s`` (median seconds per phase),
        ``model_flops_per_step``, ``matmul_flops_per_s`` and ``model_matmul_flops_per_s`` (the best rates seen;
        ``*_all``: the one measured after each step, as ``step_s_all``) and what was measured.
    """
    from evlp.data.mix import training_shards
    from evlp.data.teacher_cache import StandInTargets
    from evlp.errors import DataNotFoundError
    from evlp.models import place_module
    from evlp.train.grad_cache import check_grad_cache, grad_cache_step, split_batch
    from evlp.train.loop import to_device
    from evlp.train.optim import build_optimizer, peak_lr
    from evlp.train.pretrain import cached_teacher_targets, pretrain_task_class

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.matmul_precision != "highest"
    cfg = dataclasses.replace(cfg, model=_offline_model(cfg.model))
    batch = cfg.train.batch_size
    with tempfile.TemporaryDirectory(prefix="evlp-bench-") as tmp:
        if synthetic_data is None:
            try:
                synthetic_data = not training_shards(cfg.data)
            except (DataNotFoundError, OSError, ValueError):
                synthetic_data = True
        if synthetic_data:
            cfg = _synthetic_shards(cfg, batch * (steps + warmup + 2), Path(tmp) / "data")
        torch.manual_seed(cfg.train.seed)
        targets, targets_kind = None, None
        if cfg.model.teacher.cache and cfg.model.teacher.enabled and cfg.loss.kd_weight > 0:
            try:
                targets = cached_teacher_targets(cfg, training_shards(cfg.data))
                targets_kind = "cache"
            except DataNotFoundError:  # no cache yet: stand-in targets of the same shape, the same loss work
                targets, targets_kind = StandInTargets(cfg.model.target_dim), "stand-in"
        task = pretrain_task_class(cfg.model)(cfg, pretrained=False, teacher_targets=targets)
        module = task.build_module().to(dev)
        task.to(dev)
        module.train()
        if task.bank is not None:  # steady state: a full memory bank, as after the first few hundred steps
            task.bank.push(torch.nn.functional.normalize(torch.randn(task.bank.size, task.bank.dim, device=dev), dim=-1))
        dist = DistInfo()
        batches = iter(task.train_batches(dist, None))
        autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32
                    else torch.autocast(dev.type, enabled=False))

        flop_batch = task.on_device(to_device(next(batches), dev))

        check_grad_cache(task, cfg.train.grad_cache, batch)

        def forward_backward(b: dict[str, Any]) -> float:
            """The step's forward and loss, then its backward (GradCache's chunked passes with
            ``train.grad_cache``); returns the seconds before the backward (all of them with GradCache)."""
            t0 = time.perf_counter()
            if cfg.train.grad_cache > 1:
                spent = [0.0]

                def timed_backward(surrogate: torch.Tensor) -> None:
                    sync(dev)
                    t = time.perf_counter()
                    surrogate.backward()
                    sync(dev)
                    spent[0] += time.perf_counter() - t

                grad_cache_step(task, module, b, dist, chunks=cfg.train.grad_cache, backward=timed_backward,
                                autocast=lambda: autocast)
                sync(dev)
                return time.perf_counter() - t0 - spent[0]  # both forward passes and the loss
            with autocast:
                loss, _ = task.training_step(module, b, dist)
            sync(dev)
            t1 = time.perf_counter()
            loss.backward()
            return t1 - t0

        chunks = cfg.train.grad_cache

        def one_step() -> None:
            """A plain step of one of ``chunks`` parts (the whole batch without GradCache): the memory of one
            chunk, the model's FLOPs without GradCache's extra forward (the MFU counts useful work only)."""
            with autocast:
                loss, _ = task.training_step(module, split_batch(flop_batch, chunks)[0], dist)
            loss.backward()
            module.zero_grad(set_to_none=True)

        # the model's FLOPs: before compiling, without checkpointing's recompute or GradCache's extra forward
        products: list = []
        flops = count_flops(one_step, products) * chunks
        place_module(module, dev, grad_checkpointing=cfg.train.grad_checkpointing,  # as in training
                     compile_backend=cfg.train.compile_backend if cfg.train.compile else None)
        optimizer = build_optimizer(module, cfg.optim, peak_lr(cfg.optim, batch), device=dev)
        teacher = _PhaseTimer(task.teacher, dev) if task.teacher is not None else None
        student = _PhaseTimer(getattr(module, "student", module), dev)

        def step(b: dict[str, Any]) -> tuple[float, float, float]:
            """forward (incl. loss), backward, optimizer seconds (device synchronised)"""
            t0 = time.perf_counter()
            fwd = forward_backward(b)
            sync(dev)
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            task.after_optimizer_step(module)
            sync(dev)
            return fwd, t2 - t0 - fwd, time.perf_counter() - t2

        rate_dtype = dtype if dtype != torch.float16 or dev.type == "cuda" else torch.float32
        replay = Replay(products, dev)  # with the dtypes the step ran them in
        del products
        for _ in range(warmup):
            step(task.on_device(to_device(next(batches), dev)))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        phases: dict[str, list[float]] = {k: [] for k in
                                          ("data_wait", "augment", "teacher", "student_forward", "loss", "backward",
                                           "optimizer")}
        step_times: list[float] = []
        square_rates: list[float] = []
        shapes_rates: list[float] = []
        peak = 0
        for _ in range(steps):  # the breakdown: synchronised phases
            t0 = time.perf_counter()
            b = to_device(next(batches), dev)
            sync(dev)
            wait = time.perf_counter() - t0
            b = task.on_device(b)  # the batched augmentation (data.augment_on=device)
            sync(dev)
            augment = time.perf_counter() - t0 - wait
            for timer in (teacher, student):
                if timer is not None:
                    timer.active, timer.seconds = True, 0.0
            fwd, bwd, opt = step(b)
            for timer in (teacher, student):
                if timer is not None:
                    timer.active = False
            t_teacher = teacher.seconds if teacher is not None else 0.0
            phases["data_wait"].append(wait)
            phases["augment"].append(augment)
            phases["teacher"].append(t_teacher)
            phases["student_forward"].append(student.seconds)
            phases["loss"].append(max(fwd - t_teacher - student.seconds, 0.0))
            phases["backward"].append(bwd)
            phases["optimizer"].append(opt)
            step_times.append(time.perf_counter() - t0)
            peak = max(peak, _peak_memory(dev))
            # the rates right after the step, under the same load from elsewhere (module doc)
            shapes_rates.append(replay.flops / replay.round())
            square_rates.append(matmul_rate(dev, rate_dtype))
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)  # the step's peak, not the replay's
    step_s = statistics.median(step_times)
    return {
        "device": device_name(dev),
        "precision": precision, "batch_size": batch, "steps": steps, "warmup": warmup,
        "synthetic_data": bool(synthetic_data), "teacher": task.teacher is not None,
        "cached_teacher_targets": targets_kind,
        "compile": cfg.train.compile, "grad_checkpointing": cfg.train.grad_checkpointing,
        "grad_cache": cfg.train.grad_cache,
        "samples_per_s": batch / step_s, "step_s": step_s, "step_s_all": step_times,
        "breakdown_s": {k: statistics.median(v) for k, v in phases.items()},
        "model_flops_per_step": flops, "model_flops_per_sample": flops / batch,
        "matmul_flops_per_s": max(square_rates), "matmul_flops_per_s_all": square_rates,
        "mfu": statistics.median(flops / t / r for t, r in zip(step_times, square_rates)),
        "model_matmul_flops_per_s": replay.best_rate(), "model_matmul_flops_per_s_all": shapes_rates,
        "mfu_model_shapes": statistics.median(flops / t / r for t, r in zip(step_times, shapes_rates)),
        "peak_memory_bytes": peak,
        "peak_memory_kind": "max allocated (CUDA)" if dev.type == "cuda" else "peak RSS of the process",
    }
