"""Names and places: the repository's roles, target paths and files on disk.

Target paths (what devices ask for, relative to the targets base URL):

    models/<name>/<version>/<file>     signed by the `models` role (what may run)
    groups/<group>/assignment.json     signed by the `group-<group>` role (what should run where)

Files under the repository directory (served as is under /tuf/metadata and /tuf/targets):

    metadata/<v>.root.json             every root version ever signed (clients walk the chain)
    metadata/root.json                 the newest root, for provisioning devices
    metadata/<v>.<role>.json           targets, models, deploy, group-*, snapshot (consistent snapshots)
    metadata/timestamp.json            the only unversioned role, rewritten in place (atomically)
    targets/<dir>/<sha256>.<basename>  target bytes, named by content (consistent snapshots)
    .lock                              flock(2) held by the one writer (hub.signing.lock; across
                                       hosts a PostgreSQL advisory lock too)

Names are restricted to a character set that is safe in a path, a URL and a TUF path
pattern (no '/', no glob characters), so a delegation pattern can never match more than
its own directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hub.errors import InvalidNameError

ROOT = "root"
TARGETS = "targets"
SNAPSHOT = "snapshot"
TIMESTAMP = "timestamp"
MODELS = "models"
DEPLOY = "deploy"
GROUP_PREFIX = "group-"

TOP_LEVEL_ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
# Roles whose key the key store holds, one key each; group roles sign with the deploy key.
KEYED_ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP, MODELS, DEPLOY)

# python-tuf matches a pattern segment by segment (fnmatch per segment, same number of
# segments), so "models/*" would match nothing below models/<name>/; spell out the depth.
MODELS_PATHS = ("models/*/*/*",)
DEPLOY_PATHS = ("groups/*/*",)
ASSIGNMENT_FILE = "assignment.json"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_VERSION = 2**63 - 1


def check_name(kind: str, value: object) -> str:
    """`value` if it is a safe model, group or file name; InvalidNameError otherwise."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise InvalidNameError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_VERSION:
        raise InvalidNameError(f"invalid model version {value!r}: a positive integer is needed")
    return value


def group_role(group: str) -> str:
    return GROUP_PREFIX + check_name("group name", group)


def is_group_role(role: str) -> bool:
    return role.startswith(GROUP_PREFIX)


def group_paths(group: str) -> list[str]:
    return [f"groups/{check_name('group name', group)}/*"]


def model_prefix(name: str, version: int) -> str:
    return f"models/{check_name('model name', name)}/{check_version(version)}/"


def model_target(name: str, version: int, filename: str) -> str:
    return model_prefix(name, version) + check_name("file name", filename)


def assignment_target(group: str) -> str:
    return f"groups/{check_name('group name', group)}/{ASSIGNMENT_FILE}"


@dataclass(frozen=True)
class Layout:
    """The paths of one repository directory."""

    base: Path

    @property
    def metadata_dir(self) -> Path:
        return self.base / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.base / "targets"

    @property
    def lock_path(self) -> Path:
        return self.base / ".lock"

    @property
    def root_json(self) -> Path:
        return self.metadata_dir / "root.json"

    def metadata_file(self, role: str, version: int | None = None) -> Path:
        """`<version>.<role>.json`, or `<role>.json` without a version (timestamp, root link)."""
        name = f"{role}.json" if version is None else f"{version}.{role}.json"
        return self.metadata_dir / name

    def target_file(self, target_path: str, sha256: str) -> Path:
        """Where the bytes of `target_path` live: its basename prefixed with their hash."""
        dirname, _, basename = target_path.rpartition("/")
        return self.targets_dir / dirname / f"{sha256}.{basename}"
