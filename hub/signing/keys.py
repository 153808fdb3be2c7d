"""Private signing keys, one PEM file per role, in an online and an offline directory.

    online/   snapshot.pem timestamp.pem models.pem deploy.pem   the running hub signs with these
    offline/  root.pem targets.pem                               only for init, rotation and changes
                                                                 to the top-level delegations

The offline directory may live on another machine (or a removable disk): every operation
that needs one of its keys fails with MissingKeyError naming the key and the directory,
and nothing is written. Group roles sign with the deploy key, so creating a group never
needs an offline key.

Files are PKCS#8 PEM, mode 0600 in a 0700 directory; a key readable by anyone else is
refused. Rotation writes the new key as `<role>.next.pem` before any metadata trusts it,
then retires the old one as `<role>.<keyid>.retired.pem` (kept, never deleted) — so a crash
in between leaves both keys, and `signer()` finishes the switch once the metadata shows
which one is trusted.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.fsutil import fsync_dir, write_atomic
from hub.errors import KeyMismatchError, MissingKeyError, SigningError
from hub.signing._tuf import CryptoSigner
from hub.signing.layout import DEPLOY, KEYED_ROLES, MODELS, ROOT, SNAPSHOT, TARGETS, TIMESTAMP

ONLINE_ROLES = (SNAPSHOT, TIMESTAMP, MODELS, DEPLOY)
OFFLINE_ROLES = (ROOT, TARGETS)
_KEY_MODE = 0o600
_DIR_MODE = 0o700


class KeyStore:
    """The private keys of the six keyed roles, split over an online and an offline directory."""

    def __init__(self, online_dir: str | os.PathLike[str], offline_dir: str | os.PathLike[str]) -> None:
        self.online_dir = Path(online_dir)
        self.offline_dir = Path(offline_dir)

    @classmethod
    def under(cls, base: str | os.PathLike[str]) -> KeyStore:
        """The conventional layout: `base/online` and `base/offline`."""
        return cls(Path(base) / "online", Path(base) / "offline")

    def directory(self, role: str) -> Path:
        if role in ONLINE_ROLES:
            return self.online_dir
        if role in OFFLINE_ROLES:
            return self.offline_dir
        raise ValueError(f"no key is kept for role {role!r} (keyed roles: {', '.join(KEYED_ROLES)})")

    def path(self, role: str) -> Path:
        return self.directory(role) / f"{role}.pem"

    def _next_path(self, role: str) -> Path:
        return self.directory(role) / f"{role}.next.pem"

    def has(self, role: str) -> bool:
        return self.path(role).is_file()

    def load(self, role: str) -> CryptoSigner:
        """The role's current signer; MissingKeyError if its file is not there."""
        path = self.path(role)
        if not path.is_file():
            where = "offline" if role in OFFLINE_ROLES else "online"
            raise MissingKeyError(
                f"the private key of the {role} role is not in {path.parent} (looked for {path.name}); "
                f"it is an {where} key: run this where that directory holds it"
            )
        return _read_signer(path)

    def generate(self, role: str) -> CryptoSigner:
        """A new Ed25519 key for `role`, written to its directory; refuses to replace one."""
        path = self.path(role)
        if path.exists():
            raise SigningError(f"a key for the {role} role already exists: {path}")
        signer = CryptoSigner.generate_ed25519()
        _write_key(path, signer)
        return signer

    def signer(self, role: str, trusted_keyids: Collection[str]) -> CryptoSigner:
        """The role's signer, checked against the keyids the metadata trusts for it.

        If the current key is not trusted but a staged `.next` key is (a rotation that
        stopped after publishing the metadata), the rotation is completed first.
        """
        current = self.load(role) if self.has(role) else None
        if current is not None and current.public_key.keyid in trusted_keyids:
            return current
        staged = self._next_path(role)
        if staged.is_file() and _read_signer(staged).public_key.keyid in trusted_keyids:
            self.promote(role)
            return self.load(role)
        signer = self.load(role)  # MissingKeyError if there is no key at all
        raise KeyMismatchError(
            f"the {role} key in {self.path(role)} (keyid {signer.public_key.keyid[:16]}) is not the key "
            f"the repository trusts for {role} ({', '.join(k[:16] for k in trusted_keyids)}); "
            "restore the right key file"
        )

    def stage(self, role: str) -> CryptoSigner:
        """A new key for `role`, written as `<role>.next.pem` until `promote()`."""
        signer = CryptoSigner.generate_ed25519()
        _write_key(self._next_path(role), signer)
        return signer

    def promote(self, role: str) -> Path | None:
        """Make the staged key current; return where the old key was kept (None: there was none)."""
        current, staged = self.path(role), self._next_path(role)
        retired = None
        if current.exists():
            keyid = _read_signer(current).public_key.keyid[:16]
            retired = current.with_name(f"{role}.{keyid}.retired.pem")
            n = 1
            while retired.exists():
                n += 1
                retired = current.with_name(f"{role}.{keyid}.retired-{n}.pem")
        try:
            if retired is not None:
                current.rename(retired)
            staged.rename(current)
            fsync_dir(current.parent)
        except OSError as exc:
            raise SigningError(f"cannot switch the {role} key in {current.parent}: {exc}") from exc
        return retired


def _write_key(path: Path, signer: CryptoSigner) -> None:
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, mode=_DIR_MODE)
            path.parent.chmod(_DIR_MODE)
        write_atomic(path, signer.private_bytes, mode=_KEY_MODE)
    except OSError as exc:
        raise SigningError(f"cannot write the private key {path}: {exc}") from exc


def _read_signer(path: Path) -> CryptoSigner:
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the private key {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SigningError(
            f"the private key {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return CryptoSigner(load_pem_private_key(pem, password=None))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{path} is not a usable unencrypted PEM private key: {exc}") from exc
