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
}

MODEL_DESCRIPTIONS: dict[str, str] = {
    "s_smke": "S-SMKE (paper): BERT-base 6L + Data2Vec2 ViT-B/16 6L + shared block, BEiTv2-B teacher",
    "s_smke_tiny": "tiny S-SMKE for tests and the quickstart (width 64, 2+2 layers, 64 px)",
}


def model_preset(name: str | None) -> Any:
    """The delta dict of preset ``name``; ``None`` for an unknown name; all names when ``name`` is None."""
    if name is None:
        return sorted(MODEL_PRESETS)
    delta = MODEL_PRESETS.get(str(name))
    return None if delta is None else {k: dict(v) if isinstance(v, dict) else v for k, v in delta.items()}
