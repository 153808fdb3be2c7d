"""The dashboard's login session: a cookie that names an operator token without holding it.

    value = issue(name, key, now)            # "v1.<name>.<expires>.<mac>"
    parse(value) -> Session | None           # the fields, or None when malformed
    valid(session, key, now) -> bool         # the MAC checks out and it has not expired

The cookie carries the token's name, an expiry and an HMAC-SHA256 over both, keyed by that
token's SHA-256 as the registry stores it (hub/registry/tokens.py). So:

- neither the token nor its hash is in the cookie: a stolen cookie gives a session until it
  expires, never the token itself;
- revoking the token (or replacing it under the same name, which changes the hash) ends every
  session it opened, at the next request, on every hub worker: nothing is kept in memory and
  no extra secret has to be shared between workers;
- forging a cookie needs the hash, which only the database holds.

Pure: no I/O; `key_for` (the database read) lives in hub.dashboard.data.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

COOKIE = "outpost_session"
SESSION_S = 12 * 3600  # a session lasts one working day; log in again after
_DOMAIN = b"outpost-dashboard-session/1\x00"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the registry's token names (check_name)
_MAX_COOKIE = 256


@dataclass(frozen=True)
class Session:
    name: str
    expires: int
    mac: str


def _mac(name: str, expires: int, key_hex: str) -> str:
    key = bytes.fromhex(key_hex)
    message = _DOMAIN + f"{name}\x00{expires}".encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def issue(name: str, key_hex: str, now: float, lifetime_s: int = SESSION_S) -> str:
    """A cookie value for token `name` (whose stored SHA-256 is `key_hex`), valid `lifetime_s`."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"token name {name!r} cannot go into a session cookie")
    expires = int(now) + lifetime_s
    return f"v1.{name}.{expires}.{_mac(name, expires, key_hex)}"


def parse(value: str | None) -> Session | None:
    """The cookie's fields, or None when it is absent or not one of ours."""
    if not value or len(value) > _MAX_COOKIE:
        return None
    parts = value.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not _NAME.fullmatch(parts[1]) or not parts[2].isdigit():
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", parts[3]):
        return None
    return Session(parts[1], int(parts[2]), parts[3])


def valid(session: Session, key_hex: str | None, now: float) -> bool:
    """Whether the session was issued for the live token whose hash is `key_hex` and is current."""
    if key_hex is None or now >= session.expires:
        return False
    return hmac.compare_digest(session.mac, _mac(session.name, session.expires, key_hex))
