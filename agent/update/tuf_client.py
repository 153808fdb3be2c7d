"""The agent's TUF client: its group's signed assignment and the model files, verified.

    client = UpdateClient(config.hub, config.group, data / "tuf" / "metadata", data / "tuf" / "targets")
    assignment = client.check()            # None: the group has no assignment yet
    package = client.fetch_version("wine", 3, data / "staging",
                                   manifest_sha256=..., model_sha256=...)
    Store(data).install(package)

What the hub publishes (see hub.signing.layout), under `<hub.url>/tuf/metadata/` and
`<hub.url>/tuf/targets/`:

    groups/<group>/assignment.json       signed by the group's role (what should run here)
    models/<name>/<version>/manifest.json, model.onnx   signed by `models` (what may run)
    models/<name>/<version>/manifest.int8.json, ...     a version's hardware variants, the same
                                                        way (fetch_version's `targets`)

Trust: the first check bootstraps from the provisioned root (`hub.trusted_root`); every check
after that from the newest root a check verified, which this module keeps in
`<metadata_dir>/trusted/root.json`, written atomically (python-tuf's own `root.json` link is
removed and re-created, so a crash in between would leave none). Each check uses a fresh
`ngclient.Updater` (its refresh() runs once per instance); checks run one at a time (a thread
lock, and an flock on `<metadata_dir>/.lock` against a second process).

Errors: every failure is an `agent.errors.UpdateError`. `VerificationError` when python-tuf
refused what was served (its `reason` names the attack class where python-tuf tells:
expired, rollback, bad-signature, length-hash-mismatch, too-long, ...), `HubUnreachable`
for the network and HTTP errors. Nothing verified before is lost by a failed check.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, TargetFile  # type: ignore[attr-defined]
from tuf.api.serialization import DeserializationError
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from agent.config import HubConfig
from agent.errors import HubUnreachable, UpdateError, VerificationError
from agent.fsutil import fsync_dir, write_atomic
from agent.update.fetcher import USER_AGENT, HubFetcher

log = logging.getLogger(__name__)

MANIFEST_TARGET = "manifest.json"
MODEL_TARGET = "model.onnx"
ASSIGNMENT_FILE = "assignment.json"
PARTIAL_PREFIX = ".outpost-fetch-"  # work directories under `into`; never a package
TRUSTED_ROOT = Path("trusted") / "root.json"  # under metadata_dir
LOCK_FILE = ".lock"  # under metadata_dir
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the hub's names: safe in a path and URL
_MAX_VERSION = 2**63 - 1


@dataclass(frozen=True)
class SignedAssignment:
    """The group's assignment document, as signed: its bytes, their SHA-256 and the parsed JSON."""

    target_path: str
    data: bytes
    sha256: str
    document: dict[str, Any]


class UpdateClient:
    """Checks the hub for `group`'s assignment and fetches model versions, verified by TUF."""

    def __init__(
        self,
        config: HubConfig,
        group: str,
        metadata_dir: Path,
        targets_dir: Path,
        *,
        fetcher: HubFetcher | None = None,
    ) -> None:
        if not config.url:
            raise UpdateError("hub.url is empty: there is no hub to update from")
        self._config = config
        self.group = _check_name("group", group)
        self.metadata_dir = Path(metadata_dir)
        self.targets_dir = Path(targets_dir)
        base = config.url.rstrip("/")
        self._metadata_url = f"{base}/tuf/metadata/"
        self._targets_url = f"{base}/tuf/targets/"
        self._fetcher = fetcher if fetcher is not None else HubFetcher(config, temp_dir=self.targets_dir)
        self._tuf_config = UpdaterConfig(
            root_max_length=config.max_metadata_bytes,
            snapshot_max_length=config.max_metadata_bytes,
            targets_max_length=config.max_metadata_bytes,
            app_user_agent=USER_AGENT,
        )
        self._lock = threading.Lock()

    @property
    def assignment_path(self) -> str:
        return f"groups/{self.group}/{ASSIGNMENT_FILE}"

    @property
    def trusted_root_path(self) -> Path:
        """The newest verified root, once a check has run (else the provisioned one is used)."""
        return self.metadata_dir / TRUSTED_ROOT

    def close(self) -> None:
        self._fetcher.close()

    # -- the two operations -------------------------------------------------------------

    def check(self) -> SignedAssignment | None:
        """Refresh the metadata and return the group's signed assignment (None: it has none)."""
        with self._cycle() as updater:
            info = updater.get_targetinfo(self.assignment_path)
            if info is None:
                log.info("group %s has no signed assignment", self.group)
                return None
            self._check_size(info)
            cached = self.targets_dir / "groups" / self.group / ASSIGNMENT_FILE
            if updater.find_cached_target(info, str(cached)) is None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                for leftover in cached.parent.glob(f".{cached.name}.*.partial"):
                    leftover.unlink(missing_ok=True)  # a crash mid-download left it
                _free_space_for(cached.parent, self.targets_dir, [info.length], self._config.min_free_bytes)
                self._download(updater, info, cached)
            data = cached.read_bytes()
            digest = _verify_bytes(info, data)
            try:
                document = json.loads(data)
            except ValueError as exc:
                raise UpdateError(f"{info.path} is signed but not JSON: {exc}") from exc
            if not isinstance(document, dict):
                raise UpdateError(f"{info.path} is signed but not a JSON object")
            return SignedAssignment(info.path, data, digest, document)

    def fetch_version(
        self,
        model: str,
        version: int,
        into: Path,
        *,
        manifest_sha256: str | None = None,
        model_sha256: str | None = None,
        targets: tuple[str, str] | None = None,
    ) -> Path:
        """Download `model` `version` (manifest + model file) into a new directory under `into`.

        The files are verified by TUF (signed by the `models` role: length and hashes) and, when
        given, against the SHA-256 the assignment states. They are written in a hidden work
        directory (`.outpost-fetch-*`), fsynced, and the directory is renamed into place, so a
        package directory is never partial. Returns it (for `Store.install`). On any failure
        nothing is left under `into`.

        `targets` (manifest, model) are the target paths of a hardware variant, files of this
        version other than manifest.json and model.onnx; only those two are downloaded.
        """
        _check_name("model", model)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= _MAX_VERSION:
            raise UpdateError(f"invalid model version {version!r}: a positive integer is needed")
        expected = {MANIFEST_TARGET: manifest_sha256, MODEL_TARGET: model_sha256}
        into = Path(into)
        with self._cycle() as updater:
            infos: dict[str, TargetFile] = {}
            prefix = f"models/{model}/{version}/"
            manifest_path, model_path = targets or (prefix + MANIFEST_TARGET, prefix + MODEL_TARGET)
            for name, path in ((MANIFEST_TARGET, manifest_path), (MODEL_TARGET, model_path)):
                if not path.startswith(prefix) or "/" in path[len(prefix) :]:
                    raise UpdateError(f"{path} is not a file of {model} version {version}")
                info = updater.get_targetinfo(path)
                if info is None:
                    raise VerificationError(
                        f"{path} is not signed by the hub's models role: the model version does not "
                        "exist or an assignment names a model it may not",
                        reason="not-signed",
                    )
                self._check_size(info)
                _check_expected(info, expected[name])
                infos[name] = info
            try:
                into.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UpdateError(f"cannot create {into}: {exc}") from exc
            _sweep_partials(into)
            _free_space_for(
                into, self.targets_dir, [i.length for i in infos.values()], self._config.min_free_bytes
            )
            return self._fetch_into(updater, infos, expected, into, f"{model}-{version}")

    # -- internals ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _cycle(self) -> Iterator[Updater]:
        """One locked update cycle: a fresh Updater, refreshed; foreign errors mapped."""
        with self._lock, _mapped_errors():
            self._make_dirs()
            with _flocked(self.metadata_dir / LOCK_FILE):
                updater = Updater(
                    str(self.metadata_dir),
                    self._metadata_url,
                    str(self.targets_dir),
                    self._targets_url,
                    self._fetcher,
                    self._tuf_config,
                    bootstrap=self._bootstrap_root(),
                )
                try:
                    updater.refresh()
                finally:
                    # Even after a failed refresh: a newer root it verified stays trusted.
                    self._keep_trusted_root()
                yield updater

    def _make_dirs(self) -> None:
        try:
            for d in (self.metadata_dir, self.targets_dir, self.metadata_dir / TRUSTED_ROOT.parent):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UpdateError(f"cannot create the TUF cache directories: {exc}") from exc

    def _bootstrap_root(self) -> bytes:
        """The root this check starts from: the newest verified one, else the provisioned one."""
        own = self.trusted_root_path
        with contextlib.suppress(FileNotFoundError):
            data = own.read_bytes()
            if _root_version(data) is not None:
                return data
            log.error("%s is not root metadata; starting again from hub.trusted_root", own)
        provisioned = Path(self._config.trusted_root)
        try:
            data = provisioned.read_bytes()
        except OSError as exc:
            raise UpdateError(
                f"cannot read the provisioned TUF root (hub.trusted_root = {provisioned}): {exc.strerror}"
            ) from exc
        if _root_version(data) is None:
            raise UpdateError(
                f"hub.trusted_root = {provisioned} is not TUF root metadata: provision the root.json "
                "that `outpost-hub init` printed"
            )
        return data

    def _keep_trusted_root(self) -> None:
        """Copy the root python-tuf now trusts to our own file, if it is newer (atomically)."""
        try:
            data = (self.metadata_dir / "root.json").read_bytes()  # link to root_history/<v>.root.json
        except OSError:
            return  # python-tuf's link is missing (it failed mid-update): keep ours
        new = _root_version(data)
        if new is None:
            return
        try:
            old = _root_version(self.trusted_root_path.read_bytes())
        except OSError:
            old = None
        if old is not None and old >= new:
            return
        try:
            write_atomic(self.trusted_root_path, data, mode=0o644)
        except OSError as exc:
            log.error("cannot save the trusted root in %s: %s", self.trusted_root_path, exc)
            return
        log.info("trusted TUF root is now version %d", new)

    def _check_size(self, info: TargetFile) -> None:
        if info.length > self._config.max_target_bytes:
            raise UpdateError(
                f"{info.path} is {info.length} bytes, over this device's limit "
                f"(hub.max_target_bytes = {self._config.max_target_bytes})"
            )

    def _download(self, updater: Updater, info: TargetFile, dest: Path) -> None:
        """Download a verified target to `dest`: a temporary name, fsync, rename."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _download_target(updater, info, tmp)
            _fsync_file(tmp)
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)

    def _fetch_into(
        self,
        updater: Updater,
        infos: dict[str, TargetFile],
        expected: dict[str, str | None],
        into: Path,
        stem: str,
    ) -> Path:
        work = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=into))
        try:
            manifest = infos[MANIFEST_TARGET]
            _download_target(updater, manifest, work / MANIFEST_TARGET)
            _verify_file(manifest, work / MANIFEST_TARGET, expected[MANIFEST_TARGET])
            model_file = _model_file_name(work / MANIFEST_TARGET)
            model = infos[MODEL_TARGET]
            _download_target(updater, model, work / model_file)
            _verify_file(model, work / model_file, expected[MODEL_TARGET])
            fsync_dir(work)
            final = _fresh_name(into, stem)
            work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        fsync_dir(into)
        log.info("fetched and verified %s into %s", stem, final)
        return final


# -- helpers ------------------------------------------------------------------------------


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise UpdateError(f"invalid {kind} name {value!r}: 1-128 letters, digits, '.', '_' or '-'")
    return value


def _root_version(data: bytes) -> int | None:
    """The version of `data` if it is root metadata (signatures are python-tuf's business)."""
    try:
        md = Metadata.from_bytes(data)
    except Exception:  # DeserializationError, or anything a broken file provokes
        return None
    return md.signed.version if isinstance(md.signed, Root) else None


def _sha256(info: TargetFile) -> str | None:
    value = info.hashes.get("sha256")
    return value if isinstance(value, str) else None


def _check_expected(info: TargetFile, expected: str | None) -> None:
    """The hash the assignment states must be the hash the models role signed."""
    if expected is None:
        return
    signed = _sha256(info)
    if signed is None or signed != expected.lower():
        raise VerificationError(
            f"{info.path}: the assignment states SHA-256 {expected[:16]}…, the models role signed "
            f"{(signed or 'no SHA-256')[:16]}…",
            reason="hash-mismatch",
        )


def _verify_bytes(info: TargetFile, data: bytes) -> str:
    """SHA-256 of `data`, checked against the signed length and hash (the bytes actually used)."""
    digest = hashlib.sha256(data).hexdigest()
    signed = _sha256(info)
    if len(data) != info.length or (signed is not None and signed != digest):
        raise VerificationError(
            f"{info.path}: the stored bytes differ from the signed length/hash", reason="length-hash-mismatch"
        )
    return digest


def _verify_file(info: TargetFile, path: Path, expected: str | None) -> None:
    """Hash the file as written (and fsync it): signed hash, and the assignment's if given."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    hexdigest = digest.hexdigest()
    signed = _sha256(info)
    if size != info.length or (signed is not None and signed != hexdigest):
        raise VerificationError(
            f"{info.path}: the file written differs from the signed length/hash",
            reason="length-hash-mismatch",
        )
    if expected is not None and expected.lower() != hexdigest:
        raise VerificationError(
            f"{info.path}: SHA-256 {hexdigest[:16]}… is not the {expected[:16]}… the assignment states",
            reason="hash-mismatch",
        )


def _model_file_name(manifest_path: Path) -> str:
    """The model file name the (verified) manifest gives; the package must use it."""
    try:
        doc = json.loads(manifest_path.read_bytes())
        name = doc["model"]["file"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"the signed manifest has no usable model.file ({exc})") from exc
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name == MANIFEST_TARGET:
        raise UpdateError(f"the signed manifest names an unusable model file {name!r}")
    return name


def _download_target(updater: Updater, info: TargetFile, dest: Path) -> None:
    """python-tuf's download_target, with the target's path in the refusals (it names only hashes)."""
    try:
        updater.download_target(info, str(dest))
    except exceptions.LengthOrHashMismatchError as exc:
        raise exceptions.LengthOrHashMismatchError(f"{info.path}: {exc}") from exc
    except exceptions.DownloadLengthMismatchError as exc:
        raise exceptions.DownloadLengthMismatchError(f"{info.path}: {exc}") from exc


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fresh_name(into: Path, stem: str) -> Path:
    candidate = into / stem
    n = 1
    while candidate.exists():
        n += 1
        candidate = into / f"{stem}.{n}"
    return candidate


def _sweep_partials(into: Path) -> None:
    """Remove work directories a crash left (only ours: the lock is held)."""
    for leftover in into.glob(PARTIAL_PREFIX + "*"):
        log.info("removing the partial download %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def _free_space_for(into: Path, temp_dir: Path, lengths: list[int], margin: int) -> None:
    """UpdateError unless the downloads fit, with `margin` to spare.

    Each target first lands in a temporary file in `temp_dir` (one at a time), then is copied
    to `into`.
    """
    files, spool = sum(lengths), max(lengths, default=0)
    try:
        same_disk = into.stat().st_dev == temp_dir.stat().st_dev
        needs = (
            {into: files + spool + margin} if same_disk else {into: files + margin, temp_dir: spool + margin}
        )
        for where, need in needs.items():
            free = shutil.disk_usage(where).free
            if free < need:
                raise UpdateError(
                    f"not enough disk space in {where}: {free} bytes free, the download needs {need} "
                    f"(files {files} bytes, keeping hub.min_free_bytes = {margin} free)"
                )
    except OSError as exc:
        raise UpdateError(f"cannot check the free disk space in {into}: {exc}") from exc


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UpdateError(
                    f"another process is updating from {path.parent} (it holds {path})"
                ) from None
            raise
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    """Foreign exceptions into the agent's tree, at the boundary."""
    try:
        yield
    except UpdateError:
        raise
    except exceptions.ExpiredMetadataError as exc:
        raise VerificationError(
            f"refused: expired metadata ({exc}); a freeze attack, or the hub stopped re-signing",
            reason="expired",
        ) from exc
    except exceptions.BadVersionNumberError as exc:
        raise VerificationError(
            f"refused: metadata version not acceptable ({exc}); a rollback (replayed older metadata) "
            "or mix-and-match attack",
            reason="rollback",
        ) from exc
    except exceptions.UnsignedMetadataError as exc:
        raise VerificationError(
            f"refused: metadata not signed by the trusted keys ({exc})", reason="bad-signature"
        ) from exc
    except exceptions.LengthOrHashMismatchError as exc:
        raise VerificationError(
            f"refused: length or hash differs from the signed one ({exc}); tampered, mix-and-match "
            "or truncated",
            reason="length-hash-mismatch",
        ) from exc
    except exceptions.DownloadLengthMismatchError as exc:
        raise VerificationError(
            f"refused: the response is longer than signed or allowed ({exc}); an endless-data attack "
            "or a tampered file",
            reason="too-long",
        ) from exc
    except exceptions.DownloadHTTPError as exc:
        raise HubUnreachable(f"the hub answered HTTP {exc.status_code}: {exc}", exc.status_code) from exc
    except exceptions.DownloadError as exc:
        raise HubUnreachable(f"cannot reach the hub: {_cause(exc)}") from exc
    except exceptions.RepositoryError as exc:
        reason = "malformed" if isinstance(exc, DeserializationError) else "invalid"
        raise VerificationError(f"refused: the repository's metadata is not valid ({exc})", reason) from exc
    except OSError as exc:
        raise UpdateError(f"local I/O error during the update: {exc}") from exc
    except Exception as exc:  # never a traceback upward; logged in full for a bug report
        log.exception("unexpected error in the TUF client")
        raise UpdateError(f"unexpected error in the TUF client: {exc.__class__.__name__}: {exc}") from exc


def _cause(exc: BaseException) -> str:
    """The innermost message: python-tuf wraps the useful one."""
    parts = [str(exc)]
    while exc.__cause__ is not None:
        exc = exc.__cause__
        parts.append(str(exc))
    return parts[-1] if parts[-1] else parts[0]
