"""evlp.data.download.glue: the original GLUE TSVs -> ROOT/glue/<task>/<split>.jsonl, checked against an
independent parse of the fixture files (plain ``str.split`` on tabs, the label codings written out here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evlp.data.download.glue import download_glue
from evlp.data.download.manifest import read_manifest
from evlp.errors import DataNotFoundError, UnknownNameError

MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2")
STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"


def _mnli(i: int, a: str, b: str, labels: list[str]) -> str:
    return "\t".join([str(i), f"{i}1", f"{i}2e", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})",
                      a, b, *labels])


def _stsb(i: int, a: str, b: str, score: str | None) -> str:
    return "\t".join([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b,
                      *([score] if score is not None else [])])


# folder -> file -> lines, exactly as the classic GLUE download script leaves them (including damage)
FIXTURE: dict[str, dict[str, list[str]]] = {
    "CoLA": {
        "train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
                      "gj04\t0\t*\tThey drank the pub.",
                      'cj99\t1\t\tHe said "hello to me.',  # a stray quote: must stay in the text
                      "cj99\t1\tonly three columns",  # malformed
                      "bc01\t0\t*\tThe more does Bill smoke, the more Susan hates him."],
        "dev.tsv": ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks.", "gj04\t0\t*\tThe box contained."],
        "test.tsv": ["index\tsentence", "0\tBill whistled past the house.", "1\tThe car honked \"its way."],
    },
    "SST-2": {
        "train.tsv": ["sentence\tlabel", "hide new secretions from the parental units \t0",
                      "the \" greatest musicians \t1", "contains no wit , only labored gags \t0"],
        "dev.tsv": ["sentence\tlabel", "it 's a charming and often affecting journey . \t1", "unflinchingly bleak\t0"],
        "test.tsv": ["index\tsentence", "0\tuneasy mishmash of styles and genres .", "1\tthis film 's relationship"],
    },
    "MRPC": {
        "train.tsv": ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                      "1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" .\t"
                      "Referring to him as only \" the witness \" , Amrozi accused his brother .",
                      "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling .\tYucaipa bought Dominick 's .",
                      "1\t123\tbroken row"],
        "dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tHe left .\tHe went away ."],
        "test.tsv": ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1089874\t1089925\tPCCW 's chief .\tChief ."],
    },
    "QQP": {
        "train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                      "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of prepration?\t0",
                      "402555\t536040\t536041\tHow do I control my emotions?\tHow do you control them?\t1",
                      "1\t2\t3\tmissing the label and a question"],
        "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                    "201359\t303345\t303346\tWhy is the sky blue?\tWhy is the sea blue?\t0"],
        "test.tsv": ["id\tquestion1\tquestion2", "0\tWould the idea of Trump work?\tWhat was Trump 's \"idea\"?"],
    },
    "STS-B": {
        "train.tsv": [STSB_HEAD + "\tscore",
                      _stsb(0, "A plane is taking off.", "An air plane is taking off.", "5.000"),
                      _stsb(1, "A man is playing a flute.", "A man is playing a flute.", "3.800")],
        "dev.tsv": [STSB_HEAD + "\tscore",
                    _stsb(0, "A man with a hard hat.", "A man wearing a hard hat.", "0.25")],
        "test.tsv": [STSB_HEAD, _stsb(0, "A girl is styling.", "A girl is brushing.", None)],
    },
    "MNLI": {
        "train.tsv": [MNLI_HEAD + "\tlabel1\tgold_label",
                      _mnli(0, "Conceptually cream skimming has two dimensions.", "Product and geography.",
                            ["neutral", "neutral"]),
                      _mnli(1, "you know during the season", "You lose the things.", ["entailment", "entailment"]),
                      _mnli(2, "One of our number will carry out.", "A member will \"carry out.",
                            ["contradiction", "contradiction"]),
                      _mnli(3, "Unlabelled pair.", "No gold label here.", ["neutral", "-"])],  # bad label
        "dev_matched.tsv": [MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
                            _mnli(0, "The new rights are nice enough", "Everyone really likes the rights.",
                                  ["neutral", "entailment", "neutral", "neutral", "neutral", "neutral"])],
        "dev_mismatched.tsv": [MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
                               _mnli(0, "Your contribution helped.", "Your contributions were of no help.",
                                     ["contradiction"] * 5 + ["contradiction"])],
        "test_matched.tsv": [MNLI_HEAD, _mnli(0, "Hierbas, ans seco.", "Hierbas is a name.", [])],
        "test_mismatched.tsv": [MNLI_HEAD, _mnli(0, "What have you decided?", "What is your decision?", []),
                                _mnli(1, "Second.", "Row.", [])],
    },
    "QNLI": {
        "train.tsv": ["index\tquestion\tsentence\tlabel",
                      "0\tWhen did the third Digimon series begin?\tUnlike the two seasons.\tnot_entailment",
                      "1\tWhich missile batteries?\tThe missile batteries \"were destroyed.\tentailment"],
        "dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhat came into force?\tThe law.\tentailment"],
        "test.tsv": ["index\tquestion\tsentence", "0\tWhat organization is devoted?\tThe organization is."],
    },
    "RTE": {
        "train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tNo Weapons found.\tWeapons found.\tnot_entailment",
                      "1\tA place of sorrow.\tPope died.\tentailment"],
        "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tReeve died.\tReeve had an accident.\tnot_entailment"],
        "test.tsv": ["index\tsentence1\tsentence2", "0\tMangla was built.\tMangla is a dam."],
    },
    "WNLI": {
        "train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tI stuck a pin.\tThe pin had a hole.\t1",
                      "1\tJohn couldn't see the stage.\tJohn is so tall.\t0"],
        "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tThe drain is clogged.\tThe hair is clogged.\t0"],
        "test.tsv": ["index\tsentence1\tsentence2", "0\tMaude and Dora had seen the trains.\tThe trains were seen."],
    },
}

# independent restatement of the original formats: task -> folder, text columns, label column and coding
FORMATS = {
    "cola": ("CoLA", "sentence", None, "label", int), "sst2": ("SST-2", "sentence", None, "label", int),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", int),
    "qqp": ("QQP", "question1", "question2", "is_duplicate", int),
    "stsb": ("STS-B", "sentence1", "sentence2", "score", float),
    "mnli": ("MNLI", "sentence1", "sentence2", "gold_label",
             {"entailment": 0, "neutral": 1, "contradiction": 2}.get),
    "qnli": ("QNLI", "question", "sentence", "label", {"entailment": 0, "not_entailment": 1}.get),
    "rte": ("RTE", "sentence1", "sentence2", "label", {"entailment": 0, "not_entailment": 1}.get),
    "wnli": ("WNLI", "sentence1", "sentence2", "label", int),
}
SPLIT_FILES = {"mnli": {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                        "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                        "test_mismatched": "test_mismatched.tsv"}}
DEFAULT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def write_glue(folder: Path, only: list[str] | None = None) -> Path:
    """Write the fixture as ``folder/glue_data/<Task>/*.tsv``; returns ``folder/glue_data``."""
    for task, files in FIXTURE.items():
        if only is not None and task not in only:
            continue
        for name, lines in files.items():
            path = folder / "glue_data" / task / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return folder / "glue_data"


def expected_rows(src: Path, task: str, file: str) -> tuple[list[dict], int]:
    """(rows, skipped) from splitting the fixture file's lines on tabs."""
    folder, a, b, label_col, coding = FORMATS[task]
    lines = (src / folder / file).read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
    test = file.startswith("test")
    if task == "cola" and not test:
        header = ["source", "label", "original_label", "sentence"]
    else:
        header, lines = lines[0].split("\t"), lines[1:]
    rows, skipped = [], 0
    for i, line in enumerate(lines):
        parts = line.split("\t")
        if len(parts) != len(header):
            skipped += 1
            continue
        cell = dict(zip(header, parts))
        label = None if test else coding(cell[label_col])
        if not test and label is None:
            skipped += 1
            continue
        rows.append({"idx": i, "text_a": cell[a], "text_b": cell[b] if b else None, "label": label})
    return rows, skipped


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_all_tasks_match_an_independent_parse(tmp_path: Path) -> None:
    src = write_glue(tmp_path / "in")
    manifests = download_glue(tmp_path / "data", from_dir=src.parent)  # the parent of glue_data/ works too
    assert sorted(manifests) == sorted(FORMATS)
    for task in FORMATS:
        out = tmp_path / "data" / "glue" / task
        files = SPLIT_FILES.get(task, DEFAULT_FILES)
        assert sorted(p.stem for p in out.glob("*.jsonl")) == sorted(files)
        skipped = 0
        for split, file in files.items():
            rows, bad = expected_rows(src, task, file)
            skipped += bad
            assert read_jsonl(out / f"{split}.jsonl") == rows, (task, split)
            assert manifests[task].counts[split]["rows"] == len(rows)
        assert sum(manifests[task].failures.values()) == skipped, task
        assert read_manifest(out) == manifests[task]


def test_details(tmp_path: Path) -> None:
    src = write_glue(tmp_path)
    manifests = download_glue(tmp_path / "data", from_dir=src)
    glue = tmp_path / "data" / "glue"
    cola = read_jsonl(glue / "cola" / "train.jsonl")
    assert cola[2]["text_a"] == 'He said "hello to me.' and [r["idx"] for r in cola] == [0, 1, 2, 4]
    assert manifests["cola"].failures == {"malformed_row": 1}
    assert manifests["cola"].counts["train"]["labels"] == {"0": 2, "1": 2}
    assert "train.tsv:4: 3 columns, expected 4" in manifests["cola"].extra["skipped_rows"]["train"][0]
    stsb = read_jsonl(glue / "stsb" / "train.jsonl")
    assert [r["label"] for r in stsb] == [5.0, 3.8] and all(isinstance(r["label"], float) for r in stsb)
    assert manifests["stsb"].counts["validation"]["labels"] == {"min": 0.25, "max": 0.25, "mean": 0.25}
    mnli = read_jsonl(glue / "mnli" / "train.jsonl")
    assert [r["label"] for r in mnli] == [1, 0, 2] and manifests["mnli"].failures == {"bad_label": 1}
    assert read_jsonl(glue / "mnli" / "validation_matched.jsonl")[0]["label"] == 1
    assert read_jsonl(glue / "mnli" / "validation_mismatched.jsonl")[0]["label"] == 2
    assert len(read_jsonl(glue / "mnli" / "test_mismatched.jsonl")) == 2
    for task in FORMATS:
        for test in glue.joinpath(task).glob("test*.jsonl"):
            assert all(r["label"] is None for r in read_jsonl(test)), task
    assert read_jsonl(glue / "mrpc" / "train.jsonl")[0]["label"] == 1  # the BOM before "Quality" is dropped
    assert read_jsonl(glue / "qnli" / "train.jsonl")[1]["text_a"] == "Which missile batteries?"


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    src = write_glue(tmp_path, only=["RTE"])
    first = download_glue(tmp_path / "data", task="rte", from_dir=src / "RTE")  # the task folder itself
    files = sorted((tmp_path / "data" / "glue" / "rte").iterdir())
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    second = download_glue(tmp_path / "data", task="rte", from_dir=src)
    assert second == first
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == stamps
    # a changed source is picked up
    with open(src / "RTE" / "dev.tsv", "a", encoding="utf-8") as fh:
        fh.write("1\tA new row.\tAnother.\tentailment\n")
    os.utime(src / "RTE" / "dev.tsv", ns=(1, 1))
    third = download_glue(tmp_path / "data", task="rte", from_dir=src)
    assert third["rte"].counts["validation"]["rows"] == 2


def test_missing_task_folder(tmp_path: Path) -> None:
    src = write_glue(tmp_path, only=["CoLA"])
    with pytest.raises(DataNotFoundError, match="sst2"):
        download_glue(tmp_path / "data", from_dir=src)
    assert not (tmp_path / "data" / "glue").exists()


def test_unknown_task_suggests(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'sst2'") as info:
        download_glue(tmp_path, task="sst")
    assert "cola" in str(info.value) and "all" in str(info.value)


def test_hub_offline_says_what_to_do(tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(DataNotFoundError) as info:
        download_glue(tmp_path / "data", task="wnli", cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value) and "--from-dir" in str(info.value) and "wnli" in str(info.value)
