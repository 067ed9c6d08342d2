"""The authors' released EVE checkpoints (github ssyze/EVE) as evlp ``eve`` models.

The release (README: a pretrained EVE-Base/Large and the fine-tuned retrieval models, OneDrive links) holds the
state dict of ``models/model_retrieval_beit.py``'s ``BEiT`` (``{"model": state_dict, "config": ...}``): the
``MultiwayTransformer`` under ``backbone.`` and the heads beside it. :func:`convert_eve` renames every tensor to
:class:`evlp.models.eve.EVE`'s names (the table in that module's docstring) with the conventions of
:mod:`evlp.models.convert`: tensors only (``weights_only``), every source key either mapped or listed here as
ignored with its reason, an unknown key an error that names it, and a strict load
(:func:`~evlp.models.convert.load_converted`) whose errors name the missing or unexpected keys.

* **Experts.** ``...mlp_moe.moe.experts.experts.<e>.fc{1,2}`` (one ``nn.Linear`` per expert) are stacked into
  evlp's ``moe.experts.fc{1,2}`` (E, out, in) / (E, out).
* **Temperature.** ``itc_temp`` is the temperature T (logits = sim / T); evlp stores ``log(1 / T)``.
* **Heads.** Chosen as the released fine-tuning's ``load_pretrain`` (``load_head``) does: ``itc_*`` heads,
  overridden by ``mitc_*`` (the pretraining's names) and then by ``itc_vl_*``; ``mitm_head`` over ``itm_head``.
  The superseded ones are ignored. A head the file lacks (a pretrained file may hold no ITM head) starts from
  evlp's fresh init, as in the released code, whose fine-tuning load is not strict; the backbone must be complete.
* **Ignored.** ``backbone.position_ids_*`` (``arange`` buffers, checked), ``backbone.mask_embed_vision`` (the
  pretraining's mask token: evlp's encoder never sees masked patches). evlp's own pretraining heads (``mlm_head``,
  ``decoder``) are not in the release and keep their fresh init.

:func:`import_eve` writes a converted file as an ordinary evlp model folder (what ``evlp export`` writes), so
``evlp eval retrieval --ckpt`` and ``evlp finetune retrieval --ckpt`` take it. Its config is the preset's
(``eve_base``) with the sizes the tensors fix (image size and patch, vocabulary, text positions, width, depth,
FFN width, experts, MoE layers) read from the file; the head count is not in any shape (it comes from the preset
or ``eve.num_heads=``). The released MoE also feeds the type-shifted token to its experts, so
``model.eve.type_vector_to_experts`` is set. Images are normalised with mean = std = 0.5, as the release does.
Where evlp's forward still differs from the released one (``evlp.models.eve``): evaluation routes each token's
second expert by the next highest gate (the release draws it with Gumbel noise even in evaluation) and, with
``eval_capacity_factor: null``, drops no token.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evlp.errors import CheckpointError, ConfigError
from evlp.models.convert import load_converted, load_foreign_state_dict

__all__ = ["EVE_RELEASE", "EveConversion", "EveImport", "convert_eve", "import_eve", "load_eve_release",
           "release_sizes"]

EVE_RELEASE = "https://github.com/ssyze/EVE#pre-trained-and-fine-tuned-models"
EVE_MEAN = EVE_STD = (0.5, 0.5, 0.5)

_TOP = {
    "backbone.patch_embed.weight": "embed.patch_embed.weight",
    "backbone.patch_embed.bias": "embed.patch_embed.bias",
    "backbone.class_embedding_vision": "embed.cls_token",
    "backbone.pos_embed_vision": "embed.image_pos_embed",
    "backbone.type_embed_vision": "embed.image_type",
    "backbone.word_embedding.weight": "embed.word_embeddings.weight",
    "backbone.layer_norm_text.weight": "embed.text_norm.weight",
    "backbone.layer_norm_text.bias": "embed.text_norm.bias",
    "backbone.pos_embed_text": "embed.text_pos_embed",
    "backbone.type_embed_text": "embed.text_type",
    "backbone.pre_layrnorm.weight": "pre_norm.weight",
    "backbone.pre_layrnorm.bias": "pre_norm.bias",
    "backbone.norm.weight": "norm.weight",
    "backbone.norm.bias": "norm.bias",
}
_LAYER_PREFIXES = {  # inside backbone.encoder.layers.<i>.
    "attn.": "attn.", "norm1.": "norm1.", "norm2_imag.": "norm2_image.", "mlp_imag.": "mlp_image.",
    "norm2_text.": "norm2_text.", "mlp_text.": "mlp_text.", "norm2_vl.": "norm2.",
    "mlp_moe.moe.gate.wg.": "moe.router.",
}
_LAYER_NAMES = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma", "mlp_moe.moe.vision_embed": "moe.image_type",
                "mlp_moe.moe.text_embed": "moe.text_type"}
_IGNORED = {
    "backbone.position_ids_vision": "an arange buffer (checked); evlp indexes its position table directly",
    "backbone.position_ids_text": "an arange buffer (checked); evlp indexes its position table directly",
    "backbone.mask_embed_vision": "the pretraining's mask token; evlp's encoder never sees masked patches (MAE)",
}
# evlp name -> released sources, lowest precedence first (the released load_pretrain's order)
_HEADS = {
    "image_proj.weight": ("itc_vision_proj_head.weight", "mitc_vision_proj_head.weight",
                          "itc_vl_vision_proj_head.weight"),
    "text_proj.weight": ("itc_text_proj_head.weight", "mitc_text_proj_head.weight", "itc_vl_text_proj_head.weight"),
    "logit_scales": ("itc_temp", "mitc_temp"),
    "itm_head.weight": ("itm_head.weight", "mitm_head.weight"),
    "itm_head.bias": ("itm_head.bias", "mitm_head.bias"),
}
_EVLP_ONLY = ("mlm_head.", "decoder.")
_LAYER_RE = re.compile(r"^backbone\.encoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp_moe\.moe\.experts\.experts\.(\d+)\.(fc[12])\.(weight|bias)$")


@dataclass
class EveConversion:
    """:func:`convert_eve`'s result: ``state`` in evlp's names; ``ignored`` released key -> why it is not loaded;
    ``fresh`` evlp keys the file does not have (heads), which keep the model's init."""

    state: dict[str, Tensor]
    ignored: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)


def _check_arange(key: str, value: Tensor) -> None:
    flat = value.reshape(-1)
    if not torch.equal(flat.long(), torch.arange(flat.numel())):
        raise CheckpointError(f"{key} is not 0..{flat.numel() - 1} in order; this is not a released EVE checkpoint "
                              "layout evlp can convert (its positions are permuted)")


def _layer_name(rest: str) -> str | None:
    if rest in _LAYER_NAMES:
        return _LAYER_NAMES[rest]
    for old, new in _LAYER_PREFIXES.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def _stack_experts(layer: int, parts: dict[tuple[int, str, str], Tensor]) -> dict[str, Tensor]:
    """One layer's per-expert ``fc{1,2}.{weight,bias}`` stacked on a new leading expert dimension."""
    experts = sorted({e for e, _, _ in parts})
    if experts != list(range(len(experts))):
        raise CheckpointError(f"backbone.encoder.layers.{layer} has experts {experts}; expected 0..{len(experts) - 1}")
    out = {}
    for fc in ("fc1", "fc2"):
        for kind in ("weight", "bias"):
            missing = [e for e in experts if (e, fc, kind) not in parts]
            if missing:
                raise CheckpointError(f"backbone.encoder.layers.{layer}.mlp_moe.moe.experts.experts.{missing[0]}."
                                      f"{fc}.{kind} is missing; the file is incomplete")
            out[f"blocks.{layer}.moe.experts.{fc}.{kind}"] = torch.stack([parts[(e, fc, kind)] for e in experts])
    return out


def convert_eve(state: Mapping[str, Tensor]) -> EveConversion:
    """Released EVE tensors -> :class:`evlp.models.eve.EVE` names (module doc).

    Args:
        state: the checkpoint's ``model`` dict (:func:`evlp.models.convert.load_foreign_state_dict`).

    Returns:
        the converted tensors and the ignored keys with their reasons (``fresh`` is filled by
        :func:`load_eve_release`).

    Raises:
        CheckpointError: keys that are neither mapped nor known to be ignorable (the first few named), an
            incomplete expert set, a non-positive temperature.
    """
    out: dict[str, Tensor] = {}
    ignored: dict[str, str] = {}
    experts: dict[int, dict[tuple[int, str, str], Tensor]] = {}
    unknown: list[str] = []
    head_sources = {src for sources in _HEADS.values() for src in sources}
    for key, value in state.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _IGNORED:
            if key.startswith("backbone.position_ids"):
                _check_arange(key, value)
            ignored[key] = _IGNORED[key]
        elif key in head_sources:
            continue  # chosen below, by precedence
        elif (m := _LAYER_RE.match(key)) is not None:
            layer, rest = int(m.group(1)), m.group(2)
            if (e := _EXPERT_RE.match(rest)) is not None:
                experts.setdefault(layer, {})[(int(e.group(1)), e.group(2), e.group(3))] = value
            elif (name := _layer_name(rest)) is not None:
                out[f"blocks.{layer}.{name}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensors of the file have no place in evlp's EVE and are not known to "
                              f"be ignorable: {unknown[:5]}; this is not the released EVE layout ({EVE_RELEASE})")
    for layer, parts in experts.items():
        out.update(_stack_experts(layer, parts))
    for name, sources in _HEADS.items():
        present = [s for s in sources if s in state]
        if not present:
            continue
        chosen = present[-1]
        for s in present[:-1]:
            ignored[s] = f"superseded by {chosen} (the released fine-tuning's load_pretrain order)"
        value = state[chosen]
        if name == "logit_scales":
            temp = float(value.reshape(-1)[0])
            if not temp > 0:
                raise CheckpointError(f"{chosen} is {temp}; a temperature must be > 0")
            value = torch.full((1,), math.log(1.0 / temp), dtype=torch.float32)
        out[name] = value
    return EveConversion(state=out, ignored=ignored)


def load_eve_release(model: nn.Module, state: Mapping[str, Tensor], source: str) -> EveConversion:
    """Convert ``state`` and load it strictly into ``model`` (an :class:`evlp.models.eve.EVE`); evlp's own
    pretraining heads and any head the file lacks keep the model's values (listed in ``fresh``).

    Raises:
        CheckpointError: see :func:`convert_eve`, and :func:`~evlp.models.convert.load_converted` (missing or
            unexpected keys, shapes that differ from the configured sizes).
    """
    conv = convert_eve(state)
    mine = model.state_dict()
    for key, value in mine.items():
        if key not in conv.state and (key.startswith(_EVLP_ONLY) or key in _HEADS):
            conv.state[key] = value
            conv.fresh.append(key)
    load_converted(model, conv.state, "eve", source)
    return conv


def release_sizes(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The model settings the released tensors' shapes fix, as nested overrides of a preset (module doc).

    Raises:
        CheckpointError: a tensor the sizes are read from is missing.
    """
    need = ("backbone.patch_embed.weight", "backbone.pos_embed_vision", "backbone.word_embedding.weight",
            "backbone.pos_embed_text")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{missing[0]} is not in the file; this is not the released EVE layout ({EVE_RELEASE})")
    width, _, patch, _ = state["backbone.patch_embed.weight"].shape
    grid = math.isqrt(state["backbone.pos_embed_vision"].shape[0] - 1)
    layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    moe = sorted({int(m.group(1)) for k in state if (m := _LAYER_RE.match(k)) and ".mlp_moe." in k})
    experts = {int(e.group(1)) for k in state if (m := _LAYER_RE.match(k)) and (e := _EXPERT_RE.match(m.group(2)))}
    fc1 = next((v for k, v in state.items() if k.startswith("backbone.") and k.endswith(".fc1.weight")), None)
    eve: dict[str, Any] = {"width": int(width), "depth": len(layers), "moe_layers": moe,
                           "type_vector_to_experts": any(k.endswith(".mlp_moe.moe.vision_embed") for k in state)}
    if experts:
        eve["num_experts"] = len(experts)
    if fc1 is not None:
        eve["mlp_ratio"] = fc1.shape[0] / width
    return {"image": {"img_size": int(grid * patch), "patch_size": int(patch)},
            "text": {"vocab_size": int(state["backbone.word_embedding.weight"].shape[0]),
                     "max_position": int(state["backbone.pos_embed_text"].shape[0])},
            "eve": eve}


@dataclass
class EveImport:
    """What :func:`import_eve` wrote: the model folder, its model config and the conversion's notes."""

    path: Path
    config: Any
    ignored: dict[str, str]
    fresh: list[str]


def import_eve(path: str | os.PathLike[str], out: str | os.PathLike[str], *, tokenizer: str,
               model: str = "eve_base", overrides: Mapping[str, Any] | None = None) -> EveImport:
    """Convert a released EVE checkpoint into an evlp model folder (``model.safetensors``, ``config.yaml``,
    ``text_config.json``, ``tokenizer/``) that ``evlp.load``, ``evlp eval retrieval`` and ``evlp finetune``
    read. The folder is assembled under a temporary name and renamed into place.

    Args:
        path: the released file (``torch.save`` or safetensors; tensors only).
        out: the new model folder (must not exist, or be empty).
        tokenizer: the text tokenizer the weights were trained with (the release's BPE tokenizer folder; a
            built-in name for tests); saved into the folder.
        model: the preset the settings start from (``eve_base``).
        overrides: nested model settings on top (e.g. ``{"eve": {"num_heads": 16}}`` for EVE-Large).

    Raises:
        CheckpointError: an unreadable or foreign file, or tensors that do not fit (named).
        ConfigError: settings that do not validate, or a tokenizer larger than the vocabulary.
    """
    from safetensors.torch import save_file

    from evlp.checkpoint import CONFIG, TEXT_CONFIG, TOKENIZER, WEIGHTS, write_json
    from evlp.config.loader import dump_yaml, merge, to_dict
    from evlp.data.tokenize import build_caption_tokenizer
    from evlp.models import build_model, model_config

    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise CheckpointError(f"model folder {dest} exists and is not empty; choose a new --out")
    state = load_foreign_state_dict(path)
    settings = merge(merge(release_sizes(state), {"text": {"tokenizer": tokenizer}}), dict(overrides or {}))
    cfg = model_config(model, **settings)
    if cfg.arch != "eve":
        raise ConfigError(f"--model {model} is a {cfg.arch} model; converted EVE weights need an eve preset "
                          "(eve_base)")
    problems = cfg.validate()
    if problems:
        raise ConfigError(f"the converted EVE's settings do not validate: {'; '.join(problems)}")
    tok = build_caption_tokenizer(tokenizer, cfg.text.max_length, cfg.text.vocab_size)
    eve = build_model(cfg)
    conv = load_eve_release(eve, state, str(path))

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in eve.state_dict().items()}, str(tmp / WEIGHTS),
              metadata={"format": "pt", "source": str(path), "converter": "eve"})
    (tmp / CONFIG).write_text(dump_yaml({"model": to_dict(cfg), "data": {"mean": list(EVE_MEAN),
                                                                          "std": list(EVE_STD)}}), encoding="utf-8")
    write_json(tmp / TEXT_CONFIG, eve.text_config())
    tok.save(tmp / TOKENIZER)
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    return EveImport(path=dest, config=cfg, ignored=conv.ignored, fresh=conv.fresh)
