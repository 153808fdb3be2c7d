"""The hub's one exception tree (the hub server and the operator CLI `outpost`).

    HubError                        anything the hub or `outpost` reports to a person
    ├── PackagingError              `outpost package` cannot turn the model and sample it was
    │                               given into a package: unreadable or unsupported model,
    │                               malformed sample, bad options, unwritable output
    ├── RegistryError               the hub's model registry refuses a request or cannot
    │   │                           reach its database (`status` is the HTTP answer)
    │   ├── NotFoundError           no such model, version, group, token or blob (404)
    │   ├── ConflictError           contradicts the registry's state: a version that is not
    │   │                           newer, deleting a deployed version, nothing to roll back (409)
    │   ├── InvalidRequestError     a value out of range: percent, names, candidate == stable (400)
    │   ├── PackageRejected         an uploaded package failed validation; says why (422)
    │   │   └── PackageTooLarge     ... because it is over a size limit (413)
    │   ├── BlobCorruptError        a stored blob no longer hashes to its name (500)
    │   ├── DatabaseUnavailable     the database cannot be reached or used right now: down,
    │   │                           restarting, out of connections (503; retry later)
    │   └── SchemaError             the database's schema is not the one this hub runs on
    │                               (older: `outpost-hub migrate`; newer; not a hub's) (500)
    ├── AuthError                   no operator token, or an unknown or revoked one (401)
    ├── ObjectStoreError            the S3-compatible object store (hub.objectstore) cannot be
    │                               reached or refuses a request; names bucket and key (503)
    └── SigningError                the TUF repository (hub/signing) cannot sign or publish
        ├── MissingKeyError         a role's private key is not in its key directory (e.g. an
        │                           offline key kept on another machine); names key and dir (503)
        ├── KeyMismatchError        a key file is not the key the metadata trusts for its role
        ├── SigningLockError        the signing lock (a PostgreSQL advisory lock) cannot be taken
        │                           or was lost with the database connection: nothing was
        │                           published; retry (503)
        ├── RepositoryStateError    create() on an existing repository, or use before create() (409)
        ├── TargetConflictError     a model version already signed with other bytes (409)
        ├── UnknownTargetError      no such signed model version (404)
        └── InvalidNameError        a name, version or custom field unfit for a target (400)

Messages are written for the operator: they say what was wrong and, where it is not
obvious, what to do. Foreign exceptions (scikit-learn, skl2onnx, onnxruntime, OS) are
mapped at the boundary with `raise ... from exc`; the CLI prints `outpost: error: <message>`
and exits 2, never with a traceback.
"""

from __future__ import annotations


class HubError(Exception):
    """Base of every error the hub and the operator CLI raise on purpose."""


class PackagingError(HubError):
    """The model, the sample data or the options given to the packager are unusable."""


class RegistryError(HubError):
    """The model registry refuses a request, or its database cannot be used."""

    status = 500


class DatabaseUnavailable(RegistryError):
    """The database cannot be used right now (SQLAlchemy's OperationalError: a server down or
    restarting, a connection lost, a locked SQLite file): nothing was changed; try again."""

    status = 503


class NotFoundError(RegistryError):
    """No such model, version, group, token or blob."""

    status = 404


class ConflictError(RegistryError):
    """The request contradicts the registry's current state."""

    status = 409


class InvalidRequestError(RegistryError):
    """A value given to the registry is malformed or out of range."""

    status = 400


class PackageRejected(RegistryError):
    """An uploaded model package failed validation; the message says what to fix."""

    status = 422


class PackageTooLarge(PackageRejected):
    """An uploaded manifest or model is over its size limit."""

    status = 413


class BlobCorruptError(RegistryError):
    """A stored blob's content no longer matches the SHA-256 it is stored under."""

    status = 500


class SchemaError(RegistryError):
    """The database is not at the schema revision this hub's code runs on (hub.migrations)."""

    status = 500


class AuthError(HubError):
    """A request to the operator API carries no token, or an unknown or revoked one."""

    status = 401


class ObjectStoreError(HubError):
    """The S3-compatible object store cannot be reached, or refuses a request."""

    status = 503


class SigningError(HubError):
    """The hub's TUF repository cannot sign or publish what was asked."""

    status = 500


class MissingKeyError(SigningError):
    """A role's private key is not where the key store looks for it (maybe kept offline)."""

    status = 503


class KeyMismatchError(SigningError):
    """A private key file is not the key the current metadata trusts for that role."""

    status = 500


class SigningLockError(SigningError):
    """The lock that makes one process at a time sign cannot be taken, or was lost (the
    database connection holding it died): nothing was published."""

    status = 503


class RepositoryStateError(SigningError):
    """The repository already exists (create), or does not exist yet (everything else)."""

    status = 409


class TargetConflictError(SigningError):
    """A model version is already signed with different files or bytes; versions are immutable."""

    status = 409


class UnknownTargetError(SigningError):
    """The model version to withdraw is not in the signed repository."""

    status = 404


class InvalidNameError(SigningError):
    """A model, group or file name, a version or a custom field the repository cannot sign."""

    status = 400
