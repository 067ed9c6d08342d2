"""The text tower: a BERT-family encoder truncated to its first N layers, pooler dropped."""

from __future__ import annotations

from torch import Tensor, nn

from evlp.config.schema import TextTowerConfig


def bert_config(cfg: TextTowerConfig):  # -> transformers.BertConfig
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


class TextTower(nn.Module):
    """``forward(input_ids, attention_mask) -> last_hidden_state`` (B, T, hidden).

    Args:
        cfg: sizes of the tower (random init); pretrained weights are loaded by the backbone loaders.
    """

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        from transformers import BertModel

        self.model = BertModel(bert_config(cfg), add_pooling_layer=False)
        self.width = cfg.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``input_ids``/``attention_mask`` (B, T), mask 1 = real token; returns (B, T, hidden)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
