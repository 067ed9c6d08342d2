"""``--data NAME|PATH`` under ``--root``: the one resolution rule, checked case by case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evlp.data.location import dataset_folder


@pytest.mark.parametrize("data,expected", [
    ("coco", "ROOT/coco"),                 # a bare name: under the root
    ("/abs/coco", "/abs/coco"),            # absolute: itself
    ("sub/coco", "sub/coco"),              # written with a separator: a path
    ("./coco", "coco"),                    # explicitly relative: a path
])
def test_names_and_paths(tmp_path: Path, data: str, expected: str) -> None:
    got = dataset_folder(data, tmp_path)
    want = Path(expected.replace("ROOT", str(tmp_path)))
    assert got == want


def test_an_existing_folder_wins_over_a_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    assert dataset_folder("here", "/elsewhere") == Path("here")
    assert dataset_folder("absent", "/elsewhere") == Path("/elsewhere/absent")
    assert dataset_folder("absent") == Path("data") / "absent"
    assert os.fspath(dataset_folder(Path("here"), "/r")) == "here"


def test_a_relative_path_under_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "root" / "synth" / "test").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert dataset_folder("synth/test", tmp_path / "root") == tmp_path / "root" / "synth" / "test"
    assert dataset_folder("root/synth", "/elsewhere") == Path("root/synth")  # exists from here: that path


def test_finetune_data_options_become_root_and_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evlp.config.commands import finetune_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r" / "coco").mkdir(parents=True)
    assert finetune_data("coco", None) == {"dataset": "coco"}  # paths.data decides the root
    assert finetune_data("coco", tmp_path / "r") == {"data": str(tmp_path / "r"), "dataset": "coco"}
    assert finetune_data(str(tmp_path / "x" / "shapes"), None) == {"data": str(tmp_path / "x"), "dataset": "shapes"}
    assert finetune_data("r/coco", None) == {"data": "r", "dataset": "coco"}
    assert finetune_data(None, tmp_path / "r") == {"data": str(tmp_path / "r")}  # the recipe's dataset stands
    assert finetune_data(None, None) == {}