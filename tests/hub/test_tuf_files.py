"""The TUF files devices poll (hub.api.tuffiles): the real outpost-hub process over loopback
for the contract (headers, 304, HEAD, 404s, files re-signed by rename, large files and ranges),
and the front itself under uvicorn with small limits for what only it can show (what it
holds in memory)."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest
import requests
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from hub.api.app import _TufFiles
from hub.api.tuffiles import CacheLimits, TufFront, etag_matches, public_file
from tests.support.hubproc import HUB_BIN, HubProcess, free_port

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def static_files_etag(path: Path) -> str:
    """The ETag Starlette's FileResponse gives a file (the format devices stored before)."""
    st = path.stat()
    return '"' + hashlib.md5(f"{st.st_mtime}-{st.st_size}".encode(), usedforsecurity=False).hexdigest() + '"'


def replace_by_rename(path: Path, data: bytes) -> None:
    """As the signer writes (agent.fsutil.write_atomic): a new file renamed over the old."""
    temp = path.with_name(f".{path.name}.test.tmp")
    temp.write_bytes(data)
    temp.replace(path)


def raw_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """The path sent as written (requests would resolve `..` before sending)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- the pure parts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/tuf/metadata/timestamp.json", ("metadata", "timestamp.json")),
        ("/tuf/metadata/2.root.json", ("metadata", "2.root.json")),
        ("/tuf/targets/groups/lab/abc.assignment.json", ("targets", "groups/lab/abc.assignment.json")),
        ("/tuf/.lock", None),
        ("/tuf/hub.toml", None),
        ("/tuf/metadata", None),
        ("/tuf/metadata/", None),
        ("/tuf/metadata/../../hub.toml", None),
        ("/tuf/metadata/./timestamp.json", None),
        ("/tuf/targets/groups//x.json", None),
        ("/tuf/metadata/.timestamp.json.abc.tmp", None),
        ("/tuf/targets/models/.hidden/file", None),
        ("/tuf/metadata/a\0b", None),
        ("/tufx/metadata/timestamp.json", None),
        ("/api/v1/models", None),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_public_file(path: str, expected: tuple[str, str] | None) -> None:
    assert public_file(path) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b'"abc"', True),
        (b'W/"abc"', True),
        (b'"x", "abc"', True),
        (b'"x",W/"abc" ', True),
        (b"*", True),
        (b" * ", True),
        (b'"x"', False),
        (b'"ab"', False),
        (b"abc", False),
        (b"", False),
    ],
    ids=repr,
)
def test_etag_matches(header: bytes, expected: bool) -> None:
    assert etag_matches(header, b'"abc"') is expected


# -- the real hub process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("tuf-files") / "data").start()
    yield process
    process.kill()


def tuf(hub: HubProcess, path: str, method: str = "GET", **headers: str) -> requests.Response:
    return requests.request(method, f"{hub.url}/tuf/{path}", headers=headers, timeout=10)


def test_a_file_is_served_with_its_headers(hub: HubProcess) -> None:
    on_disk = hub.data / "tuf" / "metadata" / "timestamp.json"
    answer = tuf(hub, "metadata/timestamp.json")
    assert answer.status_code == 200
    assert answer.content == on_disk.read_bytes()
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(on_disk.stat().st_size)
    assert answer.headers["etag"] == static_files_etag(on_disk)  # devices' stored ETags keep working
    assert answer.headers["last-modified"] == formatdate(on_disk.stat().st_mtime, usegmt=True)
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.headers["accept-ranges"] == "bytes"
    assert tuf(hub, "metadata/root.json").headers["cache-control"] == "no-cache"
    versioned = tuf(hub, "metadata/1.root.json")
    assert versioned.status_code == 200
    assert versioned.headers["cache-control"] == "public, max-age=31536000, immutable"


def test_if_none_match_is_answered_304(hub: HubProcess) -> None:
    etag = tuf(hub, "metadata/1.root.json").headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        answer = tuf(hub, "metadata/1.root.json", **{"If-None-Match": header})
        assert answer.status_code == 304, header
        assert answer.content == b""
        assert answer.headers["etag"] == etag
        assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert tuf(hub, "metadata/1.root.json", **{"If-None-Match": '"other"'}).status_code == 200
    last_modified = tuf(hub, "metadata/1.root.json").headers["last-modified"]
    assert tuf(hub, "metadata/1.root.json", **{"If-Modified-Since": last_modified}).status_code == 304
    assert (
        tuf(hub, "metadata/1.root.json", **{"If-Modified-Since": formatdate(0, usegmt=True)}).status_code
        == 200
    )


def test_head_has_the_headers_and_no_body(hub: HubProcess) -> None:
    get = tuf(hub, "metadata/timestamp.json")
    head = tuf(hub, "metadata/timestamp.json", method="HEAD")
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-length", "content-type", "etag", "cache-control", "last-modified"):
        assert head.headers[name] == get.headers[name]
    assert tuf(hub, "metadata/1000.root.json", method="HEAD").status_code == 404


def test_missing_private_and_traversing_paths_are_404(hub: HubProcess) -> None:
    probe = tuf(hub, "metadata/1000.root.json")  # the next root a device probes for on every check
    assert probe.status_code == 404
    assert probe.json() == {"detail": "Not Found"}
    (hub.data / "tuf" / "metadata" / ".timestamp.json.x.tmp").write_bytes(b"half written")
    (hub.data / "tuf" / "metadata" / "sub").mkdir(exist_ok=True)
    assert (hub.data / "tuf" / ".lock").exists()
    for path in (
        "/tuf/.lock",
        "/tuf/hub.toml",
        "/tuf/metadata/.timestamp.json.x.tmp",
        "/tuf/metadata/sub",
        "/tuf/metadata/",
        "/tuf/metadata/../../hub.toml",
        "/tuf/metadata/%2e%2e/%2e%2e/hub.toml",
        "/tuf/targets/../.lock",
        "/tuf/metadata/timestamp.json/x",
        "/tuf/metadata/" + "x" * 5000,
    ):
        assert raw_get(hub.port, path)[0] == 404, path
        assert raw_get(hub.port, path, "HEAD")[0] == 404, path
    assert raw_get(hub.port, "/hub.toml")[0] == 404


def test_other_methods_are_refused(hub: HubProcess) -> None:
    answer = requests.post(f"{hub.url}/tuf/metadata/timestamp.json", timeout=10)
    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, HEAD"


def test_a_file_replaced_by_rename_is_served_new_at_once(hub: HubProcess) -> None:
    path = hub.data / "tuf" / "metadata" / "9.extra.json"
    replace_by_rename(path, b'{"v": 1}')
    first = tuf(hub, "metadata/9.extra.json")
    assert first.content == b'{"v": 1}'
    assert tuf(hub, "metadata/9.extra.json", **{"If-None-Match": first.headers["etag"]}).status_code == 304
    replace_by_rename(path, b'{"v": 2}')  # the same size: the new inode and mtime tell
    second = tuf(hub, "metadata/9.extra.json", **{"If-None-Match": first.headers["etag"]})
    assert second.status_code == 200
    assert second.content == b'{"v": 2}'
    assert second.headers["etag"] == static_files_etag(path) != first.headers["etag"]
    path.unlink()
    assert tuf(hub, "metadata/9.extra.json").status_code == 404


def test_a_timestamp_resigned_by_another_process_is_served_at_once(hub: HubProcess) -> None:
    before = tuf(hub, "metadata/timestamp.json")
    result = subprocess.run(
        [HUB_BIN, "keys", "rotate", "timestamp", "--data", str(hub.data)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after = tuf(hub, "metadata/timestamp.json", **{"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200
    assert after.content == (hub.data / "tuf" / "metadata" / "timestamp.json").read_bytes() != before.content


def test_a_large_target_is_streamed_and_ranges_work(hub: HubProcess) -> None:
    data = os.urandom(3 * MiB)  # over the cache's 1 MiB bound
    path = hub.data / "tuf" / "targets" / "models" / "big" / "1" / "abc.model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    answer = tuf(hub, "targets/models/big/1/abc.model.onnx")
    assert answer.status_code == 200
    assert answer.content == data
    assert answer.headers["etag"] == static_files_etag(path)
    assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert (
        tuf(
            hub, "targets/models/big/1/abc.model.onnx", **{"If-None-Match": answer.headers["etag"]}
        ).status_code
        == 304
    )
    part = tuf(hub, "targets/models/big/1/abc.model.onnx", Range="bytes=100-199")
    assert part.status_code == 206
    assert part.content == data[100:200]
    small = tuf(hub, "metadata/1.root.json", Range="bytes=0-9")  # a cached file: ranges still work
    assert small.status_code == 206
    assert small.content == (hub.data / "tuf" / "metadata" / "1.root.json").read_bytes()[:10]


def test_tuf_files_are_not_rate_limited(hub: HubProcess) -> None:
    """As before the front: devices have no token and many share one address."""
    assert all(tuf(hub, "metadata/1000.root.json").status_code == 404 for _ in range(50))


# -- the front alone, small limits -------------------------------------------------------


class Served:
    def __init__(self, front: TufFront, port: int, directory: Path) -> None:
        self.front = front
        self.url = f"http://127.0.0.1:{port}"
        self.directory = directory

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}/tuf/{path}", timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """TufFront with a 1 KiB file bound and a 4 KiB cache over the hub's StaticFiles mounts."""
    directory = tmp_path_factory.mktemp("front")
    for tree in ("metadata", "targets"):
        (directory / tree).mkdir()
    behind = Starlette(
        routes=[
            Mount(f"/tuf/{tree}", _TufFiles(directory=directory / tree)) for tree in ("metadata", "targets")
        ]
    )
    front = TufFront(behind, directory, CacheLimits(max_file_bytes=1024, max_total_bytes=4096))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(front, host="127.0.0.1", port=port, log_level="warning", http="h11")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Served(front, port, directory)
    server.should_exit = True
    thread.join(10)


def test_a_file_over_the_bound_is_streamed_not_cached(served: Served) -> None:
    data = os.urandom(2000)
    (served.directory / "targets" / "big.bin").write_bytes(data)
    before = served.front.cached_bytes
    answer = served.get("targets/big.bin")
    assert answer.status_code == 200
    assert answer.content == data
    assert answer.headers["etag"] == static_files_etag(served.directory / "targets" / "big.bin")
    assert answer.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert not served.front.cached("/tuf/targets/big.bin")
    assert served.front.cached_bytes == before


def test_the_cache_is_bounded_and_keeps_the_recent_files(served: Served) -> None:
    for i in range(12):
        (served.directory / "metadata" / f"{i}.snapshot.json").write_bytes(b"%02d" % i * 300)
    for i in range(12):
        answer = served.get(f"metadata/{i}.snapshot.json")
        assert answer.content == b"%02d" % i * 300
        assert served.front.cached_bytes <= 4096
    assert served.front.cached("/tuf/metadata/11.snapshot.json")
    assert not served.front.cached("/tuf/metadata/0.snapshot.json")
    # The oldest, asked again, is read from disk again.
    assert served.get("metadata/0.snapshot.json").content == b"00" * 300
    assert served.front.cached("/tuf/metadata/0.snapshot.json")


def test_a_file_growing_past_the_bound_leaves_the_cache(served: Served) -> None:
    path = served.directory / "metadata" / "timestamp.json"
    replace_by_rename(path, b"{}")
    assert served.get("metadata/timestamp.json").content == b"{}"
    assert served.front.cached("/tuf/metadata/timestamp.json")
    replace_by_rename(path, b" " * 5000)
    answer = served.get("metadata/timestamp.json")
    assert answer.content == b" " * 5000
    assert answer.headers["cache-control"] == "no-cache"
    assert not served.front.cached("/tuf/metadata/timestamp.json")


def test_a_symlink_out_of_the_tree_is_private(served: Served, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes(b"{}")
    (served.directory / "metadata" / "link.json").symlink_to(secret)
    assert served.get("metadata/link.json").status_code == 404
    assert not served.front.cached("/tuf/metadata/link.json")
