"""A fault-injecting HTTP proxy for tests and benchmarks (standard library, threads).

Clients talk to the proxy as if it were the storage server (point their endpoint at
:attr:`FaultProxy.endpoint`); it forwards each request to the upstream server and streams
the answer back, counting requests and bytes. On demand it injects faults:

* ``fail_rate``: a share of requests is answered ``fail_status`` (503 by default) without
  reaching the server;
* ``drop_rate``: a share of requests gets its connection closed with no answer;
* ``cut_rate``: a share of uploads (bodies of at least ``cut_min_bytes``) is forwarded
  only half-way, then both connections are closed: the server sees a truncated upload.

``match`` (a callable of method and path) limits faults to some requests. Rates are
drawn from a seeded random generator, so a test is repeatable. Setting ``fail_rate=1``
makes a persistent outage. Example::

    with FaultProxy("http://127.0.0.1:9000") as proxy:
        proxy.configure(fail_rate=0.2)
        ...  # use proxy.endpoint
        print(proxy.stats())
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_BLOCK = 4 << 20
_ERROR_CODES = {403: "AccessDenied", 404: "NoSuchKey", 429: "SlowDown", 503: "ServiceUnavailable"}


@dataclass
class Faults:
    """What to inject; see the module docstring."""

    fail_rate: float = 0.0
    fail_status: int = 503
    drop_rate: float = 0.0
    cut_rate: float = 0.0
    cut_min_bytes: int = 1
    match: Callable[[str, str], bool] | None = None
    seed: int = 0


@dataclass
class Stats:
    """Counters since the last :meth:`FaultProxy.reset`."""

    requests: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    dropped: int = 0
    cut: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    paths: list[tuple[str, str]] = field(default_factory=list)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str, *, record_paths: bool = False) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.record_paths = record_paths
        self._faults = Faults()
        self._random = random.Random(0)
        self._stats = Stats()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def configure(self, **faults: Any) -> None:
        """Set the faults to inject from now on (unnamed ones go back to none)."""
        with self._lock:
            self._faults = Faults(**faults)
            self._random = random.Random(self._faults.seed)

    def heal(self) -> None:
        """Stop injecting faults."""
        self.configure()

    def stats(self) -> Stats:
        with self._lock:
            s = self._stats
            return Stats(s.requests, Counter(s.by_method), s.failed, s.dropped, s.cut, s.bytes_up, s.bytes_down,
                         list(s.paths))

    def reset(self) -> None:
        with self._lock:
            self._stats = Stats()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # called by handler threads

    def _decide(self, method: str, path: str, body_length: int) -> str:
        with self._lock:
            self._stats.requests += 1
            self._stats.by_method[method] += 1
            if self.record_paths:
                self._stats.paths.append((method, path))
            f = self._faults
            if f.match is not None and not f.match(method, path):
                return "pass"
            draw = self._random.random()
            if draw < f.fail_rate:
                self._stats.failed += 1
                return "fail"
            draw -= f.fail_rate
            if draw < f.drop_rate:
                self._stats.dropped += 1
                return "drop"
            draw -= f.drop_rate
            if body_length >= max(1, f.cut_min_bytes) and draw < f.cut_rate:
                self._stats.cut += 1
                return "cut"
            return "pass"

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self._stats.bytes_up += up
            self._stats.bytes_down += down


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a dropped or cut connection is the point, not an error to print


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _proxy(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        action = proxy._decide(self.command, self.path, length if not chunked else 1 << 62)
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "fail":
            self._discard_body(length, chunked)
            status = proxy._faults.fail_status
            code = _ERROR_CODES.get(status, "InternalError")
            body = f"<Error><Code>{code}</Code><Message>injected fault {status}</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        upstream = self._upstream()
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            if action == "cut":
                self._forward_body(upstream, length, chunked, cut=True)
                upstream.close()
                self.server_close_both()
                return
            self._forward_body(upstream, length, chunked, cut=False)
            response = upstream.getresponse()
        except (OSError, http.client.HTTPException):
            self._drop_upstream()
            self.server_close_both()
            return
        self._relay(response)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _proxy

    # helpers

    def server_close_both(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            proxy = self.server.proxy
            conn = self._conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=300)
        return conn

    def _drop_upstream(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None  # type: ignore[assignment]

    def _discard_body(self, length: int, chunked: bool) -> None:
        for _ in self._body_blocks(length, chunked):
            pass

    def _body_blocks(self, length: int, chunked: bool) -> Any:
        """Yield the raw request body (chunk framing included when chunked)."""
        if not chunked:
            left = length
            while left > 0:
                block = self.rfile.read(min(left, _BLOCK))
                if not block:
                    raise ConnectionError("client closed mid-body")
                left -= len(block)
                yield block
            return
        while True:
            line = self.rfile.readline()
            size = int(line.split(b";")[0].strip() or b"0", 16)
            data = self.rfile.read(size + 2) if size else b""
            if size == 0:
                trailer = b""
                while True:
                    t = self.rfile.readline()
                    trailer += t
                    if t in (b"\r\n", b"\n", b""):
                        break
                yield line + trailer
                return
            yield line + data

    def _forward_body(self, upstream: http.client.HTTPConnection, length: int, chunked: bool, *, cut: bool) -> None:
        proxy = self.server.proxy
        sent = 0
        limit = max(1, length // 2) if cut and not chunked else None
        for i, block in enumerate(self._body_blocks(length, chunked)):
            if limit is not None and sent + len(block) >= limit:
                upstream.send(block[: limit - sent])
                return
            if cut and chunked and i >= 1:
                return
            upstream.send(block)
            sent += len(block)
            proxy._count(up=len(block))

    def _relay(self, response: http.client.HTTPResponse) -> None:
        proxy = self.server.proxy
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        no_body = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        use_chunks = not no_body and length is None
        if use_chunks:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            response.read()
        else:
            while True:
                block = response.read(_BLOCK)
                if not block:
                    break
                proxy._count(down=len(block))
                if use_chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                else:
                    self.wfile.write(block)
            if use_chunks:
                self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        if response.will_close:
            self._drop_upstream()
