"""ImageNet fine-tuning and linear probe (``evlp finetune imagenet [--linear]``): the pretrained image tower + a
pooled LayerNorm + linear head, the best checkpoint by validation top-1, then its exact whole-split scores
(reference.md section 6.1).

Model: image tower (all its blocks) -> tokens (B, 1+N, D) -> mean of the patch tokens (or the CLS) ->
LayerNorm(D, eps 1e-6) -> Linear(D, C). Fine-tuning trains everything with layer-wise LR decay; the linear probe
freezes the tower (no grad, eval mode) and trains the head with the same recipe (RandAugment, random erasing,
Mixup/CutMix with label smoothing).

Checkpoints hold the classifier (keys ``backbone.*``, ``fc_norm.*``, ``head.*``) and a ``config.yaml`` whose
``model`` section rebuilds the tower at the fine-tuning resolution and whose ``classifier`` section holds the
head's shape, class names and normalisation; :func:`load_image_classifier` reads them back,
:func:`evaluate_imagenet` scores them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.datasets import ImageFolder

from evlp.checkpoint import CONFIG, load_weights_into, read_json, read_task_checkpoint
from evlp.config.imagenet import ImageNetConfig
from evlp.config.loader import from_dict
from evlp.config.schema import ImageTowerConfig, ModelConfig
from evlp.data.loader import EpochBatches
from evlp.dist import DistInfo, gather_objects, shard_range
from evlp.errors import CheckpointError, ConfigError, DataNotFoundError
from evlp.eval.results import EvalResult, checkpoint_config_hash
from evlp.train.finetune_common import FinetuneResult, checkpoint_config, eval_path, finish_run, open_run
from evlp.train.loop import fit
from evlp.train.task import Progress, TaskBase

HEAD_LN_EPS = 1e-6
TASK = "imagenet"


# ---------------------------------------------------------------------- data
def _find_classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class _FixedClassFolder(ImageFolder):
    """An ``ImageFolder`` with a given class order, so a split lacking a class keeps the training indices."""

    def __init__(self, root: str, classes: list[str], transform: Any = None) -> None:
        self._fixed = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self._fixed), {c: i for i, c in enumerate(self._fixed)}


def image_folder(root: str | Path, dataset: str, split: str, transform: Any,
                 classes: list[str] | None = None) -> Any:
    """``ROOT/<dataset>/<split>/<class>/*`` as a torchvision ``ImageFolder``.

    Args:
        classes: the class order to use (the training split's); None = the folder's sorted class folders.

    Raises:
        DataNotFoundError: the folder is missing, empty, or has classes that ``classes`` lacks.
    """
    folder = Path(root) / dataset / split
    hint = (f"place the images as {Path(root) / dataset}/{{train,val}}/<class>/*.JPEG (ImageNet: `evlp data "
            f"download imagenet --out {root}`), or point --data / data= at the root holding {dataset}/")
    if not folder.is_dir():
        raise DataNotFoundError(f"{split} images not found: {folder} does not exist; {hint}")
    found = _find_classes(folder)
    if not found:
        raise DataNotFoundError(f"{folder} has no class folders; {hint}")
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataNotFoundError(f"{folder} has {len(extra)} class folder(s) that the training split lacks "
                                    f"(first: {extra[:3]}); train/ and {split}/ must hold the same classes")
    try:
        return _FixedClassFolder(str(folder), classes if classes is not None else found, transform=transform)
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{folder}: {exc}; {hint}") from None


def collate_images(samples: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """``[(image (3, H, W), label)]`` -> ``{"pixels": (B, 3, H, W), "labels": (B,)}``."""
    return {"pixels": torch.stack([s[0] for s in samples]),
            "labels": torch.tensor([int(s[1]) for s in samples], dtype=torch.long)}


def imagenet_transforms(cfg: ImageNetConfig, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
                        ) -> tuple[Any, Any]:
    """``(train, eval)`` transforms with timm's ``create_transform``: bicubic RandomResizedCrop ``crop_scale``,
    flip, ``auto_augment``, random erasing (pixel mode, one box); eval = resize the shorter side to
    ``img_size / eval_crop_ratio`` + center crop.

    Raises:
        ConfigError: timm rejects ``auto_augment``.
    """
    from timm.data import create_transform

    policy = cfg.auto_augment if cfg.auto_augment.lower() not in ("", "none") else None
    try:
        train = create_transform(img_size, is_training=True, scale=tuple(cfg.crop_scale), auto_augment=policy,
                                 interpolation="bicubic", mean=mean, std=std, re_prob=cfg.reprob, re_mode="pixel",
                                 re_count=1)
    except (AssertionError, ValueError, KeyError) as exc:
        raise ConfigError(f"auto_augment: timm cannot parse '{cfg.auto_augment}' ({exc}); use e.g. "
                          "'rand-m9-mstd0.5-inc1', or '' for none") from None
    evaluation = create_transform(img_size, is_training=False, interpolation="bicubic",
                                  crop_pct=cfg.eval_crop_ratio, mean=mean, std=std)
    return train, evaluation


# ---------------------------------------------------------------------- model
def prefix_tokens(backbone: nn.Module) -> int:
    """How many leading tokens of the tower's output are not patches (CLS, registers); at least 1."""
    inner = getattr(backbone, "model", None)
    if getattr(backbone, "has_cls", False) and inner is not None:
        return max(1, int(getattr(inner, "num_prefix_tokens", 1)))
    return 1


class ImageClassifier(nn.Module):
    """Image tower -> pooled tokens -> LayerNorm -> linear; ``forward(pixels (B, 3, H, W))`` -> logits (B, C).

    Args:
        backbone: an image tower returning (B, 1+N, D) tokens, CLS first.
        num_classes: C.
        pool: ``mean`` (patch tokens, CLS excluded) or ``cls``.
        frozen: linear probe: the tower gets no gradient, runs under no_grad and stays in eval mode.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "mean", frozen: bool = False) -> None:
        super().__init__()
        width = int(backbone.width)
        self.backbone = backbone
        self.fc_norm = nn.LayerNorm(width, eps=HEAD_LN_EPS)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.pool, self.frozen, self.prefix = pool, frozen, prefix_tokens(backbone)
        if frozen:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.frozen:  # no dropout or norm-statistics updates in a frozen tower
            self.backbone.eval()
        return self

    def features(self, pixels: Tensor) -> Tensor:
        """The normalised pooled features (B, D) the head classifies."""
        if self.frozen:
            with torch.no_grad():
                tokens = self.backbone(pixels)  # (B, 1+N, D)
        else:
            tokens = self.backbone(pixels)  # (B, 1+N, D)
        pooled = tokens[:, self.prefix:].mean(dim=1) if self.pool == "mean" else tokens[:, 0]  # (B, D)
        return self.fc_norm(pooled)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.features(pixels))  # (B, C)


def tower_blocks(backbone: nn.Module) -> nn.Module | None:
    """The tower's sequence of transformer blocks (``.blocks``, or a timm model's ``.model.blocks``), or None."""
    for owner in (backbone, getattr(backbone, "model", None)):
        blocks = getattr(owner, "blocks", None) if owner is not None else None
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            return blocks
    return None


def layer_ids(module: ImageClassifier) -> tuple[dict[str, int], int] | None:
    """Each parameter's layer for layer-wise LR decay: 0 = everything of the tower before its blocks (patch and
    position embeddings, CLS, ``norm_pre``, a timm stem), k = block k (1..L), L+1 = the head and anything of the
    tower after its blocks (a timm final norm).

    Returns:
        ``({name: layer}, L)``, or None when the tower has no ``blocks`` (no layer decay then).
    """
    blocks = tower_blocks(module.backbone)
    if blocks is None:
        return None
    depth = len(blocks)
    block_of = {id(p): k + 1 for k, block in enumerate(blocks) for p in block.parameters()}
    ids: dict[str, int] = {}
    seen_block = False
    for name, p in module.named_parameters():
        if not name.startswith("backbone."):
            ids[name] = depth + 1
        elif id(p) in block_of:
            ids[name], seen_block = block_of[id(p)], True
        else:  # registration order tells a stem (before the blocks) from a final norm (after them)
            ids[name] = depth + 1 if seen_block else 0
    return ids, depth


def layer_decay_groups(module: ImageClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay: ``lr_scale = layer_decay ** (L + 1 - i)`` for layer i
    (:func:`layer_ids`); no weight decay for 1-D tensors and biases. Frozen parameters are left out.

    A tower without ``blocks`` gets scale 1 everywhere (with a warning). Each group also carries ``layer``.
    """
    found = layer_ids(module)
    if found is None:
        if layer_decay != 1.0 and any(p.requires_grad for p in module.backbone.parameters()):
            warnings.warn(f"layer_decay={layer_decay} is ignored: the image tower ({type(module.backbone).__name__}) "
                          "has no transformer `blocks`, so every parameter gets the full learning rate",
                          stacklevel=2)
        ids, depth = {name: 0 for name, _ in module.named_parameters()}, -1  # scale d^0 = 1
    else:
        ids, depth = found
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        layer = ids[name]
        decay = not (p.ndim <= 1 or name.endswith(".bias"))
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0, "layer": layer,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def resize_tower(tower: nn.Module, cfg: ImageTowerConfig, img_size: int) -> tuple[nn.Module, ImageTowerConfig]:
    """The tower at another input resolution: the position embedding is resampled (bicubic).

    Returns:
        The tower and its config with ``img_size`` replaced (what rebuilds it from a checkpoint).

    Raises:
        ConfigError: ``img_size`` is not a multiple of the patch size, or the tower cannot change resolution.
    """
    new_cfg = dataclasses.replace(cfg, img_size=img_size)
    if img_size == cfg.img_size:
        return tower, new_cfg
    if cfg.name == "data2vec2":
        from timm.layers import resample_abs_pos_embed

        from evlp.models.image import Data2Vec2ImageTower

        if img_size % cfg.patch_size:
            raise ConfigError(f"img_size={img_size} is not a multiple of the tower's patch size {cfg.patch_size}")
        resized = Data2Vec2ImageTower(new_cfg)
        state = tower.state_dict()
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(resized.patch_embed.grid_size),
            old_size=list(tower.patch_embed.grid_size), num_prefix_tokens=0)  # (1, N', D)
        resized.load_state_dict(state)
        return resized, new_cfg
    inner = getattr(tower, "model", None)
    if callable(getattr(inner, "set_input_size", None)):
        inner.set_input_size(img_size=img_size)
    elif getattr(inner, "pos_embed", None) is not None:
        raise ConfigError(f"img_size={img_size}: timm model '{cfg.name}' cannot change its input size; "
                          f"leave img_size unset (the checkpoint's {cfg.img_size})")
    return tower, new_cfg  # CNNs take any size


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def topk_accuracy(module: nn.Module, dataset: Any, *, batch_size: int, num_workers: int = 0,
                  dist: DistInfo = DistInfo()) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) over every item of ``dataset``, each scored exactly once.

    Each rank scores its :func:`~evlp.dist.shard_range`; the counts are gathered, so every rank returns the
    metrics of the whole set. With fewer than 5 classes, top-5 is top-C (100).
    """
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    mine = torch.utils.data.Subset(dataset, list(shard_range(len(dataset), dist.rank, dist.world_size)))
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_images, pin_memory=torch.cuda.is_available())
    n = top1 = top5 = 0
    for batch in loader:
        logits = module(batch["pixels"].to(device, non_blocking=True)).float()  # (B, C)
        labels = batch["labels"].to(device)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]  # (B, k)
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
        n += labels.numel()
    module.train(was_training)
    counts = gather_objects((n, top1, top5), dist.world_size)
    n, top1, top5 = (sum(c[i] for c in counts) for i in range(3))
    if n == 0:
        return {"top1": 0.0, "top5": 0.0}
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# ---------------------------------------------------------------------- task
class ImageNetTask(TaskBase):
    """ImageNet-style classification for :func:`evlp.train.loop.fit`, validated on the val split every epoch.

    Args:
        cfg: the resolved config.
        encoder: an already loaded :class:`evlp.api.Encoder` (default: ``evlp.load(cfg.ckpt)`` on the CPU).

    Raises:
        CheckpointError, DataNotFoundError: missing checkpoint or images.
        ConfigError: a resolution or augmentation policy the tower or timm cannot take.
    """

    name = "imagenet"
    monitor = "top1"
    monitor_mode = "max"
    find_unused_parameters = False

    def __init__(self, cfg: ImageNetConfig, encoder: Any = None) -> None:
        from evlp.api import load

        self.cfg = cfg
        encoder = encoder or load(cfg.ckpt, device="cpu")
        data = (encoder.run_config or {}).get("data") or {}
        self.mean = tuple(float(v) for v in data.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in data.get("std", (0.229, 0.224, 0.225)))
        image_cfg = encoder.config.image
        self.img_size = cfg.img_size or image_cfg.img_size
        self.tower, image_cfg = resize_tower(encoder.model.image, image_cfg, self.img_size)
        self.model_config = dataclasses.replace(encoder.config, image=image_cfg)  # the text side is not kept
        self.train_transform, self.eval_transform = imagenet_transforms(cfg, self.img_size, self.mean, self.std)
        self.train_set = image_folder(cfg.data_root, cfg.dataset, "train", self.train_transform)
        self.classes: list[str] = list(self.train_set.classes)
        self.val_set = image_folder(cfg.data_root, cfg.dataset, "val", self.eval_transform, classes=self.classes)
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            empty = "train" if len(self.train_set) == 0 else "val"
            raise DataNotFoundError(f"{Path(cfg.data_root) / cfg.dataset / empty} holds no images "
                                    "(.jpg/.jpeg/.png/... files inside its class folders)")
        self.mixup: Any = None
        if cfg.mixup_active:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=len(self.classes))
        # layer decay needs trainable blocks: none in the linear probe, none in a tower without `blocks` (CNNs)
        self.layer_decay = cfg.layer_decay if not cfg.linear and tower_blocks(self.tower) is not None else None
        self.batches: EpochBatches | None = None
        self.skipped_samples = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        return ImageClassifier(self.tower, self.num_classes, self.cfg.pool, frozen=self.cfg.linear)

    def data_state(self) -> dict:
        return {"batches": self.batches.state_dict() if self.batches is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        pass  # config.yaml (from checkpoint_config) is all a classifier needs besides its weights

    def checkpoint_config(self) -> str:
        """The checkpoints' ``config.yaml``: the tower (at the fine-tuning resolution), this fine-tuning and the
        classifier's shape, classes and normalisation."""
        return checkpoint_config(self.model_config, self.cfg, classifier={
            "task": TASK, "num_classes": self.num_classes, "classes": self.classes, "pool": self.cfg.pool,
            "linear": self.cfg.linear, "layer_decay": self.layer_decay, "img_size": self.img_size,
            "eval_crop_ratio": self.cfg.eval_crop_ratio, "mean": list(self.mean), "std": list(self.std)})

    def param_groups(self, module: nn.Module, optim: Any) -> list[dict]:
        """Layer-wise LR decay groups (:func:`layer_decay_groups`); the linear probe has only the head's."""
        return layer_decay_groups(module, optim.weight_decay, self.cfg.layer_decay)

    # ------------------------------------------------------------------ data, loss, validation
    def samples_per_epoch(self) -> int:
        return len(self.train_set)

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        self.batches = EpochBatches(self.train_set, batch_size=self.cfg.train.batch_size, rank=dist.rank,
                                    world_size=dist.world_size, seed=self.cfg.train.seed, collate_fn=collate_images,
                                    num_workers=self.cfg.num_workers, resume=(data_state or {}).get("batches"))
        return iter(self.batches)

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        pixels, labels = batch["pixels"], batch["labels"]
        if self.mixup is not None:
            pixels, targets = self.mixup(pixels, labels)  # targets: (B, C) soft labels
            logits = module(pixels).float()  # (B, C)
            loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = module(pixels).float()  # (B, C)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.smoothing)
        # accuracy against the unmixed labels: a rough training signal only
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean().detach()}

    def evaluate(self, module: nn.Module, dist: DistInfo) -> dict[str, float]:
        """Top-1/top-5 (percent) over the whole val split, every image once; all ranks take part."""
        return topk_accuracy(module, self.val_set, batch_size=self.cfg.eval_batch_size,
                             num_workers=self.cfg.num_workers, dist=dist)


# ---------------------------------------------------------------------- checkpoints and final scores
@dataclass
class ImageClassifierCheckpoint:
    """A fine-tuned image classifier read back from disk, with its eval transform."""

    model: ImageClassifier
    transform: Any
    classes: list[str]
    config: dict[str, Any]
    path: Path


def load_image_classifier(ckpt: str | Path, device: str | None = None) -> ImageClassifierCheckpoint:
    """Load a checkpoint written by ImageNet fine-tuning (a run folder -> its best checkpoint).

    Raises:
        CheckpointError: not an ImageNet fine-tuning checkpoint, or its weights do not fit.
    """
    from timm.data import create_transform

    from evlp.models.image import build_image_tower

    path, raw, head = read_task_checkpoint(ckpt, lambda h: h.get("task") == TASK, "an ImageNet fine-tuning",
                                           "evlp finetune imagenet")
    if "model" not in raw:
        raise CheckpointError(f"{path / CONFIG} has no model section; fine-tune one with `evlp finetune imagenet`")
    model_cfg = from_dict(ModelConfig, raw["model"], where=str(path / CONFIG))
    tower = build_image_tower(dataclasses.replace(model_cfg.image, checkpoint=None))
    model = load_weights_into(
        ImageClassifier(tower, int(head["num_classes"]), str(head["pool"]), frozen=bool(head["linear"])), path,
        device=device)
    transform = create_transform(int(head["img_size"]), is_training=False, interpolation="bicubic",
                                 crop_pct=float(head["eval_crop_ratio"]), mean=tuple(head["mean"]),
                                 std=tuple(head["std"]))
    return ImageClassifierCheckpoint(model=model, transform=transform, classes=list(head["classes"]), config=raw,
                                     path=path)


def evaluate_imagenet(ckpt: str | Path, data_root: str | Path, *, dataset: str | None = None, split: str = "val",
                      out: str | Path | None = None, batch_size: int = 256, num_workers: int = 0,
                      device: str | None = None) -> EvalResult:
    """Top-1/top-5 of an ImageNet fine-tuning checkpoint on one split (every image once, one process).

    Args:
        ckpt: an ImageNet run folder (its best checkpoint) or checkpoint.
        data_root: the folder holding ``<dataset>/<split>/``.
        dataset: default: the dataset the checkpoint was fine-tuned on.
        split: the folder to score.
        out: write the result JSON here; None = no file.
        batch_size, num_workers: of the evaluation DataLoader.
        device: default CUDA when available.

    Raises:
        CheckpointError, DataNotFoundError: missing or unreadable inputs.
    """
    t0 = time.perf_counter()
    loaded = load_image_classifier(ckpt, device)
    ft = loaded.config.get("finetune") or {}
    head = loaded.config["classifier"]
    dataset = dataset or ft.get("dataset") or TASK
    images = image_folder(data_root, dataset, split, loaded.transform, classes=loaded.classes)
    metrics = topk_accuracy(loaded.model, images, batch_size=batch_size, num_workers=num_workers)
    state = read_json(loaded.path / "trainer_state.json", {}) or {}
    train, optim = ft.get("train") or {}, ft.get("optim") or {}
    linear = bool(head["linear"])
    protocol = {
        "mode": "linear probe" if linear else "fine-tune", "img_size": head["img_size"],
        "pool": head["pool"], "layer_decay": head.get("layer_decay"),
        "epochs": train.get("epochs"), "max_steps": train.get("max_steps"), "batch_size": train.get("batch_size"),
        "lr": optim.get("lr"), "seed": train.get("seed"), "step": state.get("step"),
        "auto_augment": ft.get("auto_augment"), "mixup": ft.get("mixup"), "cutmix": ft.get("cutmix"),
        "smoothing": ft.get("smoothing"), "eval_crop_ratio": head["eval_crop_ratio"],
        "metrics_over": f"every image of {split}/ once",
    }
    res = EvalResult(task=TASK, dataset=dataset, split=split, checkpoint=str(loaded.path), metrics=metrics,
                     protocol=protocol, config_hash=checkpoint_config_hash(loaded.path),
                     seconds=time.perf_counter() - t0,
                     details={"n_images": len(images), "n_classes": len(loaded.classes)})
    if out is not None:
        res.write(out)
    return res


def finetune_imagenet(cfg: ImageNetConfig, *, resume: bool = False, stop_after: int | None = None,
                      progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune (or linear-probe, ``cfg.linear``) the image tower on ``DATA/<dataset>/train``, then score the
    best checkpoint on ``val``.

    Writes ``RUN/config.yaml``, ``env.json``, ``metrics.jsonl``, ``checkpoints/`` (``best`` kept),
    ``eval/imagenet_<dataset>_val.json`` (linear probe: ``imagenet-linear_<dataset>_val.json``) and
    ``summary.json`` (``RUN`` = ``cfg.out``).

    Args:
        cfg: the resolved config.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        stop_after: end this invocation after that many optimizer steps (no final scores then).
        progress: receives progress on the main process.

    Raises:
        ConfigError: bad settings, or a run folder that conflicts with ``resume``.
        CheckpointError, DataNotFoundError: missing pretrained model or images.
    """
    run_dir = Path(cfg.out)
    with open_run(cfg, resume=resume, fixed=("dataset", "linear", "pool", "img_size")) as start:
        task = ImageNetTask(cfg)
        run = fit(task, cfg.optim, cfg.train, run_dir, resume_from=start.resume_from, stop_after=stop_after,
                  files={CONFIG: task.checkpoint_config()}, records=start.records, progress=progress)
        name = f"{TASK}-linear" if cfg.linear else TASK
        return finish_run(run, lambda ckpt: [evaluate_imagenet(
            ckpt, cfg.data_root, dataset=cfg.dataset, out=eval_path(run_dir, name, cfg.dataset, "val"),
            batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)])
