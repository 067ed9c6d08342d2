"""evlp.data.download.http.download against a local server: resume, no refetch, checksums, retries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from evlp.data.download.http import ChecksumError, DownloadError, HTTPStatusError, download, file_digest
from tests.unit.data.httpserver import LocalHTTPServer

DATA = os.urandom(300_000)  # about 0.3 chunk: several reads of a few socket buffers


def test_full_download(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    seen: list[tuple[int, int | None]] = []
    dest = download(url, tmp_path / "out" / "blob.bin", progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == DATA
    assert not dest.with_name("blob.bin.part").exists()
    assert http_server.requests["/blob.bin"] == 1 and http_server.bytes_sent["/blob.bin"] == len(DATA)
    assert seen[-1] == (len(DATA), len(DATA))


def test_interrupted_transfer_resumes_with_only_the_missing_bytes(http_server: LocalHTTPServer,
                                                                   tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    http_server.drop_after("blob.bin", 100_000)  # the first response is cut after 100 kB
    dest = download(url, tmp_path / "blob.bin")
    assert dest.read_bytes() == DATA
    assert http_server.requests["/blob.bin"] == 2
    assert http_server.bytes_sent["/blob.bin"] == len(DATA)  # nothing was sent twice
    assert [r.range for r in http_server.log] == [None, "bytes=100000-"]
    assert [r.status for r in http_server.log] == [200, 206]


def test_partial_file_from_a_killed_run_is_resumed(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    (tmp_path / "blob.bin.part").write_bytes(DATA[:123_456])
    download(url, tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == DATA
    assert http_server.bytes_sent["/blob.bin"] == len(DATA) - 123_456


def test_server_ignoring_range_restarts_cleanly(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    http_server.ignore_range("blob.bin")
    (tmp_path / "blob.bin.part").write_bytes(b"garbage that must not stay in front")
    assert download(url, tmp_path / "blob.bin").read_bytes() == DATA


def test_complete_file_is_not_fetched_again(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    sha = hashlib.sha256(DATA).hexdigest()
    dest = download(url, tmp_path / "blob.bin", checksum=f"sha256:{sha}")
    mtime = dest.stat().st_mtime_ns
    download(url, dest, checksum=sha)
    download(url, dest)
    assert http_server.requests["/blob.bin"] == 1
    assert dest.stat().st_mtime_ns == mtime
    assert file_digest(dest) == sha


def test_checksum_mismatch_raises_and_removes_the_bad_bytes(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match=f"sha256 is {hashlib.sha256(DATA).hexdigest()}, expected 0{{64}}"):
        download(url, dest, checksum="sha256:" + "0" * 64, retries=1)
    assert not dest.exists() and not dest.with_name("blob.bin.part").exists()


def test_checksum_error_names_the_file(tmp_path: Path) -> None:
    from evlp.data.download.http import _check

    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ChecksumError, match="f.bin: md5 is 900150983cd24fb0d6963f7d28e17f72"):
        _check(path, "md5:" + "1" * 32)
    _check(path, "md5:900150983cd24fb0d6963f7d28e17f72")


def test_checksum_mismatch_after_retries_is_a_download_error(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    with pytest.raises(DownloadError, match="after 2 attempts"):
        download(url, tmp_path / "blob.bin", checksum="md5:" + "0" * 32, retries=2)
    assert not (tmp_path / "blob.bin.part").exists()
    assert http_server.requests["/blob.bin"] == 2


def test_404_is_not_retried(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.url("missing.bin")
    with pytest.raises(HTTPStatusError) as info:
        download(url, tmp_path / "missing.bin", retries=3)
    assert info.value.code == 404
    assert http_server.requests["/missing.bin"] == 1
    assert not (tmp_path / "missing.bin").exists()


def test_configured_404_on_an_existing_file(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("gone.bin", DATA)
    http_server.fail("gone.bin", 404)
    with pytest.raises(HTTPStatusError):
        download(url, tmp_path / "gone.bin")
    assert http_server.requests["/gone.bin"] == 1


def test_503_once_is_retried(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    http_server.fail("blob.bin", 503, times=1)
    assert download(url, tmp_path / "blob.bin").read_bytes() == DATA
    assert [r.status for r in http_server.log] == [503, 200]


def test_persistent_503_gives_up_with_a_resumable_error(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    http_server.fail("blob.bin", 503)
    with pytest.raises(DownloadError, match="re-run to resume"):
        download(url, tmp_path / "blob.bin", retries=2)
    assert http_server.requests["/blob.bin"] == 2


def test_slow_server_times_out(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("blob.bin", DATA)
    http_server.slow("blob.bin", 1.0)
    with pytest.raises(DownloadError):
        download(url, tmp_path / "blob.bin", timeout=0.2, retries=1)
    assert not (tmp_path / "blob.bin").exists()


def test_server_counts_and_reset(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    url = http_server.put("a/b.bin", b"x" * 10)
    download(url, tmp_path / "b.bin")
    assert http_server.total_requests() == 1 and http_server.bytes_sent["/a/b.bin"] == 10
    http_server.reset()
    assert http_server.total_requests() == 0 and not http_server.log
