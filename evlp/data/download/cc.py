"""``evlp data download cc3m|cc12m``: Conceptual Captions as webdataset shards, fetched by img2dataset.

img2dataset does the fetching, resizing and shard writing in a child process; this module prepares its
input, watches it, and fills the two gaps users hit with it: a job whose tail hangs (a watchdog stops it
and keeps the finished shards) and retrying only the rows that failed. Layout of ``ROOT/<name>/``::

    NNNNN.tar NNNNN.parquet NNNNN_stats.json   img2dataset's shards of the index, in index order
    retry_<k>/NNNNN.*                          retry round k: rows that had failed, fetched again
    _index/index.parquet                       the normalised index: url, caption, row (0-based TSV line)
    _index/index.json                          where the index came from, its size and the shard size
    _index/retry_<k>.parquet, main.parquet     the rows given to img2dataset, when not the whole index
    _index/img2dataset.log                     img2dataset's output, appended per run
    MANIFEST.json

A shard counts as finished once its ``_stats.json`` is readable (img2dataset writes it last); anything
else is deleted after a run, and a re-run fetches those shards again and skips the finished ones.

Why this module is long: it is one resumable pipeline — normalise the index, plan and clean shards, run
img2dataset in a watched child process, retry rounds over failed rows, count failures by reason, write the
manifest — whose steps all work on the folder layout above and its private file names; the watchdog that
can stand alone already lives in :mod:`evlp.data.download.watchdog`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from evlp.data.download.http import DownloadError, download
from evlp.data.download.manifest import MANIFEST, Manifest, tool_versions, write_manifest
from evlp.data.download.watchdog import JOB_ENV, POLL_S, RUNNER, STARTUP_GRACE_S, activity, kill_tree
from evlp.data.layouts import read_stats
from evlp.errors import ConfigError, DataNotFoundError, UnknownNameError
from evlp.io import atomic_file, read_json_object, write_json

__all__ = ["CC12M_INDEX_URL", "CC3M_INDEX_PAGE", "CCOptions", "CCResult", "EXPECTED_YIELD", "REASONS",
           "classify_failure", "download_cc", "normalise_index"]

CC12M_INDEX_URL = "https://storage.googleapis.com/conceptual_12m/cc12m.tsv"
CC3M_INDEX_PAGE = "https://ai.google.com/research/ConceptualCaptions/download"
CC3M_INDEX_NAME = "Train-GCC-training.tsv"
COLUMNS = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}
EXPECTED_YIELD = {"cc3m": 0.70, "cc12m": 0.63}
_YIELD_NOTE = {"cc3m": "about 70% of CC3M URLs still answer (img2dataset maintainer, img2dataset#391)",
               "cc12m": "about 62-64% of CC12M URLs still answer (conceptual-12m#9): 404/410 ~12%, 403 ~8%, "
                        "dead DNS ~6%, undecodable ~4%"}
REASONS = ("http_404", "http_403", "http_other", "timeout", "dns", "connection", "decode", "resize", "other")
"""Failure reasons, in report order; ``http_404`` includes 410 Gone."""
CC_LAYOUT = ("NNNNN.tar (+ .parquet status, _stats.json): img2dataset webdataset shards, KEY.jpg/.txt/.json, "
             "json['row'] = the index line; retry_<k>/: rows fetched again by --retry-failed; "
             "_index/: normalised index, img2dataset log")
INDEX_DIR = "_index"
_INDEX_FILE, _STATE_FILE, _LOG_FILE = "index.parquet", "index.json", "img2dataset.log"
_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("row", pa.int64())])
_CHUNK = 64 << 20

Progress = Callable[[int, "int | None"], None]

@dataclass
class CCOptions:
    """How to fetch: img2dataset's knobs plus evlp's watchdog, retry and smoke-run switches.

    Attributes:
        image_size: shorter side of the stored images (aspect kept, never enlarged).
        processes: img2dataset worker processes (capped at the number of shards to fetch).
        threads: download threads per process.
        shard_size: rows per shard; fixed once shards exist.
        timeout: seconds per URL.
        retries: extra attempts per URL within a run.
        stall_timeout: seconds without any progress after which the job is stopped (finished shards kept).
        retry_failed: run one more round over only the rows that failed before, into ``retry_<k>/``.
        limit: only the first ``limit`` rows of the index (smoke runs).
    """

    image_size: int = 256
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 64
    shard_size: int = 10000
    timeout: float = 10.0
    retries: int = 1
    stall_timeout: float = 300.0
    retry_failed: bool = False
    limit: int | None = None


@dataclass
class CCResult:
    """The state of ``ROOT/<name>`` after a call, and what this call did.

    ``attempted``/``ok``/``failed`` count distinct index rows over all rounds (a row that failed and then
    succeeded in a retry round is ok); ``failed`` holds every reason of :data:`REASONS`. ``new`` is the
    samples this call added and ``images_per_s`` is ``new / seconds``. ``stalled`` means the watchdog
    stopped img2dataset; a re-run completes the rest.
    """

    manifest: Manifest
    attempted: int
    ok: int
    failed: dict[str, int]
    seconds: float
    images_per_s: float
    yield_: float
    shards: int
    bytes_on_disk: int
    stalled: bool
    new: int = 0
    folder: Path = Path()


def classify_failure(status: str, message: str | None) -> str:
    """Map one img2dataset status and error message to a reason of :data:`REASONS`."""
    msg = (message or "").lower()
    if status == "failed_to_resize":
        return "decode" if "decod" in msg or "cannot identify" in msg else "resize"
    code = re.search(r"http error (\d{3})", msg)
    if code:
        number = int(code.group(1))
        return "http_404" if number in (404, 410) else "http_403" if number == 403 else "http_other"
    if "timed out" in msg or "timeout" in msg:
        return "timeout"
    if any(s in msg for s in ("name or service not known", "name resolution", "nodename nor servname",
                              "no address associated", "getaddrinfo", "errno -2]", "errno -3]", "errno -5]")):
        return "dns"
    if any(s in msg for s in ("connection", "incompleteread", "remote end closed", "broken pipe", "ssl",
                              "certificate", "eof occurred", "unreachable", "no route to host")):
        return "connection"
    return "other"


def _check_options(options: CCOptions) -> None:
    problems = [f"{name}={getattr(options, name)!r} must be at least {low}"
                for name, low in (("image_size", 1), ("processes", 1), ("threads", 1), ("shard_size", 1),
                                  ("retries", 0)) if getattr(options, name) < low]
    problems += [f"{name}={getattr(options, name)!r} must be positive"
                 for name in ("timeout", "stall_timeout") if not getattr(options, name) > 0]
    if options.limit is not None and options.limit < 1:
        problems.append(f"limit={options.limit!r} must be at least 1 (or None for every row)")
    if problems:
        raise ConfigError("invalid CC download options: " + "; ".join(problems), problems)


# ---------------------------------------------------------------------------------------------- index
def normalise_index(tsv: str | Path, dest: str | Path, columns: tuple[str, str]) -> tuple[int, int]:
    """Rewrite a headerless two-column TSV as a parquet of ``url, caption, row``, atomically.

    ``row`` is the 0-based line of the TSV. The caption may hold tabs: the split is at the tab next to the
    URL column. Lines without a URL (blank, a header, no ``://``) are left out.

    Args:
        tsv: the index file (UTF-8; undecodable bytes are replaced).
        dest: the parquet to write.
        columns: the TSV's column order, ``("caption", "url")`` or ``("url", "caption")``.

    Returns:
        (rows written, lines left out).
    """
    url_last = columns[1] == "url"
    line = kept = 0
    with open(tsv, "rb") as fh, atomic_file(dest) as out, pq.ParquetWriter(out, _SCHEMA) as writer:
        rest = b""
        while True:
            chunk = fh.read(_CHUNK)
            data = rest + chunk
            if chunk:
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut + 1:]
            elif not data:
                break
            else:
                rest = b""
            lines = pa.array(data.decode("utf-8", errors="replace").split("\n"), pa.string())
            table = _split_lines(pc.utf8_rtrim(lines, characters="\r"), url_last, line)
            line += len(lines)
            if table.num_rows:
                writer.write_table(table)
                kept += table.num_rows
            if not chunk:
                break
    return kept, line - kept


def _split_lines(lines: pa.Array, url_last: bool, first_line: int) -> pa.Table:
    parts = pc.split_pattern(lines, "\t", max_splits=1, reverse=url_last)
    two = pc.equal(pc.list_value_length(parts), 2).fill_null(False)
    rows = pa.array(np.arange(first_line, first_line + len(lines), dtype=np.int64)).filter(two)
    parts = parts.filter(two)
    url = pc.utf8_trim_whitespace(pc.list_element(parts, 1 if url_last else 0))
    caption = pc.utf8_trim_whitespace(pc.list_element(parts, 0 if url_last else 1))
    keep = pc.match_substring(url, "://")
    return pa.Table.from_arrays([url.filter(keep), caption.filter(keep), rows.filter(keep)], schema=_SCHEMA)


def _raw_index(name: str, folder: Path, root: Path, index: str | Path | None) -> tuple[Path, str]:
    """The local TSV to normalise and a description of its source (downloading CC12M's when needed)."""
    work = folder / INDEX_DIR
    if index is None and name == "cc12m":
        index = CC12M_INDEX_URL
    if index is not None and str(index).startswith(("http://", "https://")):
        url = str(index)
        dest = work / (url.rstrip("/").rsplit("/", 1)[-1] or "index.tsv")
        return download(url, dest, timeout=60.0, retries=5), url
    if index is not None:
        path = Path(index).expanduser()
        if not path.is_file():
            raise DataNotFoundError(f"index {str(index)!r} does not exist — pass the path of the {name} TSV")
        return path, str(path.resolve())
    for candidate in (folder / CC3M_INDEX_NAME, root / CC3M_INDEX_NAME):
        if candidate.is_file():
            return candidate, str(candidate.resolve())
    raise DataNotFoundError(
        f"the CC3M index {CC3M_INDEX_NAME} is needed — download the 'Training split' TSV from "
        f"{CC3M_INDEX_PAGE} and run `evlp data download cc3m --index {CC3M_INDEX_NAME} --out {root}`")


def _prepare_index(name: str, folder: Path, root: Path, index: str | Path | None, shard_size: int) -> dict:
    """Normalise the index once (reused on re-runs) and return the state of ``_index/index.json``."""
    work = folder / INDEX_DIR
    state_path, parquet = work / _STATE_FILE, work / _INDEX_FILE
    state = read_json_object(state_path)
    have_shards = bool(_finished(folder))
    if state is not None and have_shards and state.get("shard_size") not in (None, shard_size):
        raise ConfigError(f"shard_size={shard_size} differs from the {state['shard_size']} that the shards under "
                          f"{folder} were made with — pass shard_size={state['shard_size']} or delete the folder")
    reusable = state is not None and parquet.is_file()
    if reusable and index is None:
        return state
    raw, source = _raw_index(name, folder, root, index)
    size = raw.stat().st_size
    if reusable and state.get("bytes") == size:  # the same file (perhaps moved)
        return state
    if state is not None and have_shards:
        raise ConfigError(f"index {source} differs from {state.get('source')}, which the shards under {folder} "
                          "were made from — pass that index again or delete the folder to start over")
    rows, skipped = normalise_index(raw, parquet, COLUMNS[name])
    if rows == 0:
        parquet.unlink(missing_ok=True)
        order = " TAB ".join(COLUMNS[name])
        raise DataNotFoundError(f"index {source} has no rows with a URL — expected a {name} TSV ({order}, "
                                "no header)")
    state = {"source": source, "bytes": size, "rows": rows, "skipped_lines": skipped, "shard_size": shard_size,
             "columns": list(COLUMNS[name])}
    write_json(state_path, state)
    return state


# ---------------------------------------------------------------------------------------------- shards
def _stats(shard: Path) -> dict | None:
    """img2dataset's stats of ``shard`` (``NNNNN.tar``) when it finished the shard (they hold ``count``)."""
    data = read_stats(shard)
    return data if data is not None and isinstance(data.get("count"), int) else None


def _finished(out: Path) -> dict[int, dict]:
    """Shard id -> its stats, for the shards of ``out`` that img2dataset finished."""
    done: dict[int, dict] = {}
    for path in out.glob("*_stats.json") if out.is_dir() else ():
        stem = path.name[: -len("_stats.json")]
        stats = _stats(out / f"{stem}.tar")
        if stem.isdigit() and stats is not None and (out / f"{stem}.tar").is_file():
            done[int(stem)] = stats
    return done


def _shard_files(out: Path, shard: str) -> list[Path]:
    return [out / f"{shard}{suffix}" for suffix in (".tar", ".parquet", "_stats.json")]


def _clean(out: Path) -> None:
    """Delete what a stopped img2dataset left: unfinished shards and its ``_tmp`` folder."""
    if not out.is_dir():
        return
    shutil.rmtree(out / "_tmp", ignore_errors=True)
    done = {f"{k:05d}" for k in _finished(out)}
    for path in out.iterdir():
        stem = path.name.split(".")[0].removesuffix("_stats")
        if path.is_file() and stem.isdigit() and stem not in done and path.name.endswith(
                (".tar", ".parquet", "_stats.json")):
            path.unlink()


def _expected(rows: int, shard_size: int) -> dict[int, int]:
    return {k: min(shard_size, rows - k * shard_size) for k in range(math.ceil(rows / shard_size))}


def _pending(out: Path, rows: int, shard_size: int) -> int:
    """Rows of ``out``'s shards still to fetch. A finished shard with fewer rows than it should have (made
    with a smaller ``limit``) is deleted so that img2dataset fetches it whole."""
    done = _finished(out)
    pending = 0
    for k, count in _expected(rows, shard_size).items():
        if k in done and done[k]["count"] >= count:  # more rows: made with a larger limit, keep it
            continue
        for path in _shard_files(out, f"{k:05d}"):
            path.unlink(missing_ok=True)
        pending += count
    return pending


def _rounds(folder: Path) -> list[Path]:
    """The shard folders in fetch order: the main one, then ``retry_1``, ``retry_2`` ..."""
    retries = sorted((p for p in folder.glob("retry_*") if p.is_dir() and p.name[6:].isdigit()),
                     key=lambda p: int(p.name[6:]))
    return [folder, *retries]


def _status(folders: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, ok, reason index) of every status record of the finished shards, in fetch order."""
    rows, oks, codes = [np.zeros(0, np.int64)], [np.zeros(0, bool)], [np.zeros(0, np.int64)]
    for out in folders:
        for k in sorted(_finished(out)):
            path = out / f"{k:05d}.parquet"
            try:
                table = pq.read_table(path, columns=["row", "status", "error_message"])
            except (OSError, pa.ArrowException):
                continue
            status = pc.fill_null(table["status"], "")
            key = pc.binary_join_element_wise(status, pc.fill_null(table["error_message"], ""), "\n")
            encoded = pc.dictionary_encode(key).combine_chunks()
            lookup = np.array([-1 if text.split("\n", 1)[0] == "success" else
                               REASONS.index(classify_failure(*text.split("\n", 1)))
                               for text in encoded.dictionary.to_pylist()], dtype=np.int64)
            code = lookup[encoded.indices.to_numpy(zero_copy_only=False)] if len(lookup) else np.zeros(0, np.int64)
            rows.append(table["row"].to_numpy().astype(np.int64))
            oks.append(code < 0)
            codes.append(code)
    return np.concatenate(rows), np.concatenate(oks), np.concatenate(codes)


def _tally(folders: list[Path]) -> tuple[int, int, dict[str, int], np.ndarray, np.ndarray]:
    """(attempted, ok, failures by reason, ok rows, failed rows) over all rounds; a failed row's reason is
    that of its latest attempt."""
    rows, ok, codes = _status(folders)
    ok_rows = np.unique(rows[ok])
    failing = ~np.isin(rows, ok_rows)
    last_rows, last_codes = rows[failing][::-1], codes[failing][::-1]
    failed_rows, first = np.unique(last_rows, return_index=True)
    counts = np.bincount(last_codes[first], minlength=len(REASONS))
    failed = {reason: int(counts[i]) for i, reason in enumerate(REASONS)}
    return len(ok_rows) + len(failed_rows), len(ok_rows), failed, ok_rows, failed_rows


def _disk(folders: list[Path]) -> tuple[int, int]:
    shards = size = 0
    for out in folders:
        for k in _finished(out):
            shards += 1
            size += sum(p.stat().st_size for p in _shard_files(out, f"{k:05d}") if p.is_file())
    return shards, size


# ---------------------------------------------------------------------------------------------- the child
def _run_img2dataset(input_file: Path, out: Path, rows: int, options: CCOptions, log: Path,
                     progress: Progress | None) -> tuple[bool, int]:
    """Run img2dataset over ``input_file`` (``rows`` rows) into ``out`` under the watchdog.

    Returns:
        (stalled, samples added).

    Raises:
        DownloadError: img2dataset exited with an error.
    """
    pending = _pending(out, rows, options.shard_size)
    if pending == 0:
        return False, 0
    before = _finished(out)
    shards = sum(1 for k in _expected(rows, options.shard_size) if k not in before)
    kwargs = dict(url_list=str(input_file), input_format="parquet", url_col="url", caption_col="caption",
                  save_additional_columns=["row"], output_format="webdataset", output_folder=str(out),
                  image_size=options.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True,
                  processes_count=max(1, min(options.processes, shards)), thread_count=options.threads,
                  number_sample_per_shard=options.shard_size, timeout=options.timeout, retries=options.retries,
                  enable_wandb=False, incremental_mode="incremental", user_agent_token="evlp")
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONUNBUFFERED="1", **{JOB_ENV: f"{os.getpid()}-{time.time_ns()}"})
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n=== evlp {time.strftime('%Y-%m-%d %H:%M:%S')}: {pending} rows -> {out}\n")
        fh.flush()
        guard = str(os.getpid() if os.name == "posix" else 0)
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(kwargs), guard], stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent),
                                start_new_session=os.name == "posix")
    old_tars = {f"{out.name}/{k:05d}.tar" for k in before}
    new_stats: dict[str, int] = {}  # finished during this run: stats file -> rows
    stalled, started, reported = False, False, -1
    last, changed = None, time.monotonic()
    try:
        while proc.poll() is None:
            now, seen = time.monotonic(), activity(out, log)
            if seen != last:
                last, changed = seen, now
                names = {name for name, _ in seen[0]}
                started = started or any(n.endswith(".tar") and n not in old_tars for n in names)
                for name in names - new_stats.keys():
                    shard = name.rsplit("/", 1)[-1][: -len("_stats.json")]
                    if name.endswith("_stats.json") and shard.isdigit() and int(shard) not in before:
                        stats = _stats(out / f"{shard}.tar")
                        if stats is not None:  # else half written: read again at the next poll
                            new_stats[name] = stats["count"]
            if progress is not None and sum(new_stats.values()) != reported:
                reported = sum(new_stats.values())
                progress(reported, pending)
            limit = options.stall_timeout if started else max(options.stall_timeout, STARTUP_GRACE_S)
            if now - changed > limit:
                stalled = True
                break
            try:
                proc.wait(POLL_S)  # returns as soon as img2dataset exits
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        _clean(out)
    if not stalled and proc.returncode != 0:
        tail = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        raise DownloadError(f"img2dataset exited with code {proc.returncode} ({tail[-1] if tail else 'no output'})"
                            f" — see {log}; re-run to resume")
    finished = _finished(out)
    added = [finished[k] for k in set(finished) - set(before)]
    if progress is not None:
        progress(sum(s["count"] for s in added), pending)
    return stalled, sum(int(s.get("successes", 0)) for s in added)


def _subset(index: Path, dest: Path, rows: np.ndarray | None, limit: int | None, blank: np.ndarray) -> Path:
    """Write the index rows given to img2dataset: the first ``limit`` ones or those in ``rows``, with the URL
    emptied for the ``blank`` rows (fetched in another round: img2dataset fails them without a request)."""
    wanted = None if rows is None else pa.array(rows, pa.int64())
    blanks = pa.array(blank, pa.int64())
    left = limit
    with atomic_file(dest) as out, pq.ParquetWriter(out, _SCHEMA) as writer:
        for batch in pq.ParquetFile(index).iter_batches(batch_size=1 << 16):
            table = pa.Table.from_batches([batch]).cast(_SCHEMA)
            if left is not None:
                table, left = table.slice(0, left), left - min(left, table.num_rows)
            if wanted is not None:
                table = table.filter(pc.is_in(table["row"], value_set=wanted))
            if len(blanks):
                hit = pc.is_in(table["row"], value_set=blanks)
                table = table.set_column(0, "url", pc.if_else(hit, "", table["url"]))
            writer.write_table(table)
            if left == 0:
                break
    return dest


# ---------------------------------------------------------------------------------------------- entry
def download_cc(name: Literal["cc3m", "cc12m"], root: str | Path, *, index: str | Path | None = None,
                options: CCOptions | None = None, progress: Progress | None = None) -> CCResult:
    """Fetch Conceptual Captions 3M or 12M into ``root/<name>`` as img2dataset webdataset shards.

    Re-running resumes: finished shards are skipped, unfinished ones fetched again. With
    ``options.retry_failed`` one more round fetches only the rows that have failed so far.

    Args:
        name: ``cc3m`` or ``cc12m``.
        root: the data root.
        index: the TSV (a path, or an http(s) URL). CC3M: ``Train-GCC-training.tsv`` (caption TAB url),
            found by itself in ``root/cc3m/`` or ``root/``; CC12M: ``cc12m.tsv`` (url TAB caption),
            downloaded by default. Not needed again once normalised.
        options: see :class:`CCOptions`.
        progress: called with (rows done, rows to do) as shards finish.

    Returns:
        The counts, failures by reason, speed and the manifest written to ``root/<name>/MANIFEST.json``.

    Raises:
        UnknownNameError: ``name`` is not cc3m or cc12m.
        ConfigError: invalid options, or an index/shard size that differs from the existing shards'.
        DataNotFoundError: no CC3M index, img2dataset missing, or an index without rows.
        DownloadError: the CC12M index cannot be downloaded, or img2dataset failed.
    """
    if name not in COLUMNS:
        raise UnknownNameError(f"unknown dataset {name!r} — choose cc3m or cc12m")
    options = options or CCOptions()
    _check_options(options)
    if importlib.util.find_spec("img2dataset") is None:
        raise DataNotFoundError("downloading CC3M/CC12M needs img2dataset: pip install 'evlp[data]'")
    start = time.monotonic()
    root = Path(root).expanduser().absolute()
    folder = root / name
    (folder / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    for out in _rounds(folder):
        _clean(out)  # leftovers of a killed process
    state = _prepare_index(name, folder, root, index, options.shard_size)
    index_file, log = folder / INDEX_DIR / _INDEX_FILE, folder / INDEX_DIR / _LOG_FILE
    # img2dataset reads every *.json in its output folder as a finished shard id: keep ours out of its way
    manifest_path, aside = folder / MANIFEST, folder / f"{MANIFEST}.prev"
    if manifest_path.is_file():
        os.replace(manifest_path, aside)
    stalled, added = False, 0
    try:
        main_rows = min(state["rows"], options.limit or state["rows"])
        if _pending(folder, main_rows, options.shard_size):
            *_, fetched, _ = _tally(_rounds(folder)[1:])
            main_input = index_file
            if options.limit is not None or len(fetched):
                main_input = _subset(index_file, folder / INDEX_DIR / "main.parquet", None, options.limit, fetched)
            stalled, added = _run_img2dataset(main_input, folder, main_rows, options, log, progress)
        if options.retry_failed and not stalled:
            stalled, more = _retry_round(folder, index_file, options, log, progress)
            added += more
        state["shard_size"] = options.shard_size
        write_json(folder / INDEX_DIR / _STATE_FILE, state)
        result = _result(name, folder, state, options, stalled, added, time.monotonic() - start)
        aside.unlink(missing_ok=True)
        return result
    finally:
        if aside.is_file() and not manifest_path.is_file():
            os.replace(aside, manifest_path)


def _retry_round(folder: Path, index_file: Path, options: CCOptions, log: Path,
                 progress: Progress | None) -> tuple[bool, int]:
    """Finish the last retry round if it was stopped, else start a new one over the rows failed so far."""
    rounds = _rounds(folder)
    last = rounds[-1] if len(rounds) > 1 else None
    if last is not None:
        previous = folder / INDEX_DIR / f"{last.name}.parquet"
        if previous.is_file():
            rows = pq.read_metadata(previous).num_rows
            if _pending(last, rows, options.shard_size):
                return _run_img2dataset(previous, last, rows, options, log, progress)
    *_, failed = _tally(rounds)
    if not len(failed):
        return False, 0
    out = folder / f"retry_{int(rounds[-1].name[6:]) + 1 if last is not None else 1}"
    subset = _subset(index_file, folder / INDEX_DIR / f"{out.name}.parquet", failed, None, np.zeros(0, np.int64))
    return _run_img2dataset(subset, out, len(failed), options, log, progress)


def _result(name: str, folder: Path, state: dict, options: CCOptions, stalled: bool, added: int,
            seconds: float) -> CCResult:
    rounds = _rounds(folder)
    attempted, ok, failed, _, _ = _tally(rounds)
    shards, size = _disk(rounds)
    yield_ = ok / attempted if attempted else 0.0
    in_scope = min(state["rows"], options.limit or state["rows"])
    manifest = Manifest(
        dataset=name,
        source=[state["source"]],
        counts={"train": {"samples": ok, "shards": shards, "attempted": attempted, "index_rows": state["rows"]}},
        failures={k: v for k, v in failed.items() if v},
        tools=tool_versions("img2dataset", "webdataset"),
        layout=CC_LAYOUT,
        extra={"yield": round(yield_, 4), "expected_yield": EXPECTED_YIELD[name], "expected_yield_note":
               _YIELD_NOTE[name], "complete": not stalled and attempted >= in_scope, "stalled": stalled,
               "retry_rounds": len(rounds) - 1, "skipped_index_lines": state.get("skipped_lines", 0),
               "bytes_on_disk": size, "options": asdict(options)},
    )
    write_manifest(folder, manifest)
    return CCResult(manifest=manifest, attempted=attempted, ok=ok, failed=failed, seconds=seconds,
                    images_per_s=added / seconds if seconds > 0 else 0.0, yield_=yield_, shards=shards,
                    bytes_on_disk=size, stalled=stalled, new=added, folder=folder)
