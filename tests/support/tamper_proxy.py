"""A man in the middle for tests: a loopback HTTP server that forwards GETs to an upstream
(the real hub) and answers chosen paths itself — replayed, rewritten, forged or endless.
It also works as a forward proxy (absolute-URI requests) and over https (`tls`).

    proxy = TamperProxy(hub.url).start()
    proxy.serve("/tuf/metadata/timestamp.json", old_bytes)          # replay
    proxy.on(r"/tuf/targets/models/wine/1/\\w+\\.model\\.onnx",
             lambda m, up: Reply(up(m[0])[1] + b"x" * 1000))          # longer than signed
    proxy.on(r"/tuf/metadata/timestamp\\.json", lambda m, up: Reply(endless(), content_length=False))
    proxy.reset()                                                     # honest again

A handler gets the path's match and `up(path) -> (status, body)` to read the upstream, and
returns a Reply (or None: forward unchanged). Bounded: upstream bodies are read up to
MAX_UPSTREAM_BYTES, sockets time out, and `sent` counts the body bytes each path was sent
(an endless reply stops when the client hangs up).
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MAX_UPSTREAM_BYTES = 64 * 1024 * 1024
SOCKET_TIMEOUT_S = 10.0

Upstream = Callable[[str], tuple[int, bytes]]


@dataclass
class Reply:
    body: bytes | Iterable[bytes] = b""
    status: int = 200
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes


Handler = Callable[[re.Match[str], Upstream], Reply | None]


def endless(chunk: bytes = b"\0" * 65536, limit: int = 1 << 30) -> Iterator[bytes]:
    """`limit` bytes of `chunk`s (a GiB by default): 'endless' to a client that reads less."""
    sent = 0
    while sent < limit:
        yield chunk
        sent += len(chunk)


class TamperProxy:
    def __init__(self, upstream: str, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: a server context to speak https (the upstream stays plain http)."""
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname, upstream
        self._host, self._port = parts.hostname, parts.port or 80
        self._rules: list[tuple[re.Pattern[str], Handler]] = []
        self._lock = threading.Lock()
        self.hits: list[str] = []
        self.sent: dict[str, int] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> TamperProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- rules ----------------------------------------------------------------------------

    def on(self, pattern: str, handler: Handler) -> None:
        """Answer paths that fully match `pattern` with `handler` (the latest rule wins)."""
        with self._lock:
            self._rules.insert(0, (re.compile(pattern), handler))

    def serve(self, path: str, body: bytes, status: int = 200) -> None:
        self.on(re.escape(path), lambda _m, _up: Reply(body, status))

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self.hits.clear()
            self.sent.clear()

    def upstream(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=SOCKET_TIMEOUT_S)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read(MAX_UPSTREAM_BYTES + 1)
            assert len(body) <= MAX_UPSTREAM_BYTES, f"{path}: upstream body too large for the proxy"
            return resp.status, body
        finally:
            conn.close()

    # -- serving --------------------------------------------------------------------------

    def _reply_for(self, path: str) -> Reply:
        with self._lock:
            self.hits.append(path)
            rules = list(self._rules)
        for pattern, handler in rules:
            match = pattern.fullmatch(path)
            if match is not None:
                reply = handler(match, self.upstream)
                if reply is not None:
                    return reply
                break
        status, body = self.upstream(path)
        return Reply(body, status)

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + n

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT_S

            def do_GET(self) -> None:
                path = self.path
                if "://" in path:  # asked as a forward proxy: GET http://host/path
                    parts = urlsplit(path)
                    path = parts.path + (f"?{parts.query}" if parts.query else "")
                reply = proxy._reply_for(path)
                self.send_response(reply.status)
                body = reply.body
                if isinstance(body, bytes) and reply.content_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.close_connection = True
                self.send_header("Connection", "close" if self.close_connection else "keep-alive")
                self.end_headers()
                try:
                    for chunk in [body] if isinstance(body, bytes) else body:
                        self.wfile.write(chunk)
                        proxy._count(path, len(chunk))
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True  # the client hung up: that is the point

            def log_message(self, format: str, *args: object) -> None:
                pass

        return _Handler
