"""S-SMKE pretraining: the Task (model, data, loss) and the ``pretrain`` entry point."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.checkpoint import TEXT_CONFIG, TOKENIZER, eval_path, read_json, write_json
from evlp.config.schema import PretrainConfig
from evlp.data.device_augment import finish_images
from evlp.data.mix import build_sources
from evlp.data.pairs import PairBatches
from evlp.data.shards import count_samples
from evlp.data.tokenize import build_caption_tokenizer
from evlp.data.transforms import pretrain_transforms
from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.losses import MemoryBank, clip_loss, kd_loss, sigmoid_loss, total_loss, update_bank
from evlp.models import build_model, build_teacher_of, resolve_model_config, resolve_weights
from evlp.models.lock import apply_locks
from evlp.eval.results import EvalResult
from evlp.train.lifecycle import TrainingResult, train
from evlp.train.runs import RunStart
from evlp.train.task import Progress, Task

class PretrainModule(nn.Module):
    """The trainable module under DDP: the student plus the KD logit scale (a parameter only when learnable)
    and, with the sigmoid ITC (``itc_bias`` given), the learnable bias of each ITC level."""

    def __init__(self, student: nn.Module, kd_temperature: float, learnable: bool,
                 itc_bias: float | None = None) -> None:
        super().__init__()
        self.student = student
        init = torch.tensor(math.log(1.0 / kd_temperature))
        if learnable:
            self.kd_logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("kd_logit_scale", init, persistent=False)
        # shape (2,), not two scalars: FSDP2 cannot shard 0-dim parameters
        self.itc_bias = nn.Parameter(torch.full((2,), float(itc_bias))) if itc_bias is not None else None

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        out = self.student(pixels, input_ids, attention_mask)
        out["itc_scales"] = self.student.logit_scales.exp()  # (2,)
        out["kd_scale"] = self.kd_logit_scale.exp()
        if self.itc_bias is not None:
            out["itc_bias"] = self.itc_bias  # (2,)
        return out


def unused_parameters_possible(cfg: PretrainConfig) -> bool:
    """Whether some trainable parameter can get no gradient in a step (DDP's ``find_unused_parameters``): the
    KD head without KD, the ITC scales (and sigmoid biases) without ITC. Locked tower parameters do not count:
    they have ``requires_grad=False``, so DDP does not wait for their gradients (evlp.models.lock)."""
    use_kd = cfg.model.teacher.enabled and cfg.loss.kd_weight > 0
    return not use_kd or cfg.loss.itc_weight == 0


class PretrainTask(Task):
    """CLIP ITC on two levels plus contrastive KD from a frozen teacher with a FIFO memory bank.

    Args:
        cfg: the resolved pretraining config.
    """

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, resume_from: Path | None = None, *, pretrained: bool = True,
                 teacher_targets: Any = None) -> None:
        self.cfg = cfg
        self.resume_from = resume_from
        self.pretrained = pretrained
        """False: random weights of the same architecture (benchmarks), nothing read or downloaded."""
        self.sources = build_sources(cfg.data)
        """``data.sources``, or ``data.train`` as one source (evlp.data.mix)."""
        self.shards = [shard for source in self.sources for shard in source.shards]
        text = cfg.model.text
        self.tokenizer = build_caption_tokenizer(text.tokenizer_source, text.max_length, text.vocab_size)
        self.train_transform, _ = pretrain_transforms(cfg.data, cfg.model.image.img_size)
        self._samples = cfg.data.samples_per_epoch or count_samples(self.shards)  # the nominal epoch of a mix too
        if self._samples < cfg.train.batch_size:
            raise ConfigError(f"the training data has {self._samples} samples, fewer than train.batch_size "
                              f"{cfg.train.batch_size}; lower the batch size or add data")
        self.use_kd = cfg.model.teacher.enabled and cfg.loss.kd_weight > 0
        self.cached_targets: Any = None
        """Where cached teacher targets come from (``model.teacher.cache``); None: the teacher runs."""
        if self.use_kd and cfg.model.teacher.cache:
            self.cached_targets = teacher_targets or cached_teacher_targets(cfg, self.shards)
        self.find_unused_parameters = unused_parameters_possible(cfg)
        self.teacher: nn.Module | None = None
        self.bank: MemoryBank | None = None
        self.pairs: PairBatches | None = None
        self.skipped_samples = 0

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        cfg, models = self.cfg, self.cfg.paths.models
        if self.resume_from is not None:  # the student's weights come from the checkpoint
            student = build_model(cfg.model, text_config=read_json(self.resume_from / TEXT_CONFIG))
        else:
            student = build_model(cfg.model, pretrained=self.pretrained, models_dir=models)
        self.text_config = student.text.hf_config()
        self.locks = apply_locks(student, cfg.model)  # LiT: model.image/text.lock, unlocked_layers, train_norms
        sigmoid = cfg.loss.itc == "sigmoid"
        if sigmoid:  # SigLIP's t starts at loss.sigmoid_init_scale (a resumed run then loads its own)
            with torch.no_grad():
                student.logit_scales.fill_(math.log(cfg.loss.sigmoid_init_scale))
        if self.use_kd:
            if self.cached_targets is None:
                self.teacher = build_teacher_of(cfg.model, pretrained=self.pretrained, models_dir=models,
                                                input_mean=cfg.data.mean, input_std=cfg.data.std)
            self.bank = MemoryBank(cfg.loss.memory_bank_size, cfg.model.target_dim)
        return PretrainModule(student, cfg.loss.kd_temperature, cfg.loss.kd_learnable_temperature,
                              itc_bias=cfg.loss.sigmoid_init_bias if sigmoid else None)

    def to(self, device: Any) -> None:
        if self.teacher is not None:
            self.teacher.to(device)
        if self.bank is not None:
            self.bank.to(device)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"memory_bank.{k}": v for k, v in self.bank.state_dict().items()} if self.bank is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.bank is not None:
            bank = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("memory_bank.")}
            device = self.bank.bank.device
            self.bank.load_state_dict(bank)
            self.bank.to(device)

    def data_state(self) -> dict:
        return {"stream": self.pairs.state_dict() if self.pairs is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        self.tokenizer.save(folder / TOKENIZER)
        write_json(folder / TEXT_CONFIG, self.text_config)

    # ------------------------------------------------------------------ data
    def samples_per_epoch(self) -> int:
        return self._samples

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        self.pairs = PairBatches(self.sources, transform=self.train_transform, tokenizer=self.tokenizer,
                                 batch_size=self.cfg.train.batch_size, dist=dist, seed=self.cfg.train.seed,
                                 num_workers=self.cfg.data.num_workers, teacher_targets=self.cached_targets,
                                 mix=self.cfg.data.mix)
        for batch in self.pairs.batches((data_state or {}).get("stream")):
            self.skipped_samples = self.pairs.skipped
            yield batch

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return finish_images(batch, self.train_transform)

    def before_step(self, module: nn.Module, step: int, total: int) -> None:
        if self.cfg.model.image.patch_dropout > 0:  # FLIP: masked, then the unmasked tail
            module.student.image.set_patch_dropout(step < total - self.cfg.train.unmasked_tail)

    # ------------------------------------------------------------------ loss
    shared_outputs = ("itc_scales", "kd_scale", "itc_bias")

    def forward(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        return module(batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss(self, out: dict[str, Tensor], batch: dict[str, Any], dist: DistInfo
             ) -> tuple[Tensor, dict[str, Tensor]]:
        pixels = batch["image"]
        scales = out["itc_scales"].float()
        levels = []
        metrics: dict[str, Tensor] = {}
        for i, key in enumerate(("x_interm", "x")):
            image, text = out[f"{key}_image"].float(), out[f"{key}_text"].float()
            if "itc_bias" in out:  # loss.itc=sigmoid (SigLIP)
                bias = out["itc_bias"][i].float()
                res = sigmoid_loss(image, text, scales[i], bias, rank=dist.rank, world_size=dist.world_size)
                metrics[f"itc_{key}_bias"] = bias.detach().clone()  # a view of the parameter: the step moves it
            else:
                res = clip_loss(image, text, scales[i], rank=dist.rank, world_size=dist.world_size)
            levels.append(res.loss)
            metrics[f"itc_{key}_loss"] = res.loss.detach()
            metrics[f"itc_{key}_acc"] = res.acc.detach()
            metrics[f"itc_{key}_scale"] = scales[i].detach()
        kd = None
        if self.use_kd:
            raw = batch["teacher_target"] if self.teacher is None else self.teacher_targets(pixels)  # cached, or now
            targets = F.normalize(raw.float(), dim=-1)  # (B, Dt), no grad
            res = kd_loss(out["kd_image"].float(), out["kd_text"].float(), targets, self.bank.negatives(),
                          out["kd_scale"].float(), rank=dist.rank, world_size=dist.world_size,
                          global_negatives=self.cfg.loss.kd_global_negatives)
            update_bank(self.bank, targets, dist.world_size)
            kd = res.loss
            metrics.update(kd_loss=res.loss.detach(), kd_image_loss=res.loss_image.detach(),
                           kd_text_loss=res.loss_text.detach(), kd_acc=res.acc.detach())
        loss = total_loss(kd, levels if self.cfg.loss.itc_weight > 0 else [], self.cfg.loss.kd_weight,
                          self.cfg.loss.itc_weight)
        return loss, metrics

    def teacher_targets(self, pixels: Tensor) -> Tensor:
        """The teacher's raw targets of ``pixels``, run in chunks of ``train.grad_cache``'s size (the memory of
        one chunk, like the student)."""
        chunk = -(-pixels.shape[0] // max(1, self.cfg.train.grad_cache))
        return torch.cat([self.teacher(part) for part in pixels.split(chunk)])

    def after_optimizer_step(self, module: nn.Module) -> None:
        module.student.clamp_logit_scales()


def pretrain_task_class(model: Any) -> type[PretrainTask]:
    """The pretraining objective of a model family (``model.arch``): S-SMKE's ITC + KD, ZeroVL's ITC with
    coin-flip mixup, or EVE's masked signal modeling. Each takes ``(cfg, resume_from=, pretrained=,
    teacher_targets=)``."""
    if model.arch == "dual":
        from evlp.train.zerovl import ZeroVLTask

        return ZeroVLTask
    if model.arch == "eve":
        from evlp.train.eve import EvePretrainTask

        return EvePretrainTask
    return PretrainTask


def teacher_view(cfg: PretrainConfig) -> dict[str, Any]:
    """The image view the teacher is shown when its targets are cached: squash-resize to the model's size,
    normalised as the data config says (what :func:`evlp.data.transforms.eval_transform` does)."""
    return {"img_size": cfg.model.image.img_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "resize": "squash-bicubic"}


def cache_tag(cfg: PretrainConfig) -> str:
    """The tag of ``cfg``'s teacher-target cache files (:func:`evlp.data.teacher_cache.teacher_tag`)."""
    from evlp.config import to_dict
    from evlp.data.teacher_cache import teacher_tag

    return teacher_tag(to_dict(cfg.model.teacher), teacher_view(cfg))


def cached_teacher_targets(cfg: PretrainConfig, shards: list[Path]) -> Any:
    """The cached targets of every shard, checked before training starts.

    Raises:
        DataNotFoundError: shards without a cache of this teacher and view.
    """
    from evlp.data.teacher_cache import TeacherTargets, cache_path
    from evlp.errors import DataNotFoundError

    tag = cache_tag(cfg)
    targets = TeacherTargets(shards, tag)
    missing = targets.missing()
    if missing:
        raise DataNotFoundError(f"model.teacher.cache=true but {len(missing)} of {len(shards)} shards have no "
                                f"teacher-target cache (e.g. {cache_path(missing[0], tag)}); create them with "
                                "`evlp data cache-teacher` and the same --config and overrides")
    return targets


# ---------------------------------------------------------------------- entry point
PRETRAIN_FIXED = ("model", "loss.memory_bank_size", "loss.kd_learnable_temperature", "loss.itc",
                  "optim.lr_scale_image", "optim.lr_scale_text")
"""What a resume of a pretraining run may not change (besides batch size, accumulation and seed)."""


def pretrain(cfg: PretrainConfig, *, resume: bool = False, stop_after: int | None = None,
             progress: Progress | None = None) -> TrainingResult:
    """Pretrain S-SMKE as configured; resumable; writes the run folder ``cfg.out``, then scores the final
    checkpoint by retrieval on ``data.val`` (when set) into ``RUN/eval/retrieval.json``.

    ``stop_after`` ends this invocation after that many optimizer steps (see :func:`evlp.train.loop.fit`).
    Runs on one CPU/GPU or, under ``accelerate launch`` / ``torchrun``, on every process of the job.

    Raises:
        ConfigError: bad settings, a run folder that conflicts with ``resume``, or one in use by another run.
        DataNotFoundError: no training shards.
    """
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))

    def make_task(start: RunStart) -> PretrainTask:
        # fail before anything is written when a weights file is missing
        if start.resume_from is None:
            resolve_weights(cfg.model.image.checkpoint, cfg.paths.models, "model.image")
        if cfg.model.teacher.enabled and cfg.loss.kd_weight > 0 and not cfg.model.teacher.cache:
            resolve_weights(cfg.model.teacher.checkpoint, cfg.paths.models, "model.teacher")
        return pretrain_task_class(cfg.model)(cfg, resume_from=start.resume_from)

    def score(ckpt: Path) -> list[EvalResult]:
        if not cfg.data.val:
            return []
        from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval

        val = Path(cfg.data.val)
        val = val if val.is_absolute() else Path(cfg.data.root) / val
        return [evaluate_retrieval(RetrievalEvalConfig(ckpt=str(ckpt), data=str(val), split=cfg.data.val_split,
                                                       out=str(eval_path(cfg.out, "retrieval"))),
                                   dist=DistInfo())]  # scored on the main process alone

    return train(cfg, make_task, resume=resume, stop_after=stop_after, progress=progress, fixed=PRETRAIN_FIXED,
                 score=score)
