"""agent.update.tuf_client against the REAL hub process (no TUF mocks), and attacks on it.

The attacks go through `tests.support.tamper_proxy` (a man in the middle between the client
and the hub) or edit the hub's files. Each must be refused with VerificationError naming
its class, leave nothing under `into`, and leave the client able to update honestly again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions

from agent.config import HubConfig
from agent.errors import HubUnreachable, UpdateError, VerificationError
from agent.package.store import Store
from agent.update.fetcher import HubFetcher
from agent.update.tuf_client import SignedAssignment, UpdateClient
from hub.signing import KeyStore
from hub.signing._tuf import CryptoSigner, Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tests.support.hubproc import HUB_BIN, HubProcess, free_port
from tests.support.packages import wine_versions
from tests.support.tamper_proxy import Reply, TamperProxy, endless

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

EXPIRY_S = 4.0  # the test hub's timestamp lifetime: it re-signs every few seconds while running
GROUP = "field"
META = "/tuf/metadata"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Versions 1-3 of the example model package (tar archives)."""
    return wine_versions(tmp_path_factory.mktemp("wine"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, wine: dict[int, Path]) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path_factory.mktemp("hub") / "data", short_expiry=EXPIRY_S).start()
    try:
        for version in (1, 2):
            process.outpost("push", str(wine[version]), "--quiet")
        process.outpost("deploy", "wine", "1", "--group", GROUP)
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def proxy(hub: HubProcess) -> Iterator[TamperProxy]:
    p = TamperProxy(hub.url).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def _honest_proxy(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "proxy" in request.fixturenames:
        request.getfixturevalue("proxy").reset()


def make_client(
    hub: HubProcess, home: Path, url: str | None = None, group: str = GROUP, **cfg: Any
) -> UpdateClient:
    root = home / "provisioned-root.json"
    if not root.exists():
        home.mkdir(parents=True, exist_ok=True)
        root.write_bytes(hub.root)
    settings: dict[str, Any] = {
        "connect_timeout_s": 2.0,
        "read_timeout_s": 5.0,
        "max_attempts": 3,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "min_free_bytes": 0,
        **cfg,
    }
    config = HubConfig(url=url or hub.url, trusted_root=str(root), **settings)
    return UpdateClient(config, group, home / "tuf" / "metadata", home / "tuf" / "targets")


def package_files(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def fetch_stable(client: UpdateClient, assignment: SignedAssignment, into: Path) -> Path:
    doc = assignment.document
    return client.fetch_version(
        doc["model"],
        doc["stable"]["version"],
        into,
        manifest_sha256=doc["stable"]["manifest_sha256"],
        model_sha256=doc["stable"]["sha256"],
    )


def refused(action: Callable[[], object], reason: str, into: Path | None = None) -> VerificationError:
    """`action` raises VerificationError(reason) quickly and leaves `into` empty."""
    started = time.monotonic()
    with pytest.raises(VerificationError) as caught:
        action()
    assert caught.value.reason == reason, caught.value
    assert time.monotonic() - started < 10
    if into is not None:
        assert not into.exists() or list(into.iterdir()) == []
    return caught.value


def still_usable(client: UpdateClient, tmp_path: Path, version: int = 1) -> None:
    """After an attack: an honest check and download work, and Store accepts the package."""
    assignment = client.check()
    assert assignment is not None and assignment.document["model"] == "wine"
    package = client.fetch_version("wine", version, tmp_path / "after")
    assert Store(tmp_path / "agent-data").install(package).manifest.version == version


def target_url(hub: HubProcess, path: str) -> str:
    """The consistent-snapshot URL path of a signed target (hash-prefixed file name)."""
    dirname, _, basename = path.rpartition("/")
    found = next((hub.data / "tuf" / "targets" / dirname).glob(f"*.{basename}"))
    return f"/tuf/targets/{dirname}/{found.name}"


# -- the honest path ------------------------------------------------------------------------


def test_check_returns_the_signed_assignment_and_fetch_gives_an_installable_package(
    hub: HubProcess, wine: dict[int, Path], tmp_path: Path
) -> None:
    client = make_client(hub, tmp_path / "dev")
    assignment = client.check()
    assert assignment is not None
    assert assignment.target_path == f"groups/{GROUP}/assignment.json"
    assert assignment.sha256 == hashlib.sha256(assignment.data).hexdigest()
    doc = assignment.document
    assert (doc["group"], doc["model"], doc["stable"]["version"], doc["candidate"]) == (
        GROUP,
        "wine",
        1,
        None,
    )

    into = tmp_path / "staging"
    package = fetch_stable(client, assignment, into)
    assert package.parent == into and list(into.iterdir()) == [package]  # no partial leftovers
    assert package_files(wine[1]) == {p.name: p.read_bytes() for p in package.iterdir()}
    installed = Store(tmp_path / "agent-data").install(package)
    assert (installed.manifest.name, installed.manifest.version) == ("wine", 1)
    # The provisioned root was kept as the trusted one (atomically, in our own file).
    assert client.trusted_root_path.read_bytes() == hub.root
    # A second fetch of the same version gets a fresh directory of its own.
    again = client.fetch_version("wine", 1, into)
    assert again != package and sorted(p.name for p in into.iterdir()) == sorted([package.name, again.name])


def test_a_new_deployment_is_seen_by_the_next_check(hub: HubProcess, tmp_path: Path) -> None:
    hub.outpost("deploy", "wine", "1", "--group", "rolling")
    client = make_client(hub, tmp_path / "dev", group="rolling")
    first = client.check()
    assert first is not None and first.document["stable"]["version"] == 1
    hub.outpost("deploy", "wine", "2", "--group", "rolling")
    second = client.check()
    assert second is not None and second.document["stable"]["version"] == 2
    assert second.document["serial"] > first.document["serial"] and second.sha256 != first.sha256


def test_an_unchanged_timestamp_is_a_304_and_a_change_is_still_seen(hub: HubProcess, tmp_path: Path) -> None:
    """Polls ask for timestamp.json with its last ETag: nothing new costs a 304 (the copy held is
    verified again by python-tuf), and a new deployment still comes through."""
    hub.outpost("deploy", "wine", "1", "--group", "polled")
    client = make_client(hub, tmp_path / "dev", group="polled")
    fetcher = client._fetcher
    first = client.check()
    assert first is not None and fetcher.not_modified == 0
    again = client.check()
    assert again is not None and again.sha256 == first.sha256 and fetcher.not_modified == 1
    hub.outpost("deploy", "wine", "2", "--group", "polled")
    changed = client.check()
    assert changed is not None and changed.document["stable"]["version"] == 2
    assert fetcher.not_modified == 1  # a new timestamp: fetched whole


def test_a_group_without_an_assignment_gets_none(hub: HubProcess, tmp_path: Path) -> None:
    assert make_client(hub, tmp_path / "dev", group="nobody-deployed-here").check() is None


def test_a_missing_or_bad_provisioned_root_is_a_clear_error(hub: HubProcess, tmp_path: Path) -> None:
    client = make_client(hub, tmp_path / "dev")
    root = Path(client._config.trusted_root)
    root.write_bytes(b"{}")
    with pytest.raises(UpdateError, match="not TUF root metadata"):
        client.check()
    root.unlink()
    with pytest.raises(UpdateError, match="cannot read the provisioned TUF root"):
        client.check()


def test_hub_down_is_hub_unreachable_after_bounded_retries(hub: HubProcess, tmp_path: Path) -> None:
    client = make_client(hub, tmp_path / "dev", url=f"http://127.0.0.1:{free_port()}", max_attempts=3)
    started = time.monotonic()
    with pytest.raises(HubUnreachable) as caught:
        client.check()
    assert time.monotonic() - started < 3.0
    assert caught.value.status is None and "cannot" in str(caught.value)


def test_server_errors_are_retried_and_404_is_not(
    hub: HubProcess, proxy: TamperProxy, tmp_path: Path
) -> None:
    failures = [503, 502]
    proxy.on(
        re.escape(f"{META}/timestamp.json"),
        lambda _m, _up: Reply(b"busy", failures.pop(0)) if failures else None,
    )
    client = make_client(hub, tmp_path / "dev", url=proxy.url)
    assert client.check() is not None
    assert proxy.hits.count(f"{META}/timestamp.json") == 3  # two 5xx, then the real one

    fetcher = HubFetcher(HubConfig(url=proxy.url, max_attempts=3, retry_base_s=0.01))
    proxy.reset()
    with pytest.raises(exceptions.DownloadHTTPError) as caught:
        fetcher.download_bytes(f"{proxy.url}{META}/999.root.json", 1000)
    assert caught.value.status_code == 404
    assert proxy.hits == [f"{META}/999.root.json"]  # ends python-tuf's root probe at once


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outpost test hub")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(ski, False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "hub-cert.pem", tmp_path / "hub-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_with_the_configured_ca_bundle_and_a_proxy(
    hub: HubProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ssl

    import certifi

    # requests lets this override a Session's `verify`; hub.ca_bundle must win over it.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    https = TamperProxy(hub.url, tls=context).start()
    try:
        trusting = make_client(hub, tmp_path / "trusting", url=https.url, ca_bundle=str(cert))
        assert trusting.check() is not None
        # A certificate nobody configured is refused at once (not retried), like any dead hub.
        started = time.monotonic()
        with pytest.raises(HubUnreachable, match=r"(?i)certificate|TLS"):
            make_client(
                hub, tmp_path / "default-cas", url=https.url, max_attempts=4, retry_base_s=1.0
            ).check()
        assert time.monotonic() - started < 1.0
    finally:
        https.stop()

    forward = TamperProxy(hub.url).start()  # as an HTTP forward proxy (hub.proxy)
    try:
        via = make_client(hub, tmp_path / "via-proxy", proxy=forward.url)
        assert via.check() is not None
        assert f"{META}/timestamp.json" in forward.hits
    finally:
        forward.stop()


def test_tls_and_proxy_settings_reach_the_session(tmp_path: Path) -> None:
    config = HubConfig(
        url="https://hub.example",
        proxy="http://proxy.example:3128",
        ca_bundle="/etc/outpost/ca.pem",
        client_cert="/etc/outpost/client.pem",
        client_key="/etc/outpost/client.key",
    )
    fetcher = HubFetcher(config)
    session = fetcher._session
    assert fetcher._verify == "/etc/outpost/ca.pem"  # also passed with each request
    assert session.proxies == {"http": config.proxy, "https": config.proxy}
    assert session.verify == "/etc/outpost/ca.pem"
    assert session.cert == ("/etc/outpost/client.pem", "/etc/outpost/client.key")
    assert HubFetcher(HubConfig(url="https://hub.example", tls_verify=False))._session.verify is False


def test_retries_back_off_exponentially_with_jitter_and_stop() -> None:
    import random

    waits: list[float] = []
    config = HubConfig(url="http://x", max_attempts=5, retry_base_s=0.5, retry_max_s=3.0)
    fetcher = HubFetcher(config, sleep=waits.append, rng=random.Random(7))
    with pytest.raises(exceptions.DownloadError, match="cannot connect"):
        fetcher.download_bytes(f"http://127.0.0.1:{free_port()}/tuf/metadata/timestamp.json", 100)
    assert len(waits) == 4  # five tries, four waits in between
    for n, wait in enumerate(waits, start=1):
        assert 0 <= wait <= min(3.0, 0.5 * 2 ** (n - 1))
    assert len(set(waits)) == 4  # jittered


def test_hub_settings_parse_and_are_checked() -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    cfg = parse_config({"hub": {"url": "https://hub", "ca_bundle": "/ca.pem", "max_attempts": 2}})
    assert (cfg.hub.ca_bundle, cfg.hub.max_attempts, cfg.hub.read_timeout_s) == ("/ca.pem", 2, 30.0)
    for key, value in (("connect_timeout_s", 0), ("max_attempts", 0), ("min_free_bytes", -1)):
        with pytest.raises(ConfigError, match=re.escape(f"hub.{key}")):
            parse_config({"hub": {key: value}})
    with pytest.raises(ConfigError, match=re.escape("hub.client_key")):
        parse_config({"hub": {"client_key": "/k.pem"}})


def test_checks_run_one_at_a_time(hub: HubProcess, tmp_path: Path) -> None:
    client = make_client(hub, tmp_path / "dev")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.check(), range(4)))
    assert len({r.sha256 for r in results if r is not None}) == 1 and None not in results
    # another process holding the cache's lock: refused, not corrupted
    fd = os.open(client.metadata_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UpdateError, match="another process"):
            client.check()
    finally:
        os.close(fd)
    assert client.check() is not None


def test_not_enough_disk_space_is_a_clear_error(hub: HubProcess, tmp_path: Path) -> None:
    client = make_client(hub, tmp_path / "dev", min_free_bytes=2**62)
    with pytest.raises(UpdateError, match="not enough disk space") as caught:
        client.fetch_version("wine", 1, tmp_path / "staging")
    assert not isinstance(caught.value, VerificationError)
    assert list((tmp_path / "staging").iterdir()) == []


def test_root_rotation_is_followed_and_the_trusted_root_survives_a_lost_link(
    hub: HubProcess, tmp_path: Path
) -> None:
    client = make_client(hub, tmp_path / "dev")
    assert client.check() is not None
    result = subprocess.run(
        [HUB_BIN, "keys", "rotate", "root", "--data", str(hub.data)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert client.check() is not None
    assert Metadata.from_bytes(client.trusted_root_path.read_bytes()).signed.version == 2
    # python-tuf's root.json link is removed and re-created: a crash in between loses it.
    (client.metadata_dir / "root.json").unlink()
    shutil.rmtree(client.metadata_dir / "root_history")
    assert client.check() is not None  # started from our copy (v2), not the provisioned v1
    assert Metadata.from_bytes(client.trusted_root_path.read_bytes()).signed.version == 2


# -- attacks --------------------------------------------------------------------------------


def test_tampered_target_on_the_hub_disk_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    client = make_client(hub, tmp_path / "dev")
    assert client.check() is not None
    victim = next((hub.data / "tuf" / "targets" / "models" / "wine" / "1").glob("*.model.onnx"))
    original = victim.read_bytes()
    into = tmp_path / "staging"
    try:
        victim.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same length, other bytes
        error = refused(lambda: client.fetch_version("wine", 1, into), "length-hash-mismatch", into)
        assert "models/wine/1/model.onnx" in str(error)
    finally:
        victim.write_bytes(original)
    still_usable(client, tmp_path)


@pytest.mark.parametrize("content_length", [True, False], ids=["announced", "streamed"])
def test_a_target_longer_than_signed_is_cut_at_its_signed_length(
    hub: HubProcess, proxy: TamperProxy, tmp_path: Path, content_length: bool
) -> None:
    client = make_client(hub, tmp_path / "dev", url=proxy.url)
    assert client.check() is not None
    url = target_url(hub, "models/wine/1/model.onnx")
    extra = 8 * 1024 * 1024
    proxy.on(
        re.escape(url),
        lambda m, up: (
            Reply([up(m[0])[1], *endless(limit=extra)], content_length=False)
            if not content_length
            else Reply(up(m[0])[1] + b"\0" * extra)
        ),
    )
    into = tmp_path / "staging"
    error = refused(lambda: client.fetch_version("wine", 1, into), "too-long", into)
    assert "longer" in str(error) or "announces" in str(error)
    # Cut at the limit: the client stopped reading long before the 8 MiB of extra bytes
    # (what was sent is bounded by the kernel's socket buffers, not by the client's reads).
    if not content_length:
        assert proxy.sent[url] < extra
    proxy.reset()
    still_usable(client, tmp_path)


@pytest.mark.parametrize("role", ["timestamp", "snapshot"])
def test_replayed_older_metadata_is_refused_as_a_rollback(
    hub: HubProcess, proxy: TamperProxy, tmp_path: Path, role: str
) -> None:
    old_timestamp = proxy.upstream(f"{META}/timestamp.json")[1]
    old_snapshot_version = Metadata[Timestamp].from_bytes(old_timestamp).signed.snapshot_meta.version
    old_snapshot = proxy.upstream(f"{META}/{old_snapshot_version}.snapshot.json")[1]
    group = f"replay-{role}"
    hub.outpost("deploy", "wine", "2", "--group", group)  # a newer snapshot and timestamp
    client = make_client(hub, tmp_path / "dev", url=proxy.url, group=group)
    seen = client.check()  # has seen the newer ones
    assert seen is not None and seen.document["stable"]["version"] == 2
    hub.outpost("deploy", "wine", "1", "--group", group)  # newer still, unseen

    if role == "timestamp":  # a mirror serving yesterday's timestamp
        proxy.serve(f"{META}/timestamp.json", old_timestamp)
        expected = "rollback"
    else:  # yesterday's snapshot under the name today's timestamp asks for
        proxy.on(
            rf"{re.escape(META)}/(\d+)\.snapshot\.json",
            lambda m, _up: Reply(old_snapshot) if int(m[1]) > old_snapshot_version else None,
        )
        expected = "length-hash-mismatch"  # the timestamp pins the snapshot's hash
    into = tmp_path / "staging"
    refused(client.check, expected, into)
    refused(lambda: client.fetch_version("wine", 1, into), expected, into)
    proxy.reset()
    assignment = client.check()  # the honest hub again: the newest deployment
    assert assignment is not None and assignment.document["stable"]["version"] == 1
    still_usable(client, tmp_path)


def test_a_frozen_mirror_is_refused_once_its_timestamp_expires(
    hub: HubProcess, proxy: TamperProxy, tmp_path: Path
) -> None:
    client = make_client(hub, tmp_path / "dev", url=proxy.url)
    assert client.check() is not None
    frozen = tmp_path / "frozen"
    shutil.copytree(hub.data / "tuf" / "metadata", frozen)  # the mirror stops syncing here
    proxy.on(
        rf"{re.escape(META)}/(.+)",
        lambda m, _up: Reply((frozen / m[1]).read_bytes()) if (frozen / m[1]).is_file() else Reply(b"", 404),
    )
    expires = Metadata.from_bytes((frozen / "timestamp.json").read_bytes()).signed.expires
    wait = (expires - datetime.now(UTC)).total_seconds() + 1.1
    assert wait < EXPIRY_S + 2
    time.sleep(max(wait, 0))
    into = tmp_path / "staging"
    error = refused(client.check, "expired", into)
    assert "freeze" in str(error)
    refused(lambda: client.fetch_version("wine", 1, into), "expired", into)
    proxy.reset()
    still_usable(client, tmp_path)


def test_snapshot_targets_mix_and_match_is_refused(
    hub: HubProcess, proxy: TamperProxy, wine: dict[int, Path], tmp_path: Path
) -> None:
    client = make_client(hub, tmp_path / "dev", url=proxy.url)
    assert client.check() is not None
    client.fetch_version("wine", 1, tmp_path / "before")  # the models role as it was
    hub.outpost("push", str(wine[3]), "--quiet")  # a newer models role, listing version 3

    def older_models(m: re.Match[str], up: Callable[[str], tuple[int, bytes]]) -> Reply:
        # An older, genuinely signed models role under the name (and, padded with
        # whitespace outside the signed part, at the length) the snapshot states.
        genuine = up(m[0])[1]
        for version in range(int(m[1]) - 1, 0, -1):
            status, old = up(f"{META}/{version}.models.json")
            if status == 200 and len(old) <= len(genuine):
                return Reply(old + b" " * (len(genuine) - len(old)))
        raise AssertionError("no older models role to replay")

    proxy.on(rf"{re.escape(META)}/(\d+)\.models\.json", older_models)
    into = tmp_path / "staging"
    error = refused(lambda: client.fetch_version("wine", 3, into), "rollback", into)
    assert "models" in str(error) and "mix-and-match" in str(error)
    proxy.reset()
    still_usable(client, tmp_path, version=3)


def test_metadata_signed_by_the_wrong_key_is_refused(
    hub: HubProcess, proxy: TamperProxy, tmp_path: Path
) -> None:
    client = make_client(hub, tmp_path / "dev", url=proxy.url)
    assert client.check() is not None

    def forged(m: re.Match[str], up: Callable[[str], tuple[int, bytes]]) -> Reply:
        md = Metadata.from_bytes(up(m[0])[1])
        md.signed.version += 10  # newer than anything: only the signature can refuse it
        md.signed.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        md.sign(CryptoSigner.generate_ed25519())  # replaces the hub's signature
        return Reply(md.to_bytes())

    proxy.on(re.escape(f"{META}/timestamp.json"), forged)
    into = tmp_path / "staging"
    refused(client.check, "bad-signature", into)
    refused(lambda: client.fetch_version("wine", 1, into), "bad-signature", into)
    proxy.reset()
    still_usable(client, tmp_path)


def test_a_stolen_deploy_key_cannot_name_a_model_outside_its_delegation(
    hub: HubProcess, proxy: TamperProxy, wine: dict[int, Path], tmp_path: Path
) -> None:
    """The deploy key (and the online snapshot/timestamp keys) are stolen: the attacker signs
    an assignment naming a model of their own, and lists its files in the group role."""
    group = "stolen"
    hub.outpost("deploy", "wine", "1", "--group", group)
    keys = KeyStore.under(hub.data / "keys")
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    up = proxy.upstream
    timestamp = Metadata[Timestamp].from_bytes(up(f"{META}/timestamp.json")[1])
    snapshot_version = timestamp.signed.snapshot_meta.version
    snapshot = Metadata[Snapshot].from_bytes(up(f"{META}/{snapshot_version}.snapshot.json")[1])
    role = f"group-{group}"
    role_version = snapshot.signed.meta[f"{role}.json"].version
    group_md = Metadata[Targets].from_bytes(up(f"{META}/{role_version}.{role}.json")[1])

    evil = {"manifest.json": b'{"model": {"file": "model.onnx"}}', "model.onnx": b"evil bytes"}
    served: dict[str, bytes] = {}

    def sign_target(path: str, data: bytes) -> None:
        target = TargetFile.from_data(path, data, ["sha256"])
        group_md.signed.targets[path] = target
        served[target_url_for(path, target.hashes["sha256"])] = data

    for name, data in evil.items():
        sign_target(f"models/evil/1/{name}", data)
    sign_target("models/wine/1/model.onnx", evil["model.onnx"])  # and try to replace a real one
    stable = {
        "version": 1,
        "manifest": "models/evil/1/manifest.json",
        "manifest_sha256": hashlib.sha256(evil["manifest.json"]).hexdigest(),
        "model": "models/evil/1/model.onnx",
        "sha256": hashlib.sha256(evil["model.onnx"]).hexdigest(),
    }
    document = json.dumps({"group": group, "model": "evil", "stable": stable, "candidate": None}).encode()
    sign_target(f"groups/{group}/assignment.json", document)

    group_md.signed.version += 1
    group_md.signed.expires = later
    group_md.sign(keys.load("deploy"))
    group_bytes = group_md.to_bytes()
    snapshot.signed.meta[f"{role}.json"] = MetaFile(group_md.signed.version, length=len(group_bytes))
    snapshot.signed.version += 1
    snapshot.signed.expires = later
    snapshot.sign(keys.load("snapshot"))
    snapshot_bytes = snapshot.to_bytes()
    timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, snapshot_bytes, ["sha256"])
    timestamp.signed.version += 1
    timestamp.signed.expires = later
    timestamp.sign(keys.load("timestamp"))

    proxy.serve(f"{META}/timestamp.json", timestamp.to_bytes())
    proxy.serve(f"{META}/{snapshot.signed.version}.snapshot.json", snapshot_bytes)
    proxy.serve(f"{META}/{group_md.signed.version}.{role}.json", group_bytes)
    for url, data in served.items():
        proxy.serve(url, data)

    client = make_client(hub, tmp_path / "dev", url=proxy.url, group=group)
    assignment = client.check()  # the deploy key may say what should run: it verifies
    assert assignment is not None and assignment.document["model"] == "evil"
    into = tmp_path / "staging"
    error = refused(lambda: fetch_stable(client, assignment, into), "not-signed", into)
    assert "models/evil/1/manifest.json" in str(error)
    # Only the models role vouches for model files: the group role's copy is never consulted.
    package = client.fetch_version("wine", 1, tmp_path / "wine")
    assert package_files(wine[1])["model.onnx"] == (package / "model.onnx").read_bytes()
    # And a version nobody signed is not resolvable either.
    refused(lambda: client.fetch_version("wine", 99, into), "not-signed", into)


def target_url_for(path: str, sha256: str) -> str:
    dirname, _, basename = path.rpartition("/")
    return f"/tuf/targets/{dirname}/{sha256}.{basename}"


def test_an_oversized_metadata_response_is_cut_at_the_limit(
    hub: HubProcess, proxy: TamperProxy, tmp_path: Path
) -> None:
    client = make_client(hub, tmp_path / "dev", url=proxy.url)
    assert client.check() is not None
    path = f"{META}/timestamp.json"
    proxy.on(re.escape(path), lambda _m, _up: Reply(endless(), content_length=False))  # a GiB
    into = tmp_path / "staging"
    error = refused(client.check, "too-long", into)
    assert "16384" in str(error)  # python-tuf's cap for the timestamp
    assert proxy.sent[path] < 64 * 1024 * 1024  # the client hung up; the rest was never sent

    # The fetcher on its own: never more than allowed lands in the file, announced or not.
    fetcher = HubFetcher(HubConfig(url=proxy.url))
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        fetcher.download_bytes(proxy.url + path, 1000)
    proxy.on(re.escape(path), lambda _m, _up: Reply(b"x" * 5000))
    with pytest.raises(exceptions.DownloadLengthMismatchError, match="announces 5000"):
        fetcher.download_bytes(proxy.url + path, 1000)
    assert fetcher.download_bytes(proxy.url + path, 5000) == b"x" * 5000
    fetcher.close()
    proxy.reset()
    still_usable(client, tmp_path)
