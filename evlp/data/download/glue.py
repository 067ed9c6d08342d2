"""``evlp data download glue``: the nine GLUE tasks as ``ROOT/glue/<task>/<split>.jsonl``.

Two sources, one output (the normalised format of :mod:`evlp.data.layouts`: ``{"idx", "text_a", "text_b",
"label"}`` per line, label null on the unlabelled test splits):

* the hub dataset ``nyu-mll/glue`` through ``datasets.load_dataset`` (the default);
* ``from_dir``: the original GLUE distribution (``glue_data/`` of the classic download script, with
  ``CoLA/ SST-2/ MRPC/ QQP/ STS-B/ MNLI/ QNLI/ RTE/ WNLI/`` of ``train.tsv``, ``dev*.tsv``, ``test*.tsv``).
  The TSVs are read with ``csv.QUOTE_NONE`` (they hold stray quote characters); a row with the wrong number
  of columns or an unreadable label is skipped and counted in the manifest. Labels follow the hub's coding
  (MNLI entailment/neutral/contradiction = 0/1/2, QNLI/RTE entailment/not_entailment = 0/1); ``idx`` is
  the row's position in its file, as on the hub.

Each task folder gets a ``MANIFEST.json``; a task whose files are intact and whose source is unchanged is
not written again.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evlp.data.download.manifest import Manifest, now_iso, read_manifest, tool_versions, write_manifest
from evlp.data.layouts import GLUE_TASKS
from evlp.errors import DataNotFoundError, UnknownNameError
from evlp.io import write_jsonl
from evlp.registry import did_you_mean

__all__ = ["GLUE_HUB_REPO", "download_glue", "glue_splits", "resolve_glue_tasks"]

Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``; total is None when unknown."""

GLUE_HUB_REPO = "nyu-mll/glue"
_EXAMPLES = 10  # skipped rows kept in the manifest, per split

# the hub's text columns per task: (text_a, text_b)
_HUB_TEXT: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}
_NLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
_BINARY_NLI = {"entailment": 0, "not_entailment": 1}


@dataclass(frozen=True)
class _Tsv:
    """How one task's original TSVs are read: text/label column names, label coding, headerless layout."""

    a: str
    b: str | None
    label: str
    coding: str | dict[str, int]  # "int", "float" or a name -> id map
    headerless: tuple[str, ...] | None = None  # columns of train/dev files that have no header row


_ORIGINAL: dict[str, _Tsv] = {
    "cola": _Tsv("sentence", None, "label", "int", ("source", "label", "original_label", "sentence")),
    "sst2": _Tsv("sentence", None, "label", "int"),
    "mrpc": _Tsv("#1 String", "#2 String", "Quality", "int"),
    "qqp": _Tsv("question1", "question2", "is_duplicate", "int"),
    "stsb": _Tsv("sentence1", "sentence2", "score", "float"),
    "mnli": _Tsv("sentence1", "sentence2", "gold_label", _NLI),
    "qnli": _Tsv("question", "sentence", "label", _BINARY_NLI),
    "rte": _Tsv("sentence1", "sentence2", "label", _BINARY_NLI),
    "wnli": _Tsv("sentence1", "sentence2", "label", "int"),
}


def glue_splits(task: str) -> list[str]:
    """The split files of ``task``: train, its validation split(s), its test split(s)."""
    validation = list(GLUE_TASKS[task].validation)
    return ["train", *validation, *[v.replace("validation", "test") for v in validation]]


def resolve_glue_tasks(task: str) -> list[str]:
    """``"all"`` -> the nine task names, a task name -> ``[task]``.

    Raises:
        UnknownNameError: an unknown name; the message suggests the closest and lists the valid ones.
    """
    name = task.strip().lower()
    if name == "all":
        return list(GLUE_TASKS)
    if name not in GLUE_TASKS:
        choices = ("all", *GLUE_TASKS)
        raise UnknownNameError(f"unknown GLUE task '{task}'{did_you_mean(name, choices)}; choose one of: "
                               f"{', '.join(choices)}")
    return [name]


@dataclass
class _Report:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, split: str, reason: str, where: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        kept = self.examples.setdefault(split, [])
        if len(kept) < _EXAMPLES:
            kept.append(where)


# ---------------------------------------------------------------------- original TSVs
def _task_folder(src: Path, task: str, single: bool) -> Path | None:
    """The folder of ``task`` under ``src`` (or ``src/glue_data``): ``SST-2``, ``sst2`` ... match ``sst2``."""
    if single and (src / "train.tsv").is_file():
        return src
    for base in (src, src / "glue_data"):
        if not base.is_dir():
            continue
        for child in sorted(base.iterdir()):
            if child.is_dir() and child.name.lower().replace("-", "").replace("_", "") == task:
                return child
    return None


def _file_for(split: str) -> str:
    return split.replace("validation", "dev") + ".tsv"


def _parse_label(value: str, coding: str | dict[str, int], num_labels: int) -> int | float | None:
    value = value.strip()
    if isinstance(coding, dict):
        return coding.get(value)
    try:
        if coding == "float":
            number = float(value)
            return number if math.isfinite(number) else None
        label = int(value)
    except ValueError:
        return None
    return label if 0 <= label < num_labels else None


def _read_tsv(path: Path, task: str, split: str, report: _Report) -> list[dict[str, Any]]:
    spec, test = _ORIGINAL[task], split.startswith("test")
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(spec.headerless) if spec.headerless and not test else [c.strip() for c in next(reader, [])]
        wanted = [spec.a] + ([spec.b] if spec.b else []) + ([] if test else [spec.label])
        absent = [c for c in wanted if c not in columns]
        if absent:
            raise DataNotFoundError(f"{path}: no column {absent[0]!r} in its header {columns[:8]} — pass the "
                                    "original GLUE files (glue_data/ of the GLUE download script)")
        pos = {c: columns.index(c) for c in wanted}
        n = -1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                n += 1
                report.skip(split, "malformed_row", f"{path.name}:{reader.line_num}: {exc}")
                continue
            if not row:
                continue  # a blank line
            n += 1
            if len(row) != len(columns):
                report.skip(split, "malformed_row",
                            f"{path.name}:{reader.line_num}: {len(row)} columns, expected {len(columns)}")
                continue
            label = None
            if not test:
                label = _parse_label(row[pos[spec.label]], spec.coding, GLUE_TASKS[task].num_labels)
                if label is None:
                    report.skip(split, "bad_label",
                                f"{path.name}:{reader.line_num}: label {row[pos[spec.label]]!r}")
                    continue
            out.append({"idx": n, "text_a": row[pos[spec.a]], "text_b": row[pos[spec.b]] if spec.b else None,
                        "label": label})
    return out


def _from_original(folder: Path, task: str, report: _Report) -> dict[str, Path]:
    """Parse every split file of one task folder into ``report.rows``; the files used."""
    used: dict[str, Path] = {}
    for split in glue_splits(task):
        path = folder / _file_for(split)
        if not path.is_file():
            if split.startswith("test"):
                continue  # unlabelled anyway; noted as missing in the manifest
            raise DataNotFoundError(f"GLUE {task}: {path} does not exist — pass the original GLUE folder "
                                    f"(glue_data/ with {folder.name}/train.tsv and dev*.tsv)")
        report.rows[split] = _read_tsv(path, task, split, report)
        used[split] = path
    return used


# ---------------------------------------------------------------------- hub
def _from_hub(task: str, report: _Report, cache_dir: str | Path | None) -> None:
    import datasets

    try:
        found = datasets.load_dataset(GLUE_HUB_REPO, task, cache_dir=str(cache_dir) if cache_dir else None)
    except OSError as exc:  # offline (ConnectionError), not found (DatasetNotFoundError), a broken cache
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataNotFoundError(f"cannot load GLUE {task} from the hub ({GLUE_HUB_REPO}: {reason}) — go online, "
                                "or pass --from-dir with the original GLUE folder (glue_data/ with CoLA/, SST-2/, "
                                "...)") from None
    a, b = _HUB_TEXT[task]
    regression = GLUE_TASKS[task].num_labels == 1
    for split in glue_splits(task):
        if split not in found:
            continue
        rows = []
        for n, ex in enumerate(found[split]):
            label = ex.get("label")
            if split.startswith("test") or label is None or label < 0:
                label = None
            else:
                label = float(label) if regression else int(label)
            rows.append({"idx": int(ex.get("idx", n)), "text_a": ex[a], "text_b": ex[b] if b else None,
                         "label": label})
        report.rows[split] = rows


# ---------------------------------------------------------------------- output
def _label_summary(rows: list[dict[str, Any]], regression: bool) -> dict[str, Any]:
    labels = [r["label"] for r in rows if r["label"] is not None]
    if not labels:
        return {}
    if regression:
        return {"min": min(labels), "max": max(labels), "mean": round(sum(labels) / len(labels), 4)}
    hist: dict[str, int] = {}
    for label in sorted(labels):
        hist[str(label)] = hist.get(str(label), 0) + 1
    return hist


def _fingerprint(files: dict[str, Path]) -> dict[str, list[int]]:
    return {split: [p.stat().st_size, p.stat().st_mtime_ns] for split, p in sorted(files.items())}


def _intact(folder: Path, previous: Manifest | None, source: list[str], fingerprint: Any) -> bool:
    if previous is None or previous.source != source or previous.extra.get("fingerprint") != fingerprint:
        return False
    files = previous.extra.get("files") or {}
    return bool(files) and all((folder / f"{s}.jsonl").is_file()
                               and (folder / f"{s}.jsonl").stat().st_size == info.get("bytes")
                               for s, info in files.items())


def download_glue(root: str | Path, *, task: str = "all", from_dir: str | Path | None = None,
                  progress: Progress | None = None, cache_dir: str | Path | None = None) -> dict[str, Manifest]:
    """Write ``ROOT/glue/<task>/<split>.jsonl`` and a ``MANIFEST.json`` per task, from the hub or the original TSVs.

    Args:
        root: the data root; everything goes to ``root/glue``.
        task: ``all`` or one of ``cola sst2 mrpc qqp stsb mnli qnli rte wnli``.
        from_dir: the original GLUE folder (``glue_data/`` or its parent, or with one task the task folder
            itself); None loads ``nyu-mll/glue`` with ``datasets``.
        progress: ``progress("glue", tasks done, tasks)``.
        cache_dir: the ``datasets`` cache for the hub path (default: its own).

    Returns:
        The manifest of each task, by task name (rows and label distribution per split, skipped rows).

    Raises:
        UnknownNameError: an unknown task.
        DataNotFoundError: the hub cannot be reached (offline) or a task folder / train / dev file is
            missing in ``from_dir``.
    """
    tasks = resolve_glue_tasks(task)
    src = Path(from_dir) if from_dir is not None else None
    folders: dict[str, Path] = {}
    if src is not None:
        if not src.is_dir():
            raise DataNotFoundError(f"--from-dir {src} is not a folder — pass the original GLUE folder "
                                    "(glue_data/)")
        for name in tasks:
            found = _task_folder(src, name, single=len(tasks) == 1)
            if found is not None:
                folders[name] = found
        absent = [t for t in tasks if t not in folders]
        if absent:
            raise DataNotFoundError(f"no GLUE folder for {', '.join(absent)} under {src} (expected e.g. CoLA/, "
                                    "SST-2/ with train.tsv) — pass glue_data/ or choose a present task with --task")
    manifests: dict[str, Manifest] = {}
    for i, name in enumerate(tasks):
        if progress is not None:
            progress("glue", i, len(tasks))
        out = Path(root) / "glue" / name
        report = _Report()
        if src is not None:
            files = {s: folders[name] / _file_for(s) for s in glue_splits(name)
                     if (folders[name] / _file_for(s)).is_file()}
            source, fingerprint = [str(folders[name].resolve())], _fingerprint(files)
        else:
            source, fingerprint = [f"hf://datasets/{GLUE_HUB_REPO}/{name}"], None
        previous = read_manifest(out)
        if _intact(out, previous, source, fingerprint):
            assert previous is not None
            manifests[name] = previous
            continue
        if src is not None:
            _from_original(folders[name], name, report)
        else:
            _from_hub(name, report, cache_dir)
        out.mkdir(parents=True, exist_ok=True)
        regression = GLUE_TASKS[name].num_labels == 1
        counts: dict[str, Any] = {}
        files_info: dict[str, Any] = {}
        for split, rows in report.rows.items():
            size = write_jsonl(out / f"{split}.jsonl", rows)
            counts[split] = {"rows": len(rows), "labels": _label_summary(rows, regression)}
            files_info[split] = {"rows": len(rows), "bytes": size}
        manifest = Manifest(
            dataset="glue", source=source, created=now_iso(), counts=counts,
            failures=dict(sorted(report.failures.items())),
            tools=tool_versions(*(() if src is not None else ("datasets",))),
            layout="<split>.jsonl: one {idx, text_a, text_b, label} per line; label null on test splits",
            extra={"task": name, "fingerprint": fingerprint, "files": files_info, "skipped_rows": report.examples,
                   "missing_splits": [s for s in glue_splits(name) if s not in report.rows]})
        write_manifest(out, manifest)
        manifests[name] = manifest
    if progress is not None:
        progress("glue", len(tasks), len(tasks))
    return manifests
