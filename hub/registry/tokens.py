"""Operator tokens, pure: making them, hashing them, comparing hashes.

A token is shown once, when it is made; the registry stores only its SHA-256. A token has
256 bits from `secrets`, so a plain (unsalted, fast) hash is enough: there is nothing to
guess that a slow hash would protect. The `outpost_` prefix lets secret scanners spot a
leaked token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "outpost_"
TOKEN_BYTES = 32
# Longer inputs are not tokens; refusing them early bounds the work an attacker can cause.
MAX_TOKEN_CHARS = 256


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def plausible(plaintext: str) -> bool:
    """Whether `plaintext` could be a token at all (cheap, before any database lookup)."""
    return plaintext.startswith(PREFIX) and len(plaintext) <= MAX_TOKEN_CHARS and plaintext.isascii()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))
