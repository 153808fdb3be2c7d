"""The agent's one exception tree.

    AgentError                      anything the agent reports to a person or a caller
    ├── ConfigError                 the TOML config is wrong; names the key
    ├── PackageError                a model package is malformed, corrupt or inconsistent
    ├── ModelLoadError              onnxruntime refused the model, or its self-test failed
    ├── RequestError                a caller's request is wrong (HTTP 4xx)
    │   ├── NotFound                unknown model or version (404)
    │   └── PayloadTooLarge         body over the configured limit (413)
    └── Unavailable                 nothing ready to answer (503)

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
