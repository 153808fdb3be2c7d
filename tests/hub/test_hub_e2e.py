"""End to end: the real outpost-hub process over loopback HTTP, the operator CLI, and an
independent python-tuf client (ngclient.Updater) that trusts only the root from `init`."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import (
    BadVersionNumberError,
    LengthOrHashMismatchError,
    RepositoryError,
)
from tuf.ngclient import Updater

from tests.support.hubproc import HubProcess
from tests.support.packages import wine_versions

pytestmark = pytest.mark.e2e

EXPIRY_S = 4.0  # timestamp expiry of the test hub: it must re-sign while running


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 1-3 of the example model (same model, new version numbers)."""
    return wine_versions(tmp_path_factory.mktemp("wine"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Any:
    process = HubProcess(tmp_path_factory.mktemp("hub") / "data", short_expiry=EXPIRY_S)
    settings = process.data / "hub.toml"
    # A small upload limit, so the oversized case needs no large file.
    settings.write_text(
        "\n".join(
            "max_upload_bytes = 65536" if line.startswith("max_upload_bytes") else line
            for line in settings.read_text().splitlines()
        )
    )
    process.start()
    yield process
    process.kill()


def updater(hub: HubProcess, cache: Path, root: bytes | None = None) -> Updater:
    (cache / "metadata").mkdir(parents=True, exist_ok=True)
    (cache / "targets").mkdir(parents=True, exist_ok=True)
    u = Updater(
        metadata_dir=str(cache / "metadata"),
        metadata_base_url=f"{hub.url}/tuf/metadata/",
        target_dir=str(cache / "targets"),
        target_base_url=f"{hub.url}/tuf/targets/",
        bootstrap=root if root is not None else hub.root,
    )
    u.refresh()
    return u


def fetch(u: Updater, path: str) -> bytes:
    info = u.get_targetinfo(path)
    assert info is not None, f"{path} is not signed"
    local = u.download_target(info)
    data = Path(local).read_bytes()
    assert hashlib.sha256(data).hexdigest() == info.hashes["sha256"]
    return data


def assignment(u: Updater, group: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fetch(u, f"groups/{group}/assignment.json"))
    return doc


def test_init_says_where_the_root_is_and_which_keys_stay_online(hub: HubProcess) -> None:
    assert "root metadata for provisioning devices" in hub.init_output
    assert "online keys" in hub.init_output and "offline keys" in hub.init_output
    assert (hub.data / "operator.token").stat().st_mode & 0o777 == 0o600


def test_push_deploy_canary_rollback_seen_by_an_independent_tuf_client(
    hub: HubProcess, wine: dict[int, Path], tmp_path: Path
) -> None:
    for version in (1, 2):
        out = hub.outpost("push", str(wine[version]), "--quiet").stdout
        assert f"pushed wine version {version}" in out
    assert "wine: versions 1, 2" in hub.outpost("models").stdout

    assert "stable v1" in hub.outpost("deploy", "wine", "1", "--group", "lab").stdout
    u = updater(hub, tmp_path / "c1")
    with tarfile.open(wine[1]) as tar:
        model_bytes = tar.extractfile("model.onnx").read()  # type: ignore[union-attr]
    assert fetch(u, "models/wine/1/model.onnx") == model_bytes
    doc = assignment(u, "lab")
    assert (doc["model"], doc["stable"]["version"], doc["candidate"]) == ("wine", 1, None)
    # The assignment names the model's signed targets and their hashes.
    assert doc["stable"]["model"] == "models/wine/1/model.onnx"

    out = hub.outpost("deploy", "wine", "1", "--group", "lab", "--canary", "2", "--percent", "25").stdout
    assert "canary v2 at 25%" in out
    doc = assignment(updater(hub, tmp_path / "c2"), "lab")
    assert (doc["candidate"]["version"], doc["percent"]) == (2, 25)

    hub.outpost("deploy", "wine", "2", "--group", "lab")
    assert "stable v1" in hub.outpost("rollback", "wine", "--group", "lab").stdout
    u = updater(hub, tmp_path / "c3")
    doc = assignment(u, "lab")
    assert (doc["stable"]["version"], doc["candidate"]) == (1, None)
    for version in (1, 2):
        for name in ("manifest.json", "model.onnx"):
            fetch(u, f"models/wine/{version}/{name}")
    groups = hub.outpost("groups").stdout
    assert "group lab: wine stable v1" in groups


def test_a_running_hub_resigns_before_expiry(hub: HubProcess, wine: dict[int, Path], tmp_path: Path) -> None:
    u = updater(hub, tmp_path / "before")
    time.sleep(EXPIRY_S * 1.5)  # the first timestamp has expired by now
    u2 = updater(hub, tmp_path / "after")  # refresh() inside raises if metadata expired
    assert u2.get_targetinfo("models/wine/1/model.onnx") is not None
    del u


def test_tampered_target_on_disk_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    targets = hub.data / "tuf" / "targets" / "models" / "wine" / "1"
    victim = next(targets.glob("*.model.onnx"))
    original = victim.read_bytes()
    try:
        victim.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        u = updater(hub, tmp_path / "c")
        info = u.get_targetinfo("models/wine/1/model.onnx")
        assert info is not None
        with pytest.raises(LengthOrHashMismatchError):
            u.download_target(info)
    finally:
        victim.write_bytes(original)


def test_replayed_older_metadata_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    timestamp = hub.data / "tuf" / "metadata" / "timestamp.json"
    old = timestamp.read_bytes()
    hub.outpost("deploy", "wine", "2", "--group", "replay")
    u = updater(hub, tmp_path / "c")  # has seen the newer timestamp
    assert assignment(u, "replay")["stable"]["version"] == 2
    current = timestamp.read_bytes()
    try:
        timestamp.write_bytes(old)  # a mirror serving yesterday's view
        with pytest.raises((BadVersionNumberError, RepositoryError)):
            updater(hub, tmp_path / "c")
    finally:
        timestamp.write_bytes(current)


def test_a_group_cannot_name_paths_outside_its_delegation(hub: HubProcess, tmp_path: Path) -> None:
    u = updater(hub, tmp_path / "c")
    assert u.get_targetinfo("groups/nobody/assignment.json") is None
    assert u.get_targetinfo("models/wine/99/model.onnx") is None


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _package_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _bad_uploads(wine: dict[int, Path]) -> dict[str, tuple[bytes, int, str]]:
    files = _package_files(wine[3])
    manifest = json.loads(files["manifest.json"])
    not_onnx = b"this is not an onnx model"
    m_not_onnx = {
        **manifest,
        "model": {**manifest["model"], "sha256": hashlib.sha256(not_onnx).hexdigest(), "size": len(not_onnx)},
    }
    m_failing = json.loads(files["manifest.json"])
    m_failing["self_test"]["outputs"][1]["data"][0] += 0.5
    return {
        "not-a-tar": (b"garbage", 422, "not a package archive"),
        "not-onnx": (
            _tar({"manifest.json": json.dumps(m_not_onnx).encode(), "model.onnx": not_onnx}),
            422,
            "onnx",
        ),
        "hash-mismatch": (
            _tar({"manifest.json": files["manifest.json"], "model.onnx": _flip_last(files["model.onnx"])}),
            422,
            "sha-256",
        ),
        "oversized": (b"\0" * 200_000, 413, "at most"),
        "failing-self-test": (
            _tar({"manifest.json": json.dumps(m_failing).encode(), "model.onnx": files["model.onnx"]}),
            422,
            "self-test",
        ),
        "no-manifest": (_tar({"model.onnx": files["model.onnx"]}), 422, "no manifest.json"),
    }


@pytest.mark.parametrize(
    "case", ["not-a-tar", "not-onnx", "hash-mismatch", "failing-self-test", "no-manifest", "oversized"]
)
def test_bad_uploads_are_refused_and_change_nothing(
    hub: HubProcess, wine: dict[int, Path], case: str
) -> None:
    body, status, message = _bad_uploads(wine)[case]
    before = hub.api("GET", "/api/v1/models").json()
    metadata = sorted(p.name for p in (hub.data / "tuf" / "metadata").iterdir())
    resp = hub.api(
        "POST", "/api/v1/models/wine/versions", data=body, headers={"Content-Type": "application/x-tar"}
    )
    assert resp.status_code == status, resp.text
    assert message.lower() in resp.json()["detail"].lower()
    assert hub.api("GET", "/api/v1/models").json() == before
    assert sorted(p.name for p in (hub.data / "tuf" / "metadata").iterdir()) == metadata


@pytest.mark.parametrize(
    ("auth", "token"), [(False, None), (True, "wrong-token")], ids=["no-token", "wrong-token"]
)
def test_api_needs_a_valid_token(
    hub: HubProcess, wine: dict[int, Path], auth: bool, token: str | None
) -> None:
    resp = hub.api(
        "POST",
        "/api/v1/models/wine/versions",
        token=token,
        auth=auth,
        data=wine[3].read_bytes(),
        headers={"Content-Type": "application/x-tar"},
    )
    assert resp.status_code == 401
    assert "token" in resp.json()["detail"]
    assert 3 not in hub.api("GET", "/api/v1/models").json()[0]["versions"]
    # The TUF repository is public by design: devices verify what they get.
    assert hub.api("GET", "/tuf/metadata/timestamp.json", auth=False).status_code == 200


def test_tuf_files_have_etags_and_cache_headers(hub: HubProcess) -> None:
    resp = hub.api("GET", "/tuf/metadata/timestamp.json", auth=False)
    assert resp.headers["cache-control"] == "no-cache"
    again = hub.api(
        "GET", "/tuf/metadata/timestamp.json", auth=False, headers={"If-None-Match": resp.headers["etag"]}
    )
    assert again.status_code in (200, 304)  # 200 only if the hub re-signed in between
    versioned = hub.api("GET", "/tuf/metadata/1.root.json", auth=False)
    assert "immutable" in versioned.headers["cache-control"]
    assert (
        hub.api(
            "GET",
            "/tuf/metadata/1.root.json",
            auth=False,
            headers={"If-None-Match": versioned.headers["etag"]},
        ).status_code
        == 304
    )


def test_cli_errors_are_one_clear_line(hub: HubProcess, wine: dict[int, Path]) -> None:
    result = hub.outpost("push", str(wine[1]), "--quiet", check=False)
    assert result.returncode != 0
    assert "outpost: error: hub refused (409)" in result.stderr
    assert "Traceback" not in result.stderr
    result = hub.outpost("deploy", "nosuchmodel", "1", "--group", "lab", check=False)
    assert result.returncode != 0
    assert "404" in result.stderr


def test_key_rotation_followed_by_a_client_with_the_old_root(
    hub: HubProcess, tmp_path: Path, wine: dict[int, Path]
) -> None:
    old_root = hub.root
    import subprocess

    from tests.support.hubproc import HUB_BIN

    for role in ("timestamp", "root"):
        result = subprocess.run(
            [HUB_BIN, "keys", "rotate", role, "--data", str(hub.data)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert f"rotated {role}" in result.stdout
    u = updater(hub, tmp_path / "old-root", root=old_root)
    assert assignment(u, "lab")["model"] == "wine"
    # and the hub keeps signing with the new timestamp key
    hub.outpost("push", str(wine[3]), "--quiet")
    assert updater(hub, tmp_path / "later", root=old_root).get_targetinfo("models/wine/3/model.onnx")
    shutil.rmtree(tmp_path / "old-root")


def test_only_metadata_and_targets_are_public(hub: HubProcess) -> None:
    assert hub.api("GET", "/tuf/.lock", auth=False).status_code == 404
    assert hub.api("GET", "/tuf/metadata/../../hub.toml", auth=False).status_code == 404


def test_delete_a_version_only_when_no_group_uses_it(
    hub: HubProcess, wine: dict[int, Path], tmp_path: Path
) -> None:
    models = {m["name"]: m for m in hub.api("GET", "/api/v1/models").json()}
    if 3 not in models["wine"]["versions"]:
        hub.outpost("push", str(wine[3]), "--quiet")
    resp = hub.api("DELETE", "/api/v1/models/wine/versions/1")  # lab runs it
    assert resp.status_code == 409, resp.text
    assert "lab" in resp.json()["detail"]
    assert hub.api("DELETE", "/api/v1/models/wine/versions/3").status_code == 204
    assert 3 not in hub.api("GET", "/api/v1/models").json()[0]["versions"]
    assert updater(hub, tmp_path / "c").get_targetinfo("models/wine/3/model.onnx") is None
