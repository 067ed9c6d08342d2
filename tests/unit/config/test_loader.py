"""Config loading: defaults <- preset <- recipe <- overrides, with every problem reported at once."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml

from evlp.config import (
    CONFIG_SCHEMAS,
    ModelConfig,
    PretrainConfig,
    dump_yaml,
    find_recipe,
    from_dict,
    list_recipes,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from evlp.errors import ConfigError, UnknownNameError


def test_parse_overrides_nests_and_parses_yaml_values() -> None:
    got = parse_overrides(["train.batch_size=32", "optim.lr=1e-4", "data.train=[a,b]", "data.val=null",
                           "model.text.tokenizer=tiny"])
    assert got == {"train": {"batch_size": 32}, "optim": {"lr": "1e-4"}, "data": {"train": ["a", "b"], "val": None},
                   "model": {"text": {"tokenizer": "tiny"}}}


@pytest.mark.parametrize("bad", ["train.batch_size", "=3", "a..b=1"])
def test_parse_overrides_rejects_malformed(bad: str) -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides([bad])


def test_every_problem_is_reported_at_once_with_hints() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, "tiny", ["train.batch_sise=3", "model.text.num_layers=six",
                                             "train.precision=bf17", "optim.betas=[0.9]", "foo=1"])
    problems = info.value.problems
    assert len(problems) == 5
    text = "\n".join(problems)
    assert "did you mean 'train.batch_size'" in text
    assert "model.text.num_layers: expected int, got 'six'" in text
    assert "did you mean 'bf16'" in text
    assert "optim.betas" in text
    assert "unknown key 'foo'" in text
    assert info.value.exit_code == 2


def test_validation_problems_are_collected_too() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(PretrainConfig, {"train": {"batch_size": 0}, "model": {"shared": {"width": 30, "num_heads": 4}},
                                   "data": {"crop_scale": [0.9, 0.5]}})
    text = "\n".join(info.value.problems)
    assert "train.batch_size: must be > 0" in text
    assert "model.shared.width 30 is not divisible by num_heads 4" in text
    assert "data.crop_scale" in text


def test_value_coercion() -> None:
    cfg = from_dict(PretrainConfig, {"optim": {"lr": "3e-4", "betas": "0.8, 0.9", "warmup_steps": "null"},
                                     "train": {"max_steps": "100", "batch_size": 8.0},
                                     "model": {"teacher": {"enabled": "false"}}, "loss": {"kd_weight": 0}})
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.warmup_steps is None and cfg.train.max_steps == 100 and cfg.train.batch_size == 8
    assert cfg.model.teacher.enabled is False
    with pytest.raises(ConfigError, match="train.batch_size: expected int, got 8.5"):
        from_dict(PretrainConfig, {"train": {"batch_size": 8.5}})


def test_model_preset_then_explicit_keys() -> None:
    tiny = from_dict(ModelConfig, {"name": "s_smke_tiny"})
    assert tiny.text.hidden_size == 64 and tiny.image.img_size <= 64 and tiny.text.tokenizer == "tiny"
    adjusted = from_dict(ModelConfig, {"name": "s_smke_tiny", "image": {"depth": 1}})
    assert adjusted.image.depth == 1 and adjusted.image.width == 64
    paper = from_dict(ModelConfig, {})
    assert (paper.text.num_layers, paper.image.depth, paper.shared.width) == (6, 6, 768)
    with pytest.raises(ConfigError, match="unknown preset 's_smke_tyni'.*did you mean 's_smke_tiny'"):
        from_dict(ModelConfig, {"name": "s_smke_tyni"})


def test_recipe_names_and_paths(tmp_path: Path) -> None:
    assert find_recipe("tiny") == find_recipe("tiny.yaml") == find_recipe("pretrain/tiny")
    assert find_recipe("s_smke").name == "s_smke.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("train: {batch_size: 4}\n")
    assert load_config(PretrainConfig, str(own)).train.batch_size == 4
    with pytest.raises(UnknownNameError, match="did you mean 'tiny'.*shipped: "):
        find_recipe("tinny")


def test_bad_yaml_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PretrainConfig, str(lst))


def test_every_shipped_recipe_is_a_valid_delta() -> None:
    recipes = list_recipes()
    assert {"s_smke", "tiny"} <= {r.name for r in recipes}
    assert set(CONFIG_SCHEMAS) == {r.command for r in recipes}
    for recipe in recipes:
        schema = CONFIG_SCHEMAS[recipe.command]
        delta = yaml.safe_load(recipe.path.read_text()) or {}
        base = {"model": {"name": delta.get("model", {}).get("name", "s_smke")}} if schema is PretrainConfig \
            else {"ckpt": "run"}  # fine-tuning needs a checkpoint
        load_config(schema, str(recipe.path), [f"{k}={v}" for k, v in base.items() if k == "ckpt"])
        defaults = to_dict(from_dict(schema, base))
        # deltas only: no key repeats its default value (except the model preset name)
        for section, values in delta.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    if key != "name" and not isinstance(value, dict):
                        assert defaults[section][key] != value, f"{recipe.name}: {section}.{key} repeats its default"
            else:
                assert defaults[section] != values, f"{recipe.command}/{recipe.name}: {section} repeats its default"
        assert recipe.description, f"recipe {recipe.name} needs a leading comment line"


def test_nested_defaults_of_a_schema_survive_partial_overrides() -> None:
    from evlp.config.imagenet import ImageNetConfig

    cfg = load_config(ImageNetConfig, None, ["ckpt=run", "optim.lr=3e-3", "train.seed=1"])
    plain = ImageNetConfig(ckpt="run")
    assert cfg.optim.lr == 3e-3 and cfg.optim.betas == plain.optim.betas and cfg.optim.scale_lr is False
    assert cfg.train.epochs == plain.train.epochs and cfg.train.seed == 1


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, "tiny", ["train.max_steps=7", "data.root=/x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, str(tmp_path / "config.yaml"))
    assert again == cfg
    assert dump_yaml(again) == (tmp_path / "config.yaml").read_text()


# --------------------------------------------------------------------------- non-finite numbers
def _holds_float(tp: object) -> bool:
    return tp is float or any(_holds_float(a) for a in typing.get_args(tp))


def _float_settings(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """Every setting of a schema whose type holds a float (plain, optional or inside a tuple/list), found by
    walking the dataclasses: (dotted key, type)."""
    out: list[tuple[str, object]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _float_settings(tp, f"{prefix}{f.name}.")
        elif _holds_float(tp):
            out.append((prefix + f.name, tp))
    return out


def _get(obj: object, key: str) -> object:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _bad_value(default: object, bad: float) -> tuple[object, str]:
    """The YAML value with ``bad`` in it (for a sequence, at its last position) and the key suffix naming it."""
    if isinstance(default, (tuple, list)):
        return [*default[:-1], bad], f"[{max(len(default) - 1, 0)}]"  # an empty default list: [bad]
    return bad, ""


@pytest.mark.parametrize("command", sorted(CONFIG_SCHEMAS))
def test_every_float_setting_rejects_nan_and_infinity(command: str, tmp_path: Path) -> None:
    schema = CONFIG_SCHEMAS[command]
    base = [] if schema is PretrainConfig else ["ckpt=run"]
    defaults = load_config(schema, None, base)
    settings = _float_settings(schema)
    assert len(settings) >= 5, settings  # the walk found the float settings (lr, betas, weight_decay ...)
    for key, _ in settings:
        for bad in (math.nan, math.inf, -math.inf):
            value, suffix = _bad_value(_get(defaults, key), bad)
            shown = "nan" if math.isnan(bad) else ("-inf" if bad < 0 else "inf")
            # on the command line (a YAML scalar or flow list) ...
            cli = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            # ... and in a YAML file
            nested: dict = {}
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
            recipe = tmp_path / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(nested))
            for config, overrides in ((None, [*base, cli]), (str(recipe), base)):
                with pytest.raises(ConfigError) as info:
                    load_config(schema, config, overrides)
                assert info.value.exit_code == 2
                assert len(info.value.problems) == 1, (key, info.value.problems)
                problem = info.value.problems[0]
                assert problem.startswith(f"{key}{suffix}: must be a finite number, got {shown}"), problem
        # the same setting given its (finite) default the same ways is accepted: the rejection is about NaN/inf
        default = _get(defaults, key)
        flow = yaml.safe_dump(list(default) if isinstance(default, tuple) else default, default_flow_style=True)
        assert _get(load_config(schema, None, [*base, f"{key}={flow.strip().removesuffix('...').strip()}"]),
                    key) == default


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-Infinity", "1e999", ".inf", "-.inf", ".nan"])
def test_nan_and_infinity_spellings_are_all_rejected(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, "tiny", [f"optim.lr={text}", "loss.kd_temperature=0.1"])
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("optim.lr: must be a finite number")
    assert f"got {float(yaml.safe_load(text))};" in info.value.problems[0]


def test_non_utf8_config_file_is_one_clear_error(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    text = "# recette légère\ntrain: {batch_size: 4}\n"
    latin1.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index("é".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, str(latin1))
    msg = str(info.value)
    assert str(latin1) in msg and "UTF-8" in msg and f"byte offset {offset}" in msg and "\n" not in msg
    assert info.value.exit_code == 2
    latin1.write_bytes(text.encode("utf-8"))  # the same text as UTF-8 loads
    assert load_config(PretrainConfig, str(latin1)).train.batch_size == 4
