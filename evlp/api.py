"""``evlp.load``: a trained model as an image/text encoder, from a run, a checkpoint or an export."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evlp.checkpoint import (
    CONFIG,
    TEXT_CONFIG,
    TOKENIZER,
    find_checkpoint,
    load_student_state_dict,
    load_weights_into,
    read_json,
)
from evlp.config.loader import from_dict, read_yaml
from evlp.config.schema import ModelConfig
from evlp.errors import CheckpointError


@dataclass
class Encoder:
    """A loaded model (an S-SMKE student, a dual encoder ...) with its tokenizer and eval transform.

    ``encode_image`` / ``encode_text`` return L2-normalised embeddings (N, D) (S-SMKE: the shared block's CLS),
    the features used for retrieval and zero-shot classification.
    """

    model: Any  # evlp.models.SSMKE or evlp.models.dual.DualEncoder
    tokenizer: Any  # evlp.data.tokenize.CaptionTokenizer
    transform: Callable[[Any], Any]
    config: ModelConfig
    path: Path
    device: Any = "cpu"
    text_config: dict[str, Any] | None = None
    """The text tower's saved HF config (rebuilds its architecture)."""
    run_config: dict[str, Any] | None = None
    """The whole saved config of the run the weights come from."""

    def encode_image(self, images: Sequence[Any], batch_size: int = 64) -> Any:
        """PIL images (or already transformed (3, H, W) tensors) -> (N, D) float32 embeddings."""
        import torch

        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            pixels = torch.stack([im if torch.is_tensor(im) else self.transform(im.convert("RGB")) for im in chunk])
            out.append(self.encode_pixels(pixels))
        return torch.cat(out) if out else torch.empty(0, self.config.embed_width)

    def encode_pixels(self, pixels: Any) -> Any:
        """Transformed pixel batch (B, 3, H, W) -> (B, D) embeddings."""
        import torch

        with torch.no_grad():
            return self.model.encode_image(pixels.to(self.device))["x"].float().cpu()

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> Any:
        """Captions -> (N, D) float32 embeddings."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[i:i + batch_size]))
                x = self.model.encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
                out.append(x["x"].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.config.embed_width)


def load(path: str | os.PathLike[str], device: str | None = None) -> Encoder:
    """Load a trained model for encoding.

    Args:
        path: a run folder (its latest checkpoint is used), a checkpoint folder or an exported model.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...; default: CUDA when available.

    Raises:
        CheckpointError: nothing loadable at ``path``, or the weights do not fit the saved config.
    """
    import torch

    from evlp.data.tokenize import CaptionTokenizer, load_tokenizer
    from evlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
    from evlp.models import build_model
    from evlp.models.image import without_training_only

    ckpt = find_checkpoint(path)
    raw = read_yaml(ckpt / CONFIG)
    if "model" not in raw:
        raise CheckpointError(f"{ckpt / CONFIG} has no 'model' section")
    cfg = from_dict(ModelConfig, raw["model"], where=f"{ckpt / CONFIG}")
    cfg.image = without_training_only(cfg.image)  # no FLIP/ELIP: encoding and fine-tuning see every patch
    data = raw.get("data") or {}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    text_config = read_json(ckpt / TEXT_CONFIG)
    model = load_weights_into(build_model(cfg, text_config=text_config), ckpt, load_student_state_dict(ckpt), device)
    tok_dir = ckpt / TOKENIZER
    tokenizer = CaptionTokenizer(load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.text.tokenizer_source),
                                 cfg.text.max_length, cfg.text.vocab_size)
    transform = eval_transform(cfg.image.img_size, mean=tuple(data.get("mean", IMAGENET_MEAN)),
                               std=tuple(data.get("std", IMAGENET_STD)))
    return Encoder(model=model, tokenizer=tokenizer, transform=transform, config=cfg, path=ckpt, device=device,
                   text_config=text_config, run_config=raw)
