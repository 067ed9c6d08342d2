"""evlp.data.download.cc against a local server: img2dataset shards, failure reasons, the watchdog,
resuming, retrying only the failed rows, and a tiny pretraining on the result.

img2dataset starts slowly (seconds per run), so the runs are module fixtures shared by the tests:
``cc3m_first`` (a full run), ``cc3m_retry`` (retry_failed over it), ``cc12m_stalled`` (stopped by the
watchdog) and ``cc12m_resumed`` (the re-run that completes it).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evlp.data.download import cc
from evlp.data.download.watchdog import JOB_ENV
from evlp.data.download.cc import CCOptions, classify_failure, download_cc, normalise_index
from evlp.data.download.manifest import read_manifest
from evlp.data.shards import ShardStream, count_samples, expand_shards
from evlp.errors import ConfigError, DataNotFoundError, UnknownNameError
from tests.unit.data.httpserver import LocalHTTPServer

IMAGE_SIZE, SHARD_SIZE = 48, 20
SLOW_S, TIMEOUT_S = 8.0, 3.0


def _image(seed: int, size: tuple[int, int], mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=85) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def _options(**kw: object) -> CCOptions:
    base = dict(image_size=IMAGE_SIZE, processes=1, threads=8, shard_size=SHARD_SIZE, timeout=TIMEOUT_S, retries=0,
                stall_timeout=60.0)
    base.update(kw)
    return CCOptions(**base)  # type: ignore[arg-type]


def _leftover_jobs() -> list[int]:
    """Live processes (not zombies) that carry the marker every process of an img2dataset job has."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if JOB_ENV.encode() + b"=" in environ and state != "Z":
            pids.append(int(entry))
    return pids


def _job_processes() -> list[tuple[str, bool]]:
    """(command line, whether torch's library is loaded) of every live process of an img2dataset job."""
    found = []
    for pid in _leftover_jobs():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
        except OSError:  # ended meanwhile
            continue
        found.append((cmdline, "libtorch" in maps))
    return found


def _samples(shards: list[Path]) -> list[dict]:
    """Every sample of ``shards`` once, read with ShardStream (one epoch of one worker)."""
    def decode(data: dict[str, bytes], key: str) -> dict:
        img = Image.open(io.BytesIO(data["jpg"]))
        img.load()
        meta = json.loads(data["json"])
        return {"row": meta["row"], "caption": data["txt"].decode(), "size": img.size, "mode": img.mode,
                "format": img.format, "meta": meta}

    n = count_samples(shards)
    stream = iter(ShardStream(shards, batch_size=1, decode=decode, collate=lambda items: {"items": items}))
    return [next(stream)["items"][0] for _ in range(n)]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = LocalHTTPServer(tmp_path_factory.mktemp("www")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cc3m_fixture(server: LocalHTTPServer, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CC3M-style TSV (caption TAB url): 60 images (3 of them RGBA PNGs named .jpg), 4 missing URLs, one
    slower than the timeout, one corrupt image, three that answer 503 once."""
    rng = random.Random(0)
    rows: list[tuple[str, str]] = []
    kind: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    paths: dict[int, str] = {}

    def add(what: str, path: str) -> None:
        kind[len(rows)] = what
        paths[len(rows)] = "/" + path
        rows.append((f"photo {len(rows)}\twith a tab" if len(rows) == 5 else f"photo {len(rows)}", server.url(path)))

    for i in range(60):
        size = (rng.randint(24, 120), rng.randint(24, 120))
        rgba = i in (7, 31, 52)
        server.put(f"cc3m/img{i}.jpg", _image(i, size, "RGBA" if rgba else "RGB", "PNG" if rgba else "JPEG"))
        sizes[len(rows)] = size
        add("rgba" if rgba else "ok", f"cc3m/img{i}.jpg")
        if i in (3, 17, 29, 44):
            add("404", f"cc3m/missing{i}.jpg")
        if i == 22:
            server.put("cc3m/slow.jpg", _image(99, (50, 50)))
            server.slow("cc3m/slow.jpg", SLOW_S)
            add("timeout", "cc3m/slow.jpg")
        if i == 40:
            server.put("cc3m/corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(rng.randbytes(300)))
            add("decode", "cc3m/corrupt.jpg")
        if i in (10, 35, 57):
            server.put(f"cc3m/busy{i}.jpg", _image(1000 + i, (40, 30)))
            server.fail(f"cc3m/busy{i}.jpg", 503, times=1)
            sizes[len(rows)] = (40, 30)
            add("busy", f"cc3m/busy{i}.jpg")
    tsv = tmp_path_factory.mktemp("cc3m_index") / "Train-GCC-training.tsv"
    tsv.write_text("".join(f"{c}\t{u}\n" for c, u in rows), encoding="utf-8")
    return SimpleNamespace(tsv=tsv, rows=rows, kind=kind, sizes=sizes, paths=paths)


@pytest.fixture(scope="module")
def cc3m_first(server: LocalHTTPServer, cc3m_fixture: SimpleNamespace,
               tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("data")
    before, first = Counter(server.requests), len(server.log)
    calls: list[tuple[int, int | None]] = []
    processes: list[tuple[str, bool]] = []  # the job's processes, seen whenever a shard finishes

    def progress(done: int, total: int | None) -> None:
        calls.append((done, total))
        processes.extend(_job_processes())

    result = download_cc("cc3m", root, index=cc3m_fixture.tsv, options=_options(), progress=progress)
    requests = Counter(server.requests) - before
    log = server.log[first:]
    main = sorted((root / "cc3m").glob("*.tar"))
    return SimpleNamespace(root=root, result=result, requests=requests, log=log, calls=calls, main=main,
                           samples=_samples(main), leftovers=_leftover_jobs(), processes=processes)


@pytest.fixture(scope="module")
def cc3m_retry(server: LocalHTTPServer, cc3m_first: SimpleNamespace) -> SimpleNamespace:
    before = Counter(server.requests)
    result = download_cc("cc3m", cc3m_first.root, options=_options(retry_failed=True))
    return SimpleNamespace(result=result, requests=Counter(server.requests) - before)


@pytest.fixture(scope="module")
def cc12m_fixture(server: LocalHTTPServer) -> SimpleNamespace:
    """A CC12M-style TSV (url TAB caption) of 35 rows served by the server; row 25 never answers in time."""
    rows = []
    for i in range(35):
        url = server.put(f"cc12m/{i}.jpg", _image(500 + i, (30 + i, 40)))
        rows.append((url, f"twelve million {i}"))
    server.slow("cc12m/25.jpg", 120.0)
    index_url = server.put("cc12m.tsv", "".join(f"{u}\t{c}\n" for u, c in rows).encode())
    return SimpleNamespace(rows=rows, index_url=index_url, hang="/cc12m/25.jpg")


@pytest.fixture(scope="module")
def cc12m_stalled(server: LocalHTTPServer, cc12m_fixture: SimpleNamespace,
                  tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("data12")
    opts = _options(shard_size=10, timeout=90.0, stall_timeout=5.0, limit=30)
    start = time.monotonic()
    result = download_cc("cc12m", root, index=cc12m_fixture.index_url, options=opts)
    elapsed = time.monotonic() - start
    return SimpleNamespace(root=root, opts=opts, result=result, elapsed=elapsed, leftovers=_leftover_jobs(),
                           requests=Counter(server.requests), files=sorted(p.name for p in (root / "cc12m").iterdir()))


@pytest.fixture(scope="module")
def cc12m_resumed(server: LocalHTTPServer, cc12m_fixture: SimpleNamespace,
                  cc12m_stalled: SimpleNamespace) -> SimpleNamespace:
    server.slow(cc12m_fixture.hang, 0.0)
    opts = _options(shard_size=10, timeout=10.0, stall_timeout=30.0, limit=30)
    result = download_cc("cc12m", cc12m_stalled.root, index=cc12m_fixture.index_url, options=opts)
    return SimpleNamespace(result=result, requests=Counter(server.requests))


# ------------------------------------------------------------------------------------------- fast unit tests
@pytest.mark.parametrize(("status", "message", "reason"), [
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    ("failed_to_download", "HTTP Error 410: Gone", "http_404"),
    ("failed_to_download", "HTTP Error 403: Forbidden", "http_403"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_other"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "The read operation timed out", "timeout"),
    ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns"),
    ("failed_to_download", "<urlopen error [Errno -3] Temporary failure in name resolution>", "dns"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection"),
    ("failed_to_download", "IncompleteRead(100 bytes read, 4900 more expected)", "connection"),
    ("failed_to_download", "Remote end closed connection without response", "connection"),
    ("failed_to_resize", "Image decoding error", "decode"),
    ("failed_to_resize", "image too small", "resize"),
    ("failed_to_download", "unknown url type: ''", "other"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "other"),
])
def test_classify_failure(status: str, message: str, reason: str) -> None:
    assert classify_failure(status, message) == reason
    assert reason in cc.REASONS


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_normalise_index_rows_are_tsv_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(cc, "_CHUNK", chunk)  # tiny chunks cut lines (and a UTF-8 character) in two
    lines = ["a dog\thttp://x/1.jpg", "", "caption\turl", "a\ttabbed caption é\thttp://x/2.jpg\r",
             "no tab here", "  spaced  \t http://x/3.jpg ", "bad \xff byte\thttp://x/4.jpg"]
    raw = "\n".join(lines).encode("utf-8").replace("\xff".encode("utf-8"), b"\xff")
    (tmp_path / "i.tsv").write_bytes(raw)  # no final newline
    kept, skipped = normalise_index(tmp_path / "i.tsv", tmp_path / "i.parquet", ("caption", "url"))
    table = pq.read_table(tmp_path / "i.parquet").to_pylist()
    assert (kept, skipped) == (4, 3)
    assert [r["row"] for r in table] == [0, 3, 5, 6]
    assert [r["url"] for r in table] == ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg", "http://x/4.jpg"]
    assert table[1]["caption"] == "a\ttabbed caption é" and table[2]["caption"] == "spaced"
    assert table[3]["caption"] == "bad \ufffd byte"

    (tmp_path / "j.tsv").write_text("http://y/1.jpg\tfirst\thas a tab\nhttp://y/2.jpg\tsecond\n")
    assert normalise_index(tmp_path / "j.tsv", tmp_path / "j.parquet", ("url", "caption")) == (2, 0)
    assert pq.read_table(tmp_path / "j.parquet").to_pylist()[0] == {"url": "http://y/1.jpg",
                                                                    "caption": "first\thas a tab", "row": 0}


def test_cc3m_needs_the_index(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="Training split.*ai.google.com/research/ConceptualCaptions"):
        download_cc("cc3m", tmp_path)
    with pytest.raises(DataNotFoundError, match="nope.tsv"):
        download_cc("cc3m", tmp_path, index=tmp_path / "nope.tsv")
    (tmp_path / "swapped.tsv").write_text("http://x/1.jpg\ta caption\n")  # CC12M order given as CC3M
    with pytest.raises(DataNotFoundError, match="caption TAB url"):
        download_cc("cc3m", tmp_path, index=tmp_path / "swapped.tsv")


def test_bad_name_and_options(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="cc3m or cc12m"):
        download_cc("cc4m", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        download_cc("cc3m", tmp_path, options=CCOptions(shard_size=0, timeout=0, limit=0))
    assert len(err.value.problems) == 3


def test_shard_size_is_fixed_once_shards_exist(tmp_path: Path) -> None:
    tsv = tmp_path / "Train-GCC-training.tsv"
    tsv.write_text("a\thttp://127.0.0.1:9/a.jpg\n")
    folder = tmp_path / "cc3m"
    cc._prepare_index("cc3m", folder, tmp_path, tsv, shard_size=10)
    (folder / "00000.tar").write_bytes(b"")
    (folder / "00000_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))
    with pytest.raises(ConfigError, match="shard_size=20 differs from the 10"):
        download_cc("cc3m", tmp_path, options=CCOptions(shard_size=20))
    other = tmp_path / "other.tsv"
    other.write_text("b\thttp://127.0.0.1:9/b.jpg\nc\thttp://127.0.0.1:9/c.jpg\n")
    with pytest.raises(ConfigError, match="differs"):
        download_cc("cc3m", tmp_path, index=other, options=CCOptions(shard_size=10))


def _fake_shard(out: Path, k: int, records: list[tuple[int, str, str | None]]) -> None:
    """A finished shard as img2dataset leaves it: tar, status parquet (row, status, error_message), stats."""
    import pyarrow as pa

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{k:05d}.tar").write_bytes(b"")
    rows, status, message = zip(*records)
    pq.write_table(pa.table({"row": list(rows), "status": list(status), "error_message": list(message)}),
                   out / f"{k:05d}.parquet")
    ok = sum(s == "success" for s in status)
    (out / f"{k:05d}_stats.json").write_text(json.dumps({"count": len(records), "successes": ok}))


def test_tally_clean_pending_and_subset(tmp_path: Path) -> None:
    folder = tmp_path / "cc3m"
    ok, e404, e503 = ("success", None), ("failed_to_download", "HTTP Error 404: Not Found"), \
        ("failed_to_download", "HTTP Error 503: Service Unavailable")
    _fake_shard(folder, 0, [(0, *ok), (1, *e404), (2, *e503)])
    _fake_shard(folder, 1, [(3, *e503), (4, *ok)])  # a partial last shard (limit=5, shard_size=3)
    _fake_shard(folder / "retry_1", 0, [(1, *e404), (2, *ok), (3, "failed_to_download", "timed out")])
    (folder / "00002.tar").write_bytes(b"half")  # left by a killed run: no stats
    (folder / "00003_stats.json").write_text("{\"count\": ")  # half written
    (folder / "_tmp").mkdir()
    cc._clean(folder)
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    assert not (folder / "_tmp").exists()

    attempted, n_ok, failed, ok_rows, failed_rows = cc._tally(cc._rounds(folder))
    assert (attempted, n_ok) == (5, 3) and list(ok_rows) == [0, 2, 4] and list(failed_rows) == [1, 3]
    assert failed["http_404"] == 1 and failed["timeout"] == 1 and failed["http_other"] == 0  # latest attempt

    # a larger limit: shard 1 must be fetched whole again, shard 0 is done
    assert cc._pending(folder, 5, 3) == 0 and cc._pending(folder, 8, 3) == 3 + 2
    assert not (folder / "00001.tar").exists() and (folder / "00000.tar").exists()
    assert cc._pending(folder, 2, 3) == 0  # a smaller limit keeps the larger shard

    tsv = tmp_path / "i.tsv"
    tsv.write_text("".join(f"c{i}\thttp://h/{i}.jpg\n" for i in range(10)))
    normalise_index(tsv, tmp_path / "i.parquet", ("caption", "url"))
    main = pq.read_table(cc._subset(tmp_path / "i.parquet", tmp_path / "m.parquet", None, 6,
                                    ok_rows)).to_pylist()
    assert [r["row"] for r in main] == list(range(6))
    assert [r["url"] for r in main if r["url"] == ""] == ["", "", ""] and main[1]["url"] == "http://h/1.jpg"
    retry = pq.read_table(cc._subset(tmp_path / "i.parquet", tmp_path / "r.parquet", failed_rows, None,
                                     np.zeros(0, np.int64))).to_pylist()
    assert retry == [{"url": "http://h/1.jpg", "caption": "c1", "row": 1},
                     {"url": "http://h/3.jpg", "caption": "c3", "row": 3}]


def test_interrupt_kills_the_job(tmp_path: Path) -> None:
    """Ctrl-C (here raised from the progress callback) stops img2dataset and leaves no process behind."""
    tsv = tmp_path / "i.tsv"
    tsv.write_text("".join(f"c{i}\thttp://127.0.0.1:9/{i}.jpg\n" for i in range(5)))
    (tmp_path / "cc3m").mkdir()
    (tmp_path / "cc3m" / "MANIFEST.json").write_text('{"dataset": "cc3m"}')

    def interrupt(done: int, total: int | None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_cc("cc3m", tmp_path, index=tsv, options=_options(), progress=interrupt)
    assert _leftover_jobs() == []
    assert read_manifest(tmp_path / "cc3m") is not None  # set aside during the run, put back
    assert not list((tmp_path / "cc3m").glob("*.tar")) and not (tmp_path / "cc3m" / "_tmp").exists()


def test_job_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL leaves evlp no chance to clean up: the child's guard ends img2dataset's process group."""
    tsv = tmp_path / "i.tsv"
    tsv.write_text("".join(f"c{i}\thttp://127.0.0.1:9/{i}.jpg\n" for i in range(5)))
    code = ("import sys; from evlp.data.download.cc import CCOptions, download_cc; "
            "download_cc('cc3m', sys.argv[1], index=sys.argv[2], options=CCOptions(processes=1, threads=2))")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(tsv)], cwd=Path(__file__).parents[3])
    try:
        deadline = time.monotonic() + 60
        while not _leftover_jobs() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _leftover_jobs(), "img2dataset never started"
        time.sleep(1.0)  # the guard thread is running by now
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _leftover_jobs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftover_jobs() == []


# ------------------------------------------------------------------------------------------- cc3m end to end
def test_cc3m_end_to_end(cc3m_first: SimpleNamespace, cc3m_fixture: SimpleNamespace) -> None:
    fx, res = cc3m_fixture, cc3m_first.result
    good = {row for row, k in fx.kind.items() if k in ("ok", "rgba")}
    # what the server really answered with a readable image (the slow URL's late 200 does not count)
    served = {r.path for r in cc3m_first.log if r.status == 200 and r.sent > 0} - {"/cc3m/slow.jpg",
                                                                                 "/cc3m/corrupt.jpg"}
    assert served == {fx.paths[row] for row in good}
    assert all(cc3m_first.requests[fx.paths[row]] == 1 for row in fx.kind)  # retries=0: one request per row

    assert (res.attempted, res.ok, res.new) == (len(fx.rows), len(served), len(served))
    assert res.failed == {"http_404": 4, "http_403": 0, "http_other": 3, "timeout": 1, "dns": 0,
                          "connection": 0, "decode": 1, "resize": 0, "other": 0}
    assert res.yield_ == pytest.approx(len(served) / len(fx.rows)) and not res.stalled
    assert res.shards == len(cc3m_first.main) == -(-len(fx.rows) // SHARD_SIZE)
    assert res.bytes_on_disk == sum(p.stat().st_size for p in (cc3m_first.root / "cc3m").glob("0*.*"))
    assert cc3m_first.calls[-1] == (len(fx.rows), len(fx.rows)) and cc3m_first.leftovers == []

    samples = cc3m_first.samples
    assert sorted(s["row"] for s in samples) == sorted(good)
    for s in samples:
        assert s["caption"] == fx.rows[s["row"]][0]
        assert s["meta"]["url"] == fx.rows[s["row"]][1] and s["meta"]["status"] == "success"
        w, h = fx.sizes[s["row"]]
        assert min(s["size"]) == min(IMAGE_SIZE, w, h)  # shorter side, never enlarged
        assert abs(s["size"][0] / s["size"][1] - w / h) < 0.05
        assert (s["format"], s["mode"]) == ("JPEG", "RGB")  # RGBA PNGs too
    assert count_samples(cc3m_first.main) == res.ok

    manifest = read_manifest(cc3m_first.root / "cc3m")
    assert manifest is not None and manifest.counts["train"]["samples"] == res.ok
    assert manifest.failures == {"http_404": 4, "http_other": 3, "timeout": 1, "decode": 1}
    assert manifest.extra["expected_yield"] == 0.70 and "img2dataset" in manifest.tools
    assert manifest.source == [str(fx.tsv.resolve())]
    # img2dataset's temp folder and unfinished shards are gone; the index is kept for re-runs
    assert not (cc3m_first.root / "cc3m" / "_tmp").exists()
    assert (cc3m_first.root / "cc3m" / "_index" / "index.parquet").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forking the job and /proc are Linux-only")
def test_cc3m_job_starts_without_reimporting(cc3m_first: SimpleNamespace) -> None:
    """img2dataset's logger and workers are forked from the child (not spawned: each would import img2dataset
    again), and no process of the job loads torch, which img2dataset never needs (see watchdog.RUNNER)."""
    commands = [cmd for cmd, _ in cc3m_first.processes if cmd]  # a process that is exiting has none
    assert sum("-c" in cmd.split() for cmd in commands) >= 3  # the child, its logger and a worker were seen
    assert [cmd for cmd in commands if "spawn_main" in cmd] == []
    assert not any(torch for _, torch in cc3m_first.processes)
    log = (cc3m_first.root / "cc3m" / "_index" / "img2dataset.log").read_text()
    assert "evlp: img2dataset started" in log and "Traceback" not in log and "leaked" not in log


def test_cc3m_retry_failed_fetches_only_failed_rows(cc3m_first: SimpleNamespace, cc3m_retry: SimpleNamespace,
                                                    cc3m_fixture: SimpleNamespace) -> None:
    fx, res = cc3m_fixture, cc3m_retry.result
    failed = {fx.paths[row] for row, k in fx.kind.items() if k not in ("ok", "rgba")}
    assert set(cc3m_retry.requests) == failed and all(n == 1 for n in cc3m_retry.requests.values())
    busy = {row for row, k in fx.kind.items() if k == "busy"}
    assert res.ok == cc3m_first.result.ok + len(busy) and res.new == len(busy)
    assert res.attempted == len(fx.rows) and res.manifest.extra["retry_rounds"] == 1
    assert res.failed["http_other"] == 0 and res.failed["http_404"] == 4 and res.failed["timeout"] == 1
    shards = expand_shards(cc3m_first.root, ["cc3m"])  # finds retry_1/ too
    assert any(p.parent.name == "retry_1" for p in shards)
    rows = sorted(s["row"] for s in _samples(shards))
    assert rows == sorted({s["row"] for s in cc3m_first.samples} | busy)  # each sample once

    # nothing failed is left that can succeed; running again without retry_failed fetches nothing
    again = download_cc("cc3m", cc3m_first.root, options=_options())
    assert (again.new, again.ok) == (0, res.ok)


def test_pretrain_on_downloaded_shards(cc3m_first: SimpleNamespace, tmp_path: Path) -> None:
    from evlp.config import PretrainConfig, load_config
    from evlp.train.pretrain import pretrain

    cfg = load_config(PretrainConfig, "tiny", [f"data.root={cc3m_first.root}", "data.train=[cc3m]", "data.val=null",
                                               "train.max_steps=2", "train.batch_size=4", "data.num_workers=0",
                                               f"out={tmp_path / 'run'}"])
    result = pretrain(cfg)
    assert result.steps == 2
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# ------------------------------------------------------------------------------------------- watchdog and resume
def test_watchdog_stops_a_stalled_job(cc12m_stalled: SimpleNamespace, cc12m_fixture: SimpleNamespace) -> None:
    res = cc12m_stalled.result
    assert res.stalled and res.manifest.extra["stalled"] and not res.manifest.extra["complete"]
    # returned long before the hanging URL's timeout (90 s) or the server's answer (120 s)
    assert cc12m_stalled.elapsed < 60
    assert cc12m_stalled.leftovers == []
    # the shards finished before the stall are kept; the one that hung is removed, not left truncated
    assert (res.shards, res.ok, res.attempted) == (2, 20, 20)
    assert [f for f in cc12m_stalled.files if f.endswith((".tar", ".parquet"))] == [
        "00000.parquet", "00000.tar", "00001.parquet", "00001.tar"]
    assert "_tmp" not in cc12m_stalled.files and "MANIFEST.json" in cc12m_stalled.files
    index = cc12m_stalled.root / "cc12m" / "_index"
    assert (index / "cc12m.tsv").is_file() and pq.read_metadata(index / "index.parquet").num_rows == 35


def test_resume_completes_without_refetching(cc12m_stalled: SimpleNamespace, cc12m_resumed: SimpleNamespace,
                                             cc12m_fixture: SimpleNamespace) -> None:
    fx, res = cc12m_fixture, cc12m_resumed.result
    assert not res.stalled and (res.ok, res.attempted, res.shards, res.new) == (30, 30, 3, 10)
    assert res.manifest.extra["complete"]
    requests = cc12m_resumed.requests
    path = lambda i: f"/cc12m/{i}.jpg"  # noqa: E731
    assert all(requests[path(i)] == 1 for i in range(20))  # finished shards: never again
    assert all(1 <= requests[path(i)] <= 2 for i in range(20, 30))  # the stopped shard: again
    assert all(requests[path(i)] == 0 for i in range(30, 35))  # beyond limit
    assert requests["/cc12m.tsv"] == 1  # the index is downloaded once and reused
    samples = _samples(expand_shards(cc12m_stalled.root, ["cc12m"]))
    # the same samples as an uninterrupted run: every row once, with the caption of its TSV line
    assert sorted((s["row"], s["caption"]) for s in samples) == [(i, fx.rows[i][1]) for i in range(30)]
    assert all(s["meta"]["url"] == fx.rows[s["row"]][0] for s in samples)
    assert _leftover_jobs() == []
