"""Load the original pretrained checkpoints (fairseq data2vec 2.0, unilm BEiTv2) into evlp's modules (the released
EVE checkpoints: :mod:`evlp.models.convert_eve`, with the same conventions).

Each converter renames the original keys to the module's names and drops what the module does not
have (decoders, EMA copies, MIM heads); :func:`load_converted` then loads strictly, so a checkpoint
that does not fit the configured sizes fails with one line naming the first offending key. Every
``torch.save`` file evlp reads goes through :func:`load_tensors`, which loads tensors only: a file that
pickles code or other Python objects is refused (naming the global that blocked it), never unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evlp.errors import CheckpointError

DATA2VEC2_URL = "https://dl.fbaipublicfiles.com/fairseq/data2vec2/base_imagenet.pt"
BEITV2_URL = "https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth"

_WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
_D2V_PREFIX = "modality_encoders.IMAGE."
_D2V_RENAMES = {
    "local_encoder.": "patch_embed.",
    "extra_tokens": "cls_token",
    "fixed_positional_encoder.positions": "pos_embed",
    "context_encoder.norm.": "norm_pre.",
}
_BEIT_DROP_PREFIXES = ("mask_token", "lm_head.", "cls_pt_", "norm.")
_CONFIG_KEYS = {"data2vec2": "model.image", "beitv2": "model.teacher", "eve": "model.eve"}  # eve: convert_eve.py
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def load_foreign_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` file (``weights_only=True``) or a ``.safetensors`` file.

    Unwraps ``model`` / ``module`` / ``state_dict`` / ``model_state`` nesting (as fairseq, unilm and
    trainers save it) and a ``module.`` prefix that every key carries (DDP).

    Args:
        path: the checkpoint file.

    Returns:
        parameter name -> tensor.

    Raises:
        CheckpointError: the file is missing or unreadable, holds code or pickled objects (see
            :func:`load_tensors`), or holds no flat name -> tensor mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found — check the path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{p} is not a readable safetensors file ({exc}); re-download it") from None
    return _unwrap(load_tensors(p), p)


def load_tensors(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of a file that holds only tensors (and plain containers, numbers and strings).

    The file is never unpickled beyond that (``weights_only=True``): code or pickled Python objects in it
    are refused, not run. Every ``torch.save`` file evlp reads goes through here.

    Raises:
        CheckpointError: the file holds code or pickled objects (naming the first one and what to do
            instead), or is not a readable torch file.
    """
    p = Path(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if blocked is None:  # not a pickle the tensor-only reader understands; torch's text is not shown
            operand = re.search(r"Unsupported operand \d+", str(exc))
            why = operand.group(0).lower() if operand else "not a torch tensor file"
            raise CheckpointError(f"{p} is not a readable torch checkpoint ({why}); re-download it, or get "
                                  "the safetensors release of these weights") from None
        raise CheckpointError(
            f"{p} holds code or pickled Python objects (first: {blocked.group(1)}), which evlp never "
            "unpickles: it loads only tensors; get the safetensors or plain state-dict release of these "
            "weights, or re-save only the tensors (a name -> tensor dict) in an environment you trust "
            "and point evlp at that file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p} is not a readable torch checkpoint ({_first_line(exc)}); "
                              "re-download it") from None


def convert_data2vec2_image(state: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """fairseq data2vec 2.0 image weights -> :class:`~evlp.models.image.Data2Vec2ImageTower` names,
    keeping the first ``depth`` blocks.

    Drops every ``decoder`` and ``_ema`` key; strips ``modality_encoders.IMAGE.``; renames
    ``local_encoder`` -> ``patch_embed``, ``extra_tokens`` -> ``cls_token``,
    ``fixed_positional_encoder.positions`` -> ``pos_embed``, ``context_encoder.norm`` -> ``norm_pre``.
    Unknown keys pass through unchanged, so a strict load reports them.

    Args:
        state: the checkpoint's ``model`` dict (see :func:`load_foreign_state_dict`).
        depth: blocks to keep.

    Raises:
        CheckpointError: ``depth`` exceeds the checkpoint's blocks.
    """
    _check_depth(_count_blocks(state), depth, "the checkpoint")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if "decoder" in key or "_ema" in key:
            continue
        m = _BLOCK_RE.match(key)
        if m is not None and int(m.group(1)) >= depth:
            continue
        name = key
        if key.startswith(_D2V_PREFIX):  # only names under the image encoder are renamed
            name = key[len(_D2V_PREFIX):]
            for old, new in _D2V_RENAMES.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
        out[name] = value
    return out


def convert_beitv2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """unilm BEiTv2 pretraining weights -> timm ``Beit`` names (as built by
    :func:`~evlp.models.teacher.build_beit`).

    Drops ``mask_token``, ``lm_head.*``, the pretraining-only ``cls_pt_*`` blocks, the final ``norm.*``
    (the teacher's target is the un-normalised CLS of the last block) and every
    ``relative_position_index`` (the module builds its own). All other names already match timm's.

    Args:
        state: the checkpoint's ``model`` dict (see :func:`load_foreign_state_dict`).
    """
    return {k: v for k, v in state.items()
            if not k.startswith(_BEIT_DROP_PREFIXES) and not k.endswith("relative_position_index")}


def load_converted(module: nn.Module, state: Mapping[str, Tensor], converter: str, source: str) -> None:
    """Load an already converted ``state`` into ``module`` strictly, with one-line errors.

    Args:
        module: the target module.
        state: converted name -> tensor mapping.
        converter: the converter's name (``data2vec2``, ``beitv2``, ``timm``), used in messages.
        source: where ``state`` came from (the file), used in messages.

    Raises:
        CheckpointError: keys missing or unexpected, or a shape that differs from the module's.
    """
    expected = module.state_dict()
    cfg = _CONFIG_KEYS.get(converter)
    settings = f"the {cfg}.* settings" if cfg else "the model name"
    sizes = f"{cfg}.width/depth/num_heads/patch_size/img_size" if cfg else "the model's sizes"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"the {converter} converter's output from {source} does not fit the model: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}; "
            f"check that {settings} match the checkpoint")
    for key, param in expected.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{key} has shape {tuple(state[key].shape)} in {source} but {tuple(param.shape)} in the "
                f"model ({converter} converter); set {sizes} to the checkpoint's")
    with torch.no_grad():
        module.load_state_dict(dict(state), strict=True)


def load_data2vec2_image(tower: nn.Module, path: str | os.PathLike[str], depth: int) -> None:
    """Load fairseq's data2vec 2.0 image checkpoint (``base_imagenet.pt``, from
    https://dl.fbaipublicfiles.com/fairseq/data2vec2/base_imagenet.pt) into a
    :class:`~evlp.models.image.Data2Vec2ImageTower`, keeping its first ``depth`` blocks.

    Raises:
        CheckpointError: the file is missing or unsafe to load, or does not match the tower.
    """
    _require_file(path, "data2vec 2.0 image", DATA2VEC2_URL, "model.image.checkpoint")
    state = load_foreign_state_dict(path)
    _check_depth(_count_blocks(state), depth, str(path))
    load_converted(tower, convert_data2vec2_image(state, depth), "data2vec2", str(path))


def load_beitv2_teacher(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load unilm's BEiTv2 pretraining checkpoint (``beitv2_base_patch16_224_pt1k.pth``, from
    https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth) into
    the timm ``Beit`` of :func:`~evlp.models.teacher.build_beit` (the teacher's ``.model``).

    The checkpoint's ``relative_position_index`` buffers are not loaded, but compared with the ones the
    module built, so a different patch grid is caught.

    Raises:
        CheckpointError: the file is missing or unsafe to load, or does not match the model.
    """
    _require_file(path, "BEiTv2 pretraining", BEITV2_URL, "model.teacher.checkpoint")
    state = load_foreign_state_dict(path)
    buffers = dict(model.named_buffers())
    for key, value in state.items():
        if key.endswith("relative_position_index") and key in buffers:
            mine = buffers[key]
            if tuple(value.shape) != tuple(mine.shape) or not torch.equal(value.to(mine.dtype), mine.cpu()):
                raise CheckpointError(
                    f"{key} in {path} (shape {tuple(value.shape)}) differs from the model's "
                    f"{tuple(mine.shape)}; set model.teacher.img_size/patch_size to the checkpoint's")
    load_converted(model, convert_beitv2(state), "beitv2", str(path))


def load_timm_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a timm state-dict file into a timm ``model`` built without a classifier: classifier keys
    that the model does not have (its ``pretrained_cfg['classifier']``) are dropped; everything else
    loads strictly.

    Raises:
        CheckpointError: the file is missing or unsafe to load, or does not match the model.
    """
    state = load_foreign_state_dict(path)
    expected = model.state_dict()
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items()
             if k in expected or not any(k.startswith(h + ".") for h in heads)}
    load_converted(model, state, "timm", str(path))


def _require_file(path: str | os.PathLike[str], what: str, url: str, setting: str) -> None:
    if not Path(path).is_file():
        raise CheckpointError(f"{what} checkpoint {path} not found — download it from {url} and point "
                              f"{setting} at it")


def _count_blocks(state: Mapping[str, Tensor]) -> int:
    ids = [int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))]
    return max(ids) + 1 if ids else 0


def _check_depth(available: int, depth: int, source: str) -> None:
    if depth > available:
        raise CheckpointError(f"depth {depth} asks for more blocks than {source} has ({available}); "
                              f"set model.image.depth to at most {available}")


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__}); "
                              "save the model's state_dict() instead")
    bad = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path} entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor; "
                              "save the model's state_dict() instead")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text or "weights_only" in text[0]:  # torch's advice to load unsafely is never passed on
        return type(exc).__name__
    return text[0][:200]
