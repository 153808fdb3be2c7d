"""The TUF files devices poll (`/tuf/metadata/...`, `/tuf/targets/...`), answered ahead of the
hub's middleware from an in-memory cache.

    app = TufFront(fastapi_app, settings.tuf_dir)     # what uvicorn runs

Every device's check is two requests: the probe for the next root (`<n+1>.root.json`, a 404)
and `timestamp.json` with If-None-Match (a 304 while nothing changed). Through FastAPI each of
them passed the Guard, FastAPI's own middleware, the routing through every API route and
Starlette's `StaticFiles` (a `stat` in a worker thread), and the 404 was an exception rendered
as JSON; that held one hub process to about 1,200 polls/s (docs/benchmarks.md, Fleet scale).
`TufFront` is a plain ASGI app in front of all of it: a GET or HEAD under `/tuf/` is answered
from a map path -> (identity, ETag, bytes, headers), anything else goes on to the wrapped app.

Invariants:
- The same contract as the mounted `StaticFiles` it stands in front of (hub.api.app): only the
  `metadata` and `targets` trees are public; a path with an empty, `.` or `..` segment, or any
  segment starting with a dot (the repository's `.lock`, the signer's `.<name>.*.tmp` files),
  or one that resolves outside its tree, is a 404. The same headers (Content-Type,
  Content-Length, Last-Modified, Accept-Ranges, the same ETag), the same Cache-Control
  (`no-cache` for timestamp.json and root.json, a year and `immutable` for the rest, whose
  names carry their version or hash), If-None-Match (lists, weak tags, `*`) and
  If-Modified-Since answered 304, HEAD without a body, and a 404 with StaticFiles' body.
- Fresh at once: every request `os.stat`s its file (in the event loop: a microsecond or two,
  cheaper than the thread hand-off) and serves the cached copy only while (inode, mtime in
  ns, size) are those it was read with. The signer replaces files by rename (a new inode), so a
  file re-signed by this process, another hub process or an `outpost-hub` command is read
  again on the next request.
- Bounded memory: only files up to `max_file_bytes` are cached, the least recently used go
  once the cache holds `max_total_bytes`. Larger files (models) go on to `StaticFiles`, which
  streams them from disk in chunks; so do Range requests, other methods and requests with a
  body (the Guard's body limit applies to them as before). A small file is read whole in the
  event loop once per change.
- Not limited: the Guard has no rate limit for `/tuf/` (devices have no token and many share
  an address) and its body limit concerns bodies, which a GET here never reads; the HTTP
  server's bound on header bytes applies before any app runs.
"""

from __future__ import annotations

import enum
import hashlib
import mimetypes
import os
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from email.utils import formatdate, mktime_tz, parsedate_tz
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/tuf/"
PUBLIC_TREES = ("metadata", "targets")
KiB = 1024
MiB = 1024 * KiB
REVALIDATE = frozenset({"timestamp.json", "root.json"})  # rewritten in place: never cached blindly
NO_CACHE = b"no-cache"
IMMUTABLE = b"public, max-age=31536000, immutable"
ENTRY_OVERHEAD = 512  # bytes counted per cached file beyond its body and headers (the objects)

_NOT_FOUND_BODY = b'{"detail":"Not Found"}'  # what FastAPI renders for StaticFiles' 404
_NOT_FOUND_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"22")]


@dataclass(frozen=True)
class CacheLimits:
    max_file_bytes: int = 1 * MiB  # larger files are streamed from disk, never held
    max_total_bytes: int = 32 * MiB  # bodies and headers of every cached file together

    def __post_init__(self) -> None:
        if self.max_file_bytes < 0 or self.max_total_bytes < 0:
            raise ValueError("the TUF file cache's limits must not be negative")


def public_file(path: str) -> tuple[str, str] | None:
    """(tree, path inside the tree) for a request path under /tuf/ a device may read, None
    for anything private or malformed. Pure: it does not look at the disk."""
    if not path.startswith(PREFIX):
        return None
    tree, _, rest = path[len(PREFIX) :].partition("/")
    if tree not in PUBLIC_TREES or not rest:
        return None
    for segment in rest.split("/"):
        # Empty, "." and ".." (traversal), dotfiles (the lock, the signer's temp files), NUL.
        if not segment or segment[0] == "." or "\0" in segment:
            return None
    return tree, rest


def cache_control_for(name: str) -> bytes:
    """`no-cache` for the files rewritten in place, a year and `immutable` for the rest (their
    names carry their version or hash). The StaticFiles mounts behind TufFront use it too."""
    return NO_CACHE if name in REVALIDATE else IMMUTABLE


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """If-None-Match against our (strong) ETag, with the weak comparison RFC 9110 asks for."""
    if if_none_match.strip() == b"*":
        return True
    return any(tag.strip().removeprefix(b"W/") == etag for tag in if_none_match.split(b","))


def static_files_etag(st: os.stat_result) -> bytes:
    """Starlette FileResponse's ETag (md5 of mtime and size): devices keep the ETags they stored."""
    base = f"{st.st_mtime}-{st.st_size}".encode()
    return b'"' + hashlib.md5(base, usedforsecurity=False).hexdigest().encode() + b'"'


class _Miss(enum.Enum):
    NOT_FOUND = "not found"  # or private: a plain 404
    STREAM = "stream"  # over max_file_bytes: StaticFiles streams it from disk


class _Entry:
    __slots__ = ("body", "cost", "etag", "full", "head_200", "head_304", "identity", "mtime")

    def __init__(self, full: str, st: os.stat_result, body: bytes) -> None:
        name = full.rsplit("/", 1)[-1]
        self.full = full
        self.identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.etag = static_files_etag(st)
        self.mtime = int(st.st_mtime)
        self.body = body
        cache_control = cache_control_for(name)
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.head_200 = [
            (b"content-type", media.encode("latin-1")),
            (b"accept-ranges", b"bytes"),
            (b"content-length", str(len(body)).encode()),
            (b"last-modified", formatdate(st.st_mtime, usegmt=True).encode()),
            (b"etag", self.etag),
            (b"cache-control", cache_control),
        ]
        self.head_304 = [(b"etag", self.etag), (b"cache-control", cache_control)]
        self.cost = len(body) + sum(len(k) + len(v) for k, v in self.head_200) + ENTRY_OVERHEAD


class TufFront:
    """The ASGI app uvicorn runs: TUF file reads answered here, everything else by `app`."""

    def __init__(self, app: ASGIApp, directory: Path, limits: CacheLimits | None = None) -> None:
        self.app = app
        self.limits = limits or CacheLimits()
        self._trees = {tree: os.path.realpath(directory / tree) for tree in PUBLIC_TREES}
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cached_bytes = 0

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cached(self, path: str) -> bool:
        """Whether the request path's file is held in memory (for tests and diagnostics)."""
        return path in self._cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX) or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method not in {"GET", "HEAD"}:
            await self.app(scope, receive, send)  # StaticFiles answers 405 with Allow
            return
        if_none_match: bytes | None = None
        if_modified_since: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"if-none-match":
                if_none_match = value
            elif name == b"if-modified-since":
                if_modified_since = value
            elif name in {b"range", b"transfer-encoding"} or (name == b"content-length" and value != b"0"):
                # Ranges are StaticFiles' to answer, bodies the Guard's to limit.
                await self.app(scope, receive, send)
                return
        path = scope["path"]
        entry = self._fresh(path)
        if entry is _Miss.NOT_FOUND:
            await self._not_found(method, send)
            return
        if entry is _Miss.STREAM:
            await self.app(scope, receive, send)
            return
        if if_none_match is not None:
            not_modified = etag_matches(if_none_match, entry.etag)
        else:
            not_modified = if_modified_since is not None and _not_modified_since(
                if_modified_since, entry.mtime
            )
        if not_modified:
            await send({"type": "http.response.start", "status": 304, "headers": entry.head_304})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": entry.head_200})
        await send({"type": "http.response.body", "body": entry.body if method == "GET" else b""})

    def _fresh(self, path: str) -> _Entry | _Miss:
        """The cached entry for `path`, read again if the file changed, or why there is none."""
        entry = self._cache.get(path)
        if entry is not None:
            full = entry.full
        else:
            found = public_file(path)
            if found is None:
                return _Miss.NOT_FOUND
            full = f"{self._trees[found[0]]}/{found[1]}"
        try:
            st = os.stat(full)  # noqa: PTH116 - on the hot path: a str, no Path object per request
        except (OSError, ValueError):  # missing, a file where a directory was expected, too long
            self._drop(path)
            return _Miss.NOT_FOUND
        if entry is not None and entry.identity == (st.st_ino, st.st_mtime_ns, st.st_size):
            self._cache.move_to_end(path)
            return entry
        self._drop(path)
        if not stat.S_ISREG(st.st_mode):
            return _Miss.NOT_FOUND
        if st.st_size > self.limits.max_file_bytes:
            return _Miss.STREAM
        return self._load(path, full)

    def _load(self, path: str, full: str) -> _Entry | _Miss:
        tree = self._trees[path[len(PREFIX) :].partition("/")[0]]
        if os.path.commonpath([os.path.realpath(full), tree]) != tree:
            return _Miss.NOT_FOUND  # a symlink out of the tree: private, as StaticFiles keeps it
        try:
            with open(full, "rb") as f:  # noqa: PTH123 - `full` is a str, as for os.stat above
                # Identity from the open file, so the bytes and the identity always belong together.
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return _Miss.NOT_FOUND
                if st.st_size > self.limits.max_file_bytes:
                    return _Miss.STREAM
                body = f.read(st.st_size + 1)
        except OSError:
            return _Miss.NOT_FOUND
        if len(body) != st.st_size:
            return _Miss.STREAM  # written in place while read (the signer never does): not cached
        entry = _Entry(full, st, body)
        if entry.cost <= self.limits.max_total_bytes:
            self._cache[path] = entry
            self._cached_bytes += entry.cost
            while self._cached_bytes > self.limits.max_total_bytes:
                _, oldest = self._cache.popitem(last=False)
                self._cached_bytes -= oldest.cost
        return entry

    def _drop(self, path: str) -> None:
        entry = self._cache.pop(path, None)
        if entry is not None:
            self._cached_bytes -= entry.cost

    @staticmethod
    async def _not_found(method: str, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": _NOT_FOUND_HEADERS})
        await send({"type": "http.response.body", "body": _NOT_FOUND_BODY if method == "GET" else b""})


def _not_modified_since(value: bytes, mtime: int) -> bool:
    parsed = parsedate_tz(value.decode("latin-1"))
    return parsed is not None and mktime_tz(parsed) >= mtime
