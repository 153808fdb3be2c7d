"""Content-addressed blob store in an S3-compatible bucket (`blob_store = "s3"` in hub.toml).

Layout under the settings' `s3_prefix`:

    blobs/ab/abcdef...        the blob whose SHA-256 is abcdef... (as on the filesystem)

Invariants, as for the filesystem store (hub.registry.blobs): an object under its final name
is complete (S3 shows an upload, multipart or not, only once it is finished) and hashes to
that name; blobs are immutable, so writing one that exists is a no-op. Large blobs go up in
parts (hub.objectstore.s3.MULTIPART_THRESHOLD); reads stream.

Deletes are deferred instead of moved to a trash: `take` only checks that the blob is there
and `purge` deletes it once the registry has committed the change, so a database change that
fails leaves the blob untouched (`restore` has nothing to do). Several hub processes share the
bucket; there is nothing for `sweep` to tidy (uploads are never visible half-written; a bucket
lifecycle rule that aborts incomplete multipart uploads cleans up after a crash mid-upload).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator

from hub.errors import BlobCorruptError, NotFoundError
from hub.objectstore.s3 import S3Bucket
from hub.registry.blobs import HASH_RE, check_hash, sha256_hex

BLOBS = "blobs/"
_SPOOL_IN_MEMORY = 8 * 1024 * 1024  # put_stream keeps this much in memory, the rest in a temp file


class S3BlobStore:
    """The registry's blobs as objects of `bucket` (see hub.registry.blobs.Blobs)."""

    def __init__(self, bucket: S3Bucket) -> None:
        self.bucket = bucket

    @staticmethod
    def name(digest: str) -> str:
        """The object's name under the prefix: blobs/<first two hex digits>/<sha256>."""
        check_hash(digest)
        return f"{BLOBS}{digest[:2]}/{digest}"

    def describe(self, digest: str) -> str:
        return self.bucket.location.describe(self.name(digest))

    def exists(self, digest: str) -> bool:
        return self.bucket.exists(self.name(digest))

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        if not self.exists(digest):
            self.bucket.put(self.name(digest), data)
        return digest

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenation of `chunks`; (sha256, size). The name is known only at the
        end, so the bytes are spooled (memory, then a temp file) and uploaded in parts."""
        digest = hashlib.sha256()
        size = 0
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            hexdigest = digest.hexdigest()
            if not self.exists(hexdigest):
                spool.seek(0)
                self.bucket.put(self.name(hexdigest), spool)
        return hexdigest, size

    def stream(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in chunks, unverified (the reader hashes them if it must)."""
        try:
            return self.bucket.stream(self.name(digest))
        except NotFoundError:
            raise NotFoundError(f"blob {digest} is not in the blob store ({self.describe(digest)})") from None

    def read(self, digest: str, *, verify: bool = True) -> bytes:
        data = b"".join(self.stream(digest))
        if verify and (actual := sha256_hex(data)) != digest:
            raise BlobCorruptError(
                f"blob {digest} is corrupt: {self.describe(digest)} hashes to {actual}; restore it "
                "from a backup or push the version again"
            )
        return data

    def delete(self, digest: str) -> bool:
        if not self.exists(digest):
            return False
        self.bucket.delete(self.name(digest))
        return True

    def take(self, digest: str) -> str | None:
        """The blob's name if it is there (deleted by `purge`, after the caller's commit)."""
        return self.name(digest) if self.exists(digest) else None

    def restore(self, digest: str, held: str) -> None:
        """Nothing to do: `take` did not remove anything."""

    def purge(self, held: str) -> None:
        self.bucket.delete(held)

    def hashes(self) -> list[str]:
        found = []
        for name in self.bucket.names(BLOBS):
            shard, _, digest = name.removeprefix(BLOBS).partition("/")
            if HASH_RE.fullmatch(digest) and digest.startswith(shard):
                found.append(digest)
        return sorted(found)

    def sweep(self) -> int:
        return 0
