"""A local HTTP file server for download tests (127.0.0.1 only, a free port, a background thread).

It serves the files of one folder, honours ``Range: bytes=a-b`` (206 + Content-Range, 416 past the
end), counts requests and body bytes per path so that a test can assert "nothing was fetched twice",
and misbehaves on demand, per path:

    server.fail("/a.zip", 404)                 # always 404
    server.fail("/a.zip", 503, times=1)        # 503 once, then the file
    server.slow("/a.zip", 2.0)                 # sleep before answering
    server.drop_after("/a.zip", 1000)          # send 1000 body bytes, then cut the connection (once)
    server.ignore_range("/a.zip")              # answer 200 with the whole file even to a Range request

Use the ``http_server`` fixture (import it into a test module: ``from tests.unit.data.httpserver import
http_server``) or ``with LocalHTTPServer(folder) as server:``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

import pytest

__all__ = ["LocalHTTPServer", "Request", "http_server"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    status: int
    sent: int  # body bytes written


@dataclass
class _Behaviour:
    status: int | None = None
    status_times: int | None = None  # None = always
    delay: float = 0.0
    drop_after: int | None = None
    drop_times: int | None = None
    ignore_range: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class LocalHTTPServer:
    """Serves ``directory`` on ``http://127.0.0.1:<free port>/``; see the module docstring."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.requests: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.log: list[Request] = []
        self._behaviours: dict[str, _Behaviour] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LocalHTTPServer":
        handler = type("Handler", (_Handler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "LocalHTTPServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start the server first"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The URL of ``path`` (relative to the served folder)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    # ------------------------------------------------------------------ content and behaviours
    def put(self, path: str, data: bytes) -> str:
        """Write ``data`` to the served folder at ``path``; returns its URL."""
        target = self.directory / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return self.url(path)

    def _behaviour(self, path: str) -> _Behaviour:
        return self._behaviours.setdefault("/" + path.lstrip("/"), _Behaviour())

    def fail(self, path: str, status: int = 503, times: int | None = None) -> None:
        """Answer ``status`` to the next ``times`` requests of ``path`` (None: to all)."""
        b = self._behaviour(path)
        b.status, b.status_times = status, times

    def slow(self, path: str, seconds: float) -> None:
        """Wait ``seconds`` before answering requests of ``path``."""
        self._behaviour(path).delay = seconds

    def drop_after(self, path: str, nbytes: int, times: int | None = 1) -> None:
        """Send only ``nbytes`` body bytes of the next ``times`` requests of ``path``, then cut the connection."""
        b = self._behaviour(path)
        b.drop_after, b.drop_times = nbytes, times

    def ignore_range(self, path: str, ignore: bool = True) -> None:
        """Answer Range requests of ``path`` with the whole file (200), as some servers do."""
        self._behaviour(path).ignore_range = ignore

    def set_headers(self, path: str, **headers: str) -> None:
        """Extra response headers for ``path``."""
        self._behaviour(path).headers.update(headers)

    def reset(self) -> None:
        """Forget the counts, the log and every behaviour."""
        with self._lock:
            self.requests.clear()
            self.bytes_sent.clear()
            self.log.clear()
            self._behaviours.clear()

    def total_requests(self) -> int:
        return sum(self.requests.values())

    # ------------------------------------------------------------------ used by the handler
    def _take(self, path: str) -> tuple[_Behaviour, int | None, int | None]:
        """The path's behaviour and, consuming one use each, the status to fail with and the drop point."""
        with self._lock:
            self.requests[path] += 1
            b = self._behaviours.get(path, _Behaviour())
            status = drop = None
            if b.status is not None and (b.status_times is None or b.status_times > 0):
                status = b.status
                if b.status_times is not None:
                    b.status_times -= 1
            elif b.drop_after is not None and (b.drop_times is None or b.drop_times > 0):
                drop = b.drop_after
                if b.drop_times is not None:
                    b.drop_times -= 1
            return b, status, drop

    def _record(self, request: Request) -> None:
        with self._lock:
            self.bytes_sent[request.path] += request.sent
            self.log.append(request)


class _Handler(BaseHTTPRequestHandler):
    owner: LocalHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _send_status(self, path: str, rng: str | None, status: int) -> None:
        body = f"{status}\n".encode()
        self.owner._record(Request(self.command, path, rng, status, 0))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _serve(self, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        rng = self.headers.get("Range")
        behaviour, fail_status, drop = self.owner._take(path)
        if behaviour.delay and self.owner._stop.wait(behaviour.delay):
            return
        if fail_status is not None:
            return self._send_status(path, rng, fail_status)
        root = self.owner.directory.resolve()
        file = (root / path.lstrip("/")).resolve()
        if root not in file.parents or not file.is_file():
            return self._send_status(path, rng, 404)
        data = file.read_bytes()
        start, end, status = 0, len(data), 200
        if rng and not behaviour.ignore_range:
            match = _RANGE.match(rng.strip())
            if match is None or (not match.group(1) and not match.group(2)):
                return self._send_status(path, rng, 416)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            else:  # a suffix range: the last N bytes
                start = max(0, len(data) - int(match.group(2)))
            if start >= len(data):
                self.owner._record(Request(self.command, path, rng, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return
            status = 206
        chunk = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        for key, value in behaviour.headers.items():
            self.send_header(key, value)
        self.end_headers()
        payload = (chunk if drop is None else chunk[:drop]) if body else b""
        # recorded before writing, so that the counts are final once the client has the bytes
        self.owner._record(Request(self.command, path, rng, status, len(payload)))
        if payload:
            self.wfile.write(payload)
            self.wfile.flush()
        if drop is not None:
            self._cut()

    def _cut(self) -> None:
        """End the connection mid-body, as a network failure would."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalHTTPServer]:
    """A started :class:`LocalHTTPServer` serving ``tmp_path / "www"``."""
    server = LocalHTTPServer(tmp_path / "www").start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 5.0) -> bool:  # noqa: ANN001 - a small polling helper
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
