"""The one place alerting touches the network: POST a JSON body to a webhook (requests).

Every outcome becomes an `Attempt` (a status, or an error without one); nothing raises. Redirects
are not followed (a 3xx is a permanent failure: configure the final URL). The receiver's answer
is read only up to `MAX_ERROR_BODY` bytes, for the error message; errors name no URL path or
query (where webhook secrets live).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from hub import __version__
from hub.alerting.retry import Attempt

MAX_ERROR_BODY = 300
DEFAULT_TIMEOUT_S = 10.0


class Poster(Protocol):
    def __call__(self, url: str, body: Any, headers: Mapping[str, str], timeout_s: float) -> Attempt: ...


def post_json(url: str, body: Any, headers: Mapping[str, str], timeout_s: float) -> Attempt:
    data = json.dumps(body, separators=(",", ":")).encode()
    sent = {"Content-Type": "application/json", "User-Agent": f"outpost-hub/{__version__}", **headers}
    try:
        with requests.post(
            url, data=data, headers=sent, timeout=timeout_s, allow_redirects=False, stream=True
        ) as resp:
            error = ""
            if not 200 <= resp.status_code < 300:
                raw = resp.raw.read(MAX_ERROR_BODY, decode_content=True) or b""
                error = raw.decode("utf-8", "replace").strip().replace("\n", " ")
            return Attempt(resp.status_code, error, resp.headers.get("Retry-After"))
    except requests.Timeout:
        return Attempt(None, f"no answer within {timeout_s:g} s")
    except requests.ConnectionError as exc:
        return Attempt(None, f"cannot connect: {_reason(exc, url)}")
    except requests.RequestException as exc:
        return Attempt(None, f"request failed: {_reason(exc, url)}")


def _reason(exc: Exception, url: str) -> str:
    """The error's text without the URL's path and query: a Slack webhook's path is its secret, and
    errors are kept and shown (API, CLI, logs)."""
    text = str(exc)
    parts = urlsplit(url)
    for secret in (parts.query, parts.path):
        if len(secret) > 1:
            text = text.replace(secret, "...")
    return text if len(text) <= 300 else text[:297] + "..."
