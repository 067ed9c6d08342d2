"""GLUE examples for fine-tuning and evaluation: the JSONL splits of :mod:`evlp.data.layouts` and their batches.

A split is ``ROOT/glue/<task>/<split>.jsonl``, one example per line with ``text_a``, ``text_b`` (pair tasks)
and ``label`` (a class index, or a float score for STS-B). :func:`load_glue_split` reads and checks it;
:class:`GlueCollator` tokenises examples (sentence pairs as pairs with token type ids, truncated
longest-first) and pads each batch to its longest example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evlp.data.layouts import GLUE_TASKS
from evlp.errors import DataNotFoundError

__all__ = ["GlueCollator", "load_glue_split"]


def load_glue_split(root: str | Path, task: str, split: str) -> list[dict[str, Any]]:
    """The labelled examples of ``ROOT/glue/<task>/<split>.jsonl``.

    Args:
        root: the data root holding ``glue/``.
        task: a GLUE task (``GLUE_TASKS``).
        split: the file's stem (``train``, ``validation``, ``validation_matched`` ...).

    Returns:
        ``[{"text_a": str, "text_b": str | None, "label": int | float}]`` in file order.

    Raises:
        DataNotFoundError: the file is missing or empty, or a row lacks text or a usable label.
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
    ``token_type_ids`` (B, T) when ``token_types``, ``labels`` (B,) (float for regression, else long).

    Args:
        tokenizer: the model's :class:`~evlp.data.tokenize.CaptionTokenizer`.
        max_length: tokens per example including special tokens; pairs are truncated longest-first.
        pair: tokenise ``text_a`` and ``text_b`` as a sentence pair.
        token_types: return segment ids (pair tasks on towers that have segment embeddings).
        regression: float labels (STS-B).
    """

    def __init__(self, tokenizer: Any, max_length: int, *, pair: bool, token_types: bool, regression: bool) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pair, self.token_types, self.regression = pair, token_types, regression

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """The batch of ``rows`` (examples as :func:`load_glue_split` returns them)."""
        enc = self.tokenizer.encode_pairs([r["text_a"] for r in rows],
                                          [r["text_b"] for r in rows] if self.pair else None, self.max_length,
                                          self.token_types)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # (B, T) each
        if self.token_types:
            batch["token_type_ids"] = enc["token_type_ids"]  # (B, T)
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)  # (B,)
        return batch
