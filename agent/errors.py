"""The agent's one exception tree.

    AgentError                      anything the agent reports to a person or a caller
    ├── ConfigError                 the TOML config is wrong; names the key
    ├── PackageError                a model package is malformed, corrupt or inconsistent
    ├── ModelLoadError              onnxruntime refused the model, or its self-test failed
    ├── RequestError                a caller's request is wrong (HTTP 4xx)
    │   ├── NotFound                unknown model or version (404)
    │   └── PayloadTooLarge         body over the configured limit (413)
    ├── Unavailable                 nothing ready to answer (503)
    ├── UpdateError                 an update check or download failed; serving goes on as before
    │   ├── HubUnreachable          network, DNS, TLS, timeout or HTTP error talking to the hub
    │   ├── VerificationError       the hub's answer did not verify (TUF): a possible attack;
    │   │                           `reason` names the class (expired, rollback, bad-signature, ...)
    │   ├── AssignmentError         the signed assignment document is malformed; nothing in it is used
    │   └── StateError              the saved update state is unreadable (corrupt, unknown format)
    └── TelemetryError              MQTT telemetry failed; serving and updates go on without it
        └── OutboxError             the on-disk outbox (SQLite) cannot be opened, read or written

Foreign exceptions (onnxruntime, json, OS) are mapped at the boundary with
`raise ... from exc`, so no caller ever sees a traceback.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration file is invalid."""


class PackageError(AgentError):
    """A model package is malformed, corrupt, or does not match its manifest."""


class ModelLoadError(AgentError):
    """A model version could not be loaded or failed its self-test."""


class RequestError(AgentError):
    """The caller sent something wrong. Maps to an HTTP 4xx status."""

    status = 400


class NotFound(RequestError):
    status = 404


class PayloadTooLarge(RequestError):
    status = 413


class Unavailable(AgentError):
    """No version is ready to answer. Maps to HTTP 503."""

    status = 503


class UpdateError(AgentError):
    """An update check or download failed; the agent keeps serving what it has."""


class HubUnreachable(UpdateError):
    """The hub (or a mirror) could not be reached or answered with an HTTP error.

    `status` is the HTTP status when there was one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VerificationError(UpdateError):
    """What the hub served did not verify against the trusted metadata; nothing was used.

    `reason` is a short stable tag for events and metrics: "expired" (freeze), "rollback"
    (older or mismatched versions: replay, mix-and-match), "bad-signature", "length-hash-mismatch",
    "too-long" (endless data), "malformed", "not-signed" (no role may vouch for the target),
    "hash-mismatch" (bytes differ from what the assignment states) or "invalid".
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class AssignmentError(UpdateError):
    """The group's assignment document (signed by the hub) is malformed; nothing in it is acted on."""


class StateError(UpdateError):
    """The saved update state is unreadable: corrupt, inconsistent or of an unknown format.

    `agent.update.StateFile.load_or_reset` moves such a file aside and starts afresh.
    """


class TelemetryError(AgentError):
    """Telemetry (MQTT, the on-disk outbox) failed; serving and updates go on without it."""


class OutboxError(TelemetryError):
    """The telemetry outbox (SQLite) could not be opened, read or written.

    The message names the file; a disk that is full or read-only is the usual cause.
    """
