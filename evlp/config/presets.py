"""Named model presets: deltas over :class:`~evlp.config.schema.ModelConfig`'s defaults (the paper's sizes).

``model.name`` in a config picks one; the config's other ``model.*`` keys then adjust it. The torch
builders that turn a preset into modules live in :mod:`evlp.models`.
"""

from __future__ import annotations

from typing import Any

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's S-SMKE: 6 BERT-base layers + 6 Data2Vec2 ViT-B/16 layers + one shared block,
    # BEiTv2-B/16 teacher. 117,318,146 student parameters.
    "s_smke": {},
    # A tiny S-SMKE for tests and the quickstart: width 64, 2+2 layers, 64 px, a small vocabulary.
    "s_smke_tiny": {
        "text": {"name_or_path": None, "tokenizer": "tiny", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                 "intermediate_size": 256, "vocab_size": 512, "max_position": 64, "max_length": 24},
        "image": {"checkpoint": None, "img_size": 64, "patch_size": 8, "width": 64, "depth": 2, "num_heads": 4},
        "shared": {"width": 64, "num_heads": 4},
        "teacher": {"checkpoint": None, "img_size": 64, "patch_size": 8, "width": 64, "depth": 2, "num_heads": 4},
    },
    # ZeroVL (Cui et al., ECCV 2022): a dual encoder of the whole bert-base-uncased and timm's ImageNet-21k
    # ViT-B/16 (hub weights), each CLS projected to 512 without bias, a constant temperature of 0.02.
    "zerovl": {
        "arch": "dual",
        "text": {"num_layers": 12, "max_length": 25},
        "image": {"name": "vit_base_patch16_224.augreg_in21k", "checkpoint": "hub", "depth": 12},
        "teacher": {"enabled": False},
        "init_temperature": 0.02,
        "learnable_temperature": False,
    },
    # A tiny ZeroVL dual encoder for tests: s_smke_tiny's towers, random init, embeddings of width 32.
    "zerovl_tiny": {
        "arch": "dual",
        "text": {"name_or_path": None, "tokenizer": "tiny", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                 "intermediate_size": 256, "vocab_size": 512, "max_position": 64, "max_length": 24},
        "image": {"checkpoint": None, "img_size": 64, "patch_size": 8, "width": 64, "depth": 2, "num_heads": 4},
        "teacher": {"enabled": False},
        "embed_dim": 32,
        "init_temperature": 0.02,
        "learnable_temperature": False,
    },
    # EVE-Base as released (github ssyze/EVE): one shared 12-layer encoder of width 768, modality FFNs, a 32-expert
    # top-2 MoE in blocks 10-11 (model.eve's defaults); 224 px, patch 16; a 64k text vocabulary, 196 text
    # positions, 40-token captions. The released BPE tokenizer is not on the hub: `minilm` (uncased WordPiece)
    # stands in; point model.text.tokenizer at the released one to use converted weights.
    "eve_base": {
        "arch": "eve",
        "text": {"name_or_path": None, "tokenizer": "minilm", "vocab_size": 64000, "max_position": 196,
                 "max_length": 40},
        "image": {"checkpoint": None},
        "teacher": {"enabled": False},
    },
    # A tiny EVE for tests: width 64, 4 blocks (MoE in the top two, 4 experts), 64 px, the small vocabulary.
    "eve_tiny": {
        "arch": "eve",
        "text": {"name_or_path": None, "tokenizer": "tiny", "vocab_size": 512, "max_position": 64, "max_length": 24},
        "image": {"checkpoint": None, "img_size": 64, "patch_size": 8},
        "shared": {"width": 64, "num_heads": 4},
        "teacher": {"enabled": False},
        "eve": {"width": 64, "depth": 4, "num_heads": 4, "moe_layers": [2, 3], "num_experts": 4,
                "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 4},
    },
}

MODEL_DESCRIPTIONS: dict[str, str] = {
    "s_smke": "S-SMKE (paper): BERT-base 6L + Data2Vec2 ViT-B/16 6L + shared block, BEiTv2-B teacher",
    "s_smke_tiny": "tiny S-SMKE for tests and the quickstart (width 64, 2+2 layers, 64 px)",
    "zerovl": "ZeroVL dual encoder: BERT-base 12L + ViT-B/16 in21k, 512-d projections, fixed temperature 0.02",
    "zerovl_tiny": "tiny ZeroVL dual encoder for tests (width 64, 2+2 layers, 64 px, 32-d embeddings)",
    "eve_base": "EVE-Base (released): one shared 12-layer encoder, modality FFNs, 32-expert top-2 MoE in blocks 10-11",
    "eve_tiny": "tiny EVE for tests (width 64, 4 blocks, 4 experts in the top two, 64 px)",
}


def model_preset(name: str | None) -> Any:
    """The delta dict of preset ``name``; ``None`` for an unknown name; all names when ``name`` is None."""
    if name is None:
        return sorted(MODEL_PRESETS)
    delta = MODEL_PRESETS.get(str(name))
    return None if delta is None else {k: dict(v) if isinstance(v, dict) else v for k, v in delta.items()}
