"""Resumable, verified HTTP downloads (HTTP Range; temporary ``.part`` name; checksum; atomic rename).

Requests go through ``requests`` (streamed, never held in memory). Each try sends ``Range: bytes=N-`` for
the ``N`` bytes already in ``dest.part``: ``206`` appends the rest, ``200`` (a server that ignores ranges)
restarts the file, ``416`` means the part is already whole. Connection errors, cut transfers, timeouts and
5xx answers are tried again, ``retries`` tries in all with a short growing pause, each resuming where the
last stopped; other 4xx answers fail at once. Bytes are stored exactly as sent (``Accept-Encoding:
identity``, no content decoding), so ranges and checksums refer to the same bytes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from evlp.errors import EvlpError
from evlp.io import CHUNK, file_digest

try:  # the [data] extra: download() says how to install it when it is missing
    import requests
    from urllib3.exceptions import HTTPError as TransportError  # a cut or timed-out body read
except ImportError:  # pragma: no cover - evlp installed without [data]
    requests = None  # type: ignore[assignment]

__all__ = ["USER_AGENT", "ChecksumError", "DownloadError", "HTTPStatusError", "download", "file_digest"]

USER_AGENT = "evlp-downloader (+https://github.com/evlp/evlp)"
BACKOFF_S = 0.1  # pause after failed try k: BACKOFF_S * 2**k, at most BACKOFF_S * 10


class DownloadError(EvlpError):
    """A download failed (network, HTTP status, size or checksum)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected checksum."""


class HTTPStatusError(DownloadError):
    """The server answered with an error status; 4xx ones are not retried."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


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
        timeout: seconds to connect, and seconds without data before a try fails.
        retries: attempts per call (resuming each time).
        progress: called with (bytes so far, total bytes or None).

    Raises:
        HTTPStatusError: a 4xx answer (not retried); ``code`` is the status.
        ChecksumError: the bytes did not match ``checksum`` on the last try.
        DownloadError: a malformed URL, ``requests`` missing, or network errors, 5xx answers and truncated
            transfers on every try (the message names the URL and the last error, e.g. ``HTTP 503 ...``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        _check(dest, checksum)
        return dest
    if requests is None and urlparse(url).scheme != "file":  # pragma: no cover - installed without [data]
        raise DownloadError(f"downloading {url} needs the 'requests' package — pip install 'evlp[data]'")
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(min(2 ** (attempt - 1), 10) * BACKOFF_S)
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
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                requests.exceptions.MissingSchema) as exc:
            raise DownloadError(f"cannot download {url!r}: {exc} — pass an http(s):// or file:// URL") from None
        except (DownloadError, requests.RequestException, TransportError, OSError) as exc:
            last = exc
    error = ChecksumError if isinstance(last, ChecksumError) else DownloadError
    raise error(f"could not download {url}: {last} (after {retries} attempts; re-run to resume)") from last


def _fetch(url: str, part: Path, timeout: float, progress: Callable[[int, int | None], None] | None) -> None:
    """One try: append what ``part`` lacks (or rewrite it when the server ignores the range)."""
    have = part.stat().st_size if part.is_file() else 0
    if urlparse(url).scheme == "file":
        return _fetch_file(Path(unquote(urlparse(url).path)), part, have, progress)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 416 and have:  # the part is already complete
            return
        if status >= 400:
            raise HTTPStatusError(f"{url}: HTTP {status} {response.reason or ''}".rstrip(), status)
        if have and status != 206:  # the server ignored the range: restart
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None and length.isdigit() else None
        with open(part, "ab" if have else "wb") as out:
            done = have
            for chunk in response.raw.stream(CHUNK, decode_content=False):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    if total is not None and part.stat().st_size != total:
        raise DownloadError(f"{url}: transfer ended at {part.stat().st_size} of {total} bytes")


def _fetch_file(src: Path, part: Path, have: int, progress: Callable[[int, int | None], None] | None) -> None:
    """Copy a ``file://`` source from byte ``have`` on (a local mirror)."""
    total = src.stat().st_size
    have = have if have <= total else 0
    with open(src, "rb") as fh, open(part, "ab" if have else "wb") as out:
        fh.seek(have)
        shutil.copyfileobj(fh, out, CHUNK)
    if progress is not None:
        progress(total, total)
