"""Typed configs: schemas, presets, recipes and the loader."""

from evlp.config.loader import (
    dump_yaml,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    save_config,
    to_dict,
)
from evlp.config.presets import MODEL_PRESETS, model_preset
from evlp.config.recipes import Recipe, find_recipe, list_recipes
from evlp.config.schema import (
    DataConfig,
    ImageTowerConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PathsConfig,
    PretrainConfig,
    SharedBlockConfig,
    TeacherConfig,
    TextTowerConfig,
    TrainConfig,
)

from evlp.config.glue import GlueConfig  # noqa: E402 - these extend the schemas above
from evlp.config.imagenet import ImageNetConfig  # noqa: E402
from evlp.config.retrieval import RetrievalFinetuneConfig  # noqa: E402

CONFIG_SCHEMAS: dict[str, type] = {"pretrain": PretrainConfig, "retrieval": RetrievalFinetuneConfig,
                                   "glue": GlueConfig, "imagenet": ImageNetConfig}
"""Which schema each command's recipes follow."""

__all__ = [
    "CONFIG_SCHEMAS",
    "DataConfig",
    "ImageTowerConfig",
    "LossConfig",
    "MODEL_PRESETS",
    "ModelConfig",
    "OptimConfig",
    "PathsConfig",
    "PretrainConfig",
    "Recipe",
    "SharedBlockConfig",
    "TeacherConfig",
    "TextTowerConfig",
    "TrainConfig",
    "dump_yaml",
    "find_recipe",
    "from_dict",
    "list_recipes",
    "load_config",
    "merge",
    "model_preset",
    "parse_overrides",
    "read_yaml",
    "save_config",
    "to_dict",
]
