"""Resumable, verified HTTP downloads (HTTP Range; temporary ``.part`` name; checksum; atomic rename)."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from evlp.errors import EvlpError

USER_AGENT = "evlp-downloader (+https://github.com/evlp/evlp)"
CHUNK = 1 << 20


class DownloadError(EvlpError):
    """A download failed (network, HTTP status, size or checksum)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected checksum."""


class HTTPStatusError(DownloadError):
    """The server answered with an error status; 4xx ones are not retried."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, checksum: str | None) -> None:
    if checksum is None:
        return
    algorithm, _, expected = checksum.partition(":") if ":" in checksum else ("sha256", "", checksum)
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise ChecksumError(f"{path.name}: {algorithm} is {actual}, expected {expected}; the file is corrupt or "
                            "changed upstream — delete it and download again")


def download(url: str, dest: str | os.PathLike[str], *, checksum: str | None = None, timeout: float = 60.0,
             retries: int = 3, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request.

    A complete ``dest`` (checksum verified when given) is not fetched again. Bytes go to ``dest.part`` and
    are renamed to ``dest`` only after the size and checksum check out.

    Args:
        url: http(s) or file URL.
        dest: final path.
        checksum: ``"sha256:<hex>"`` / ``"md5:<hex>"`` (bare hex = sha256), or None.
        timeout: seconds without data before a try fails.
        retries: attempts per call (resuming each time).
        progress: called with (bytes so far, total bytes or None).

    Raises:
        DownloadError: HTTP errors, truncated transfers or a checksum mismatch after all retries.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        _check(dest, checksum)
        return dest
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries):
        try:
            _fetch(url, part, timeout, progress)
            _check(part, checksum)
            os.replace(part, dest)
            return dest
        except ChecksumError as exc:  # the bytes are wrong: start over
            part.unlink(missing_ok=True)
            last = exc
        except HTTPStatusError as exc:
            if exc.code < 500:
                raise
            last = exc
        except (DownloadError, urllib.error.URLError, OSError, TimeoutError) as exc:
            last = exc
        time.sleep(min(2 ** attempt, 10) * 0.1)
    error = ChecksumError if isinstance(last, ChecksumError) else DownloadError
    raise error(f"could not download {url}: {last} (after {retries} attempts; re-run to resume)") from last


def _fetch(url: str, part: Path, timeout: float, progress: Callable[[int, int | None], None] | None) -> None:
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - user-chosen URLs
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already complete
            return
        raise HTTPStatusError(f"{url}: HTTP {exc.code} {exc.reason}", exc.code) from None
    with response:
        status = getattr(response, "status", 200)
        length = response.headers.get("Content-Length")
        if have and status != 206:  # the server ignored the range: restart
            have = 0
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as out:
            done = have
            while chunk := response.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"{url}: transfer ended at {part.stat().st_size} of {total} bytes")
