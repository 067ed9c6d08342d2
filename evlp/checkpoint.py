"""Run folders and checkpoints on disk.

Layout written by training (``evlp pretrain --out RUN``)::

    RUN/config.yaml                 resolved config of the run
    RUN/metrics.jsonl               one JSON line per logged step
    RUN/summary.json                final figures of the run
    RUN/checkpoints/latest          name of the newest complete checkpoint (replaced atomically)
    RUN/checkpoints/step_00001000/  one checkpoint, renamed into place only once complete:
        model.safetensors           weights of the training module (student under ``student.``)
        config.yaml  tokenizer/     what evaluation needs (with text_config.json: the text tower's
        text_config.json            HF architecture, so nothing is downloaded to rebuild it)
        optimizer.bin random_states_*.pkl scheduler.pt task_state.safetensors
        data_state_rank*.json       what exact resume needs
        trainer_state.json          written last: step, figures, and the size and sha256 of every other
                                    file (``files``), so a damaged checkpoint is recognised on load

A checkpoint of a sharded run (``train.strategy=fsdp`` on several processes) holds, instead of
``model.safetensors`` and ``optimizer.bin``, accelerate's sharded state: ``pytorch_model_fsdp_0/`` and
``optimizer_0/``, each a ``torch.distributed.checkpoint`` folder (``.metadata`` plus one ``__<rank>_0.distcp``
file per process), listed in ``trainer_state.json`` like every other file. :func:`read_weights` gathers the
model's shards into full tensors in one process, without a launcher, so evaluation, ``evlp.load`` and
``evlp export`` read either kind.

An exported model folder (``evlp export``) holds only ``model.safetensors`` (student keys, no prefix),
``config.yaml``, ``text_config.json`` and ``tokenizer/``. Everything here reads all three.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from evlp.errors import CheckpointError
from evlp.io import append_jsonl, read_json, sha256_of, write_atomic, write_json  # noqa: F401 - re-exported

CKPT_DIR = "checkpoints"
EVAL_DIR = "eval"
LATEST = "latest"
BEST = "best"
WEIGHTS = "model.safetensors"
SHARDED_WEIGHTS = "pytorch_model_fsdp_0"
"""accelerate's folder of the model's sharded state (``FSDP_MODEL_NAME`` + model index) in a sharded checkpoint."""
SHARDED_PREFIX = "model."
"""accelerate saves the sharded state as ``{"model": state_dict}``: its keys carry this prefix."""
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
TEXT_CONFIG = "text_config.json"
TRAINER_STATE = "trainer_state.json"
STUDENT_PREFIX = "student."


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step encoded in a checkpoint folder name (-1 when it has none)."""
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=step_of)


def file_manifest(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file below ``folder`` except ``trainer_state.json``."""
    root = Path(folder)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != TRAINER_STATE):
        out[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return out


def checkpoint_problem(ckpt: str | os.PathLike[str], *, deep: bool = True) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is complete.

    A checkpoint is complete when its ``trainer_state.json`` reads and every file it lists has the recorded
    size and (with ``deep``) sha256. Checkpoints written before the manifest existed are taken as complete.
    """
    path = Path(ckpt)
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE} is unreadable ({exc})"
    files = state.get("files") if isinstance(state, dict) else None
    for name, want in (files or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
        if deep and sha256_of(file) != want["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = False, deep: bool = True
                      ) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    With ``verify``, each candidate's files are checked against the sizes and (with ``deep``) sha256 recorded
    when it was written (:func:`checkpoint_problem`); a damaged one is reported by path (a warning) and the
    previous complete checkpoint is returned instead.
    """
    root = Path(run_dir) / CKPT_DIR
    found = list_checkpoints(run_dir)
    pointer = root / LATEST
    if pointer.is_file():  # normally the newest; the pointer wins if the listing disagrees
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / TRAINER_STATE).is_file():
            found = [p for p in found if p.name != candidate.name] + [candidate]
    for candidate in reversed(found):
        problem = checkpoint_problem(candidate, deep=deep) if verify else None
        if problem is None:
            return candidate
        warnings.warn(f"checkpoint {candidate} is damaged ({problem}); using the one before it", stacklevel=2)
    return None


def mark_latest(run_dir: str | os.PathLike[str], name: str) -> None:
    """Point ``RUN/checkpoints/latest`` at checkpoint ``name`` (atomic replace)."""
    write_atomic(Path(run_dir) / CKPT_DIR / LATEST, name + "\n")


def best_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the best validation metric (``RUN/checkpoints/best``), or None."""
    pointer = Path(run_dir) / CKPT_DIR / BEST
    if pointer.is_file():
        candidate = pointer.parent / pointer.read_text(encoding="utf-8").strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    return None


def mark_best(run_dir: str | os.PathLike[str], name: str) -> None:
    """Point ``RUN/checkpoints/best`` at checkpoint ``name`` (atomic replace)."""
    write_atomic(Path(run_dir) / CKPT_DIR / BEST, name + "\n")


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all) and the best one; returns what was deleted."""
    found = list_checkpoints(run_dir)
    if keep <= 0 or len(found) <= keep:
        return []
    best = best_checkpoint(run_dir)
    doomed = [p for p in found[:-keep] if best is None or p.name != best.name]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Resolve ``--ckpt``: a run folder (-> its best checkpoint if it validated, else its latest), a
    checkpoint or an exported model.

    Raises:
        CheckpointError: nothing loadable is there.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass a run folder (evlp pretrain --out) "
                              "or an exported model folder")
    if has_weights(p) and (p / CONFIG).is_file():
        return p
    if (p / CKPT_DIR).is_dir():
        latest = best_checkpoint(p) or latest_checkpoint(p, verify=True, deep=False)
        if latest is not None:
            return latest
        raise CheckpointError(f"run {p} has no complete checkpoint yet; resume it with "
                              f"`evlp pretrain --out {p} --resume` or wait for its first checkpoint")
    raise CheckpointError(f"{p} is neither a run folder nor a checkpoint (expected {CKPT_DIR}/, or {WEIGHTS} "
                          f"or {SHARDED_WEIGHTS}/ + {CONFIG})")


def run_of(ckpt: str | os.PathLike[str]) -> Path:
    """The run folder a checkpoint belongs to (an exported model folder is its own)."""
    path = Path(ckpt)
    return path.parent.parent if path.parent.name == CKPT_DIR else path


def eval_path(run_dir: str | os.PathLike[str], task: str, dataset: str | None = None, split: str | None = None
              ) -> Path:
    """Where a run's evaluation result is written, the one rule for every command:
    ``RUN/eval/<task>_<dataset>_<split>.json``, or ``RUN/eval/<task>.json`` for the validation a pretraining
    run scores itself with."""
    name = "_".join(p for p in (task, dataset, split) if p)
    return Path(run_dir) / EVAL_DIR / f"{name}.json"


def has_weights(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds model weights: ``model.safetensors`` or a sharded run's ``pytorch_model_fsdp_0/``."""
    path = Path(folder)
    return (path / WEIGHTS).is_file() or (path / SHARDED_WEIGHTS).is_dir()


def read_weights(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The full state dict of a checkpoint or export: ``model.safetensors``, else the shards of
    ``pytorch_model_fsdp_0/`` gathered (:func:`gather_sharded_weights`).

    Raises:
        CheckpointError: no weights, or unreadable ones.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / WEIGHTS).is_file() and (path / SHARDED_WEIGHTS).is_dir():
        return gather_sharded_weights(path / SHARDED_WEIGHTS)
    try:
        return load_file(str(path / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read weights {path / WEIGHTS}: {exc}") from None


def gather_sharded_weights(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Full CPU tensors of a ``torch.distributed.checkpoint`` folder of model weights, read in this process.

    Every process of the sharded run wrote its pieces of each tensor; the folder's ``.metadata`` records each
    tensor's full shape and dtype and where its pieces lie. Full-size tensors are allocated from it and filled by
    ``torch.distributed.checkpoint.load`` without a process group (``no_dist``), so no launcher is needed and
    the number of processes that wrote it does not matter.

    Raises:
        CheckpointError: a missing or unreadable piece (the message names the folder).
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(folder)
    try:
        reader = dcp.FileSystemReader(str(path))
        tensors = {key: meta for key, meta in reader.read_metadata().state_dict_metadata.items()
                   if isinstance(meta, TensorStorageMetadata)}
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in tensors.items()}
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": the point of no_dist
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP wraps a failed read in a BaseException of its own
        cause = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) and exc.failures else exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CheckpointError(f"cannot gather the sharded weights in {path} ({first}); the checkpoint is "
                              "incomplete or damaged: use an earlier one (a run folder resumes from the newest "
                              "intact one)") from exc
    return {k.removeprefix(SHARDED_PREFIX): v for k, v in state.items()}


def load_student_state_dict(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The student's weights from a checkpoint (sharded or not) or export (training-only keys dropped, prefix
    removed).

    Raises:
        CheckpointError: the weights are missing or unreadable.
    """
    state = read_weights(ckpt)
    if any(k.startswith(STUDENT_PREFIX) for k in state):
        state = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    return state


def export_model(ckpt: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a standalone model folder: student weights (no optimizer, teacher or training-only state),
    the run's config, the text tower's HF config and the tokenizer. :func:`evlp.load` reads it.

    The folder is assembled under a temporary name and renamed into place.

    Raises:
        CheckpointError: ``ckpt`` is not loadable, or ``out`` exists and is not empty.
    """
    from safetensors.torch import save_file

    src = find_checkpoint(ckpt)
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise CheckpointError(f"export folder {dest} exists and is not empty; choose a new --out")
    state = {k: v.contiguous() for k, v in load_student_state_dict(src).items()}
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "source": str(src)})
    shutil.copy2(src / CONFIG, tmp / CONFIG)
    for name in (TEXT_CONFIG,):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if (src / TOKENIZER).is_dir():
        shutil.copytree(src / TOKENIZER, tmp / TOKENIZER)
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    return dest


def load_weights_into(model: Any, path: str | os.PathLike[str], state: dict[str, Any] | None = None,
                      device: str | None = None) -> Any:
    """Load a checkpoint's weights into ``model`` strictly, put it in eval mode on ``device`` and return it.

    Args:
        model: the module the checkpoint's config describes.
        path: the checkpoint folder (its weights are read, gathered if sharded, unless ``state`` is given).
        state: weights already read (e.g. the student's, prefix removed).
        device: default: CUDA when available.

    Raises:
        CheckpointError: missing or unexpected keys (the first few of each are named).
    """
    import torch

    path = Path(path)
    state = state if state is not None else read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit its config: {len(missing)} missing (first: "
                              f"{missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
    return model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def read_task_checkpoint(ckpt: str | os.PathLike[str], accepts: Any, what: str, command: str
                         ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Resolve a fine-tuning checkpoint and read its config: ``(folder, config, classifier section)``.

    Args:
        ckpt: a run folder (its best checkpoint) or a checkpoint.
        accepts: predicate on the config's ``classifier`` section (is it this task's?).
        what: the task's name in messages ("a GLUE fine-tuning").
        command: the command that writes such checkpoints (``evlp finetune glue``).

    Raises:
        CheckpointError: no checkpoint, or one of another task.
    """
    from evlp.config.loader import read_yaml

    path = find_checkpoint(ckpt)
    raw = read_yaml(path / CONFIG)
    head = raw.get("classifier")
    if not isinstance(head, dict) or not accepts(head):
        raise CheckpointError(f"{path} is not {what} checkpoint (its {CONFIG} has no matching classifier "
                              f"section); fine-tune one with `{command}`")
    return path, raw, head
