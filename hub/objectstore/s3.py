"""A thin adapter over boto3's S3 client: the few calls the hub makes, with its own errors.

Works with AWS S3 and S3-compatible servers (MinIO, Ceph RGW, moto's server in the tests):
with an `endpoint_url` the client uses path-style addressing, which they all understand.
Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE and ~/.aws, an instance or task role): never from the hub's settings, so no key
is ever written to hub.toml or a repository.

Every failure of boto3 or botocore is mapped to `hub.errors.ObjectStoreError`, naming the
bucket and key; a missing key on `get` is `NotFoundError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from hub.errors import NotFoundError, ObjectStoreError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Objects above this size go up in parts of this size (S3's minimum part is 5 MiB), several
# at once; a large package never has to fit in one request.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
UPLOAD_THREADS = 4
READ_CHUNK = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 4  # botocore's standard retry mode: throttling and 5xx answers are retried
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


@dataclass(frozen=True)
class S3Location:
    """Where the hub's objects live: a bucket, a key prefix, and how to reach the server."""

    bucket: str
    prefix: str = ""  # "" or ending in "/": every key the hub writes starts with it
    endpoint_url: str = ""  # empty: AWS S3 itself
    region: str = ""  # empty: boto3's default (AWS_DEFAULT_REGION, the profile)

    def key(self, name: str) -> str:
        return self.prefix + name

    def describe(self, name: str = "") -> str:
        where = f"s3://{self.bucket}/{self.prefix}{name}"
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where


class S3Bucket:
    """The objects of one bucket under one prefix; names are relative to the prefix."""

    def __init__(self, location: S3Location, client: S3Client | None = None) -> None:
        self.location = location
        self._client = client if client is not None else _client(location)
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=UPLOAD_THREADS,
        )

    def check(self) -> None:
        """Raise ObjectStoreError unless the bucket answers (for a clear error at start-up)."""
        try:
            self._client.head_bucket(Bucket=self.location.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("reach the bucket", "", exc) from exc

    def exists(self, name: str) -> bool:
        return self.etag(name) is not None

    def etag(self, name: str) -> str | None:
        """The object's ETag without quotes (one HEAD request), None if there is no such object."""
        try:
            head = self._client.head_object(Bucket=self.location.bucket, Key=self.location.key(name))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise self._error("look up", name, exc) from exc
        except BotoCoreError as exc:
            raise self._error("look up", name, exc) from exc
        return str(head.get("ETag", "")).strip('"')

    def put(
        self,
        name: str,
        body: bytes | IO[bytes],
        *,
        content_type: str = "application/octet-stream",
        cache_control: str = "",
    ) -> None:
        """Write one object (in parts above MULTIPART_THRESHOLD); readers see all of it or none."""
        extra: dict[str, Any] = {"ContentType": content_type}
        if cache_control:
            extra["CacheControl"] = cache_control
        fileobj = io.BytesIO(body) if isinstance(body, bytes) else body
        try:
            self._client.upload_fileobj(
                fileobj, self.location.bucket, self.location.key(name), ExtraArgs=extra, Config=self._transfer
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("write", name, exc) from exc

    def get(self, name: str) -> bytes:
        return b"".join(self.stream(name))

    def stream(self, name: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks; NotFoundError (raised at once) if there is none."""
        try:
            body = self._client.get_object(Bucket=self.location.bucket, Key=self.location.key(name))["Body"]
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise NotFoundError(f"{self.location.describe(name)} does not exist") from None
            raise self._error("read", name, exc) from exc
        except BotoCoreError as exc:
            raise self._error("read", name, exc) from exc
        return self._chunks(name, body, chunk_size)

    def _chunks(self, name: str, body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("read", name, exc) from exc
        finally:
            body.close()

    def delete(self, name: str) -> None:
        """Remove an object; deleting one that is not there is not an error (S3's semantics)."""
        try:
            self._client.delete_object(Bucket=self.location.bucket, Key=self.location.key(name))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", name, exc) from exc

    def names(self, under: str = "") -> Iterator[str]:
        """Every object name (relative to the prefix) that starts with `under`."""
        return (name for name, _ in self.listing(under))

    def listing(self, under: str = "") -> Iterator[tuple[str, str]]:
        """(name, ETag without quotes) of every object whose name starts with `under`. For an
        object uploaded in one part and not encrypted with KMS, the ETag is its MD5."""
        paginator = self._client.get_paginator("list_objects_v2")
        start = len(self.location.prefix)
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.key(under)):
                for item in page.get("Contents", []):
                    yield item["Key"][start:], item.get("ETag", "").strip('"')
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", under, exc) from exc

    def _error(self, doing: str, name: str, exc: Exception) -> ObjectStoreError:
        return ObjectStoreError(
            f"cannot {doing} {self.location.describe(name)}: {exc}; check s3_bucket, s3_endpoint_url and "
            "s3_region in hub.toml and the credentials in the hub's environment (boto3's standard chain)"
        )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client(location: S3Location) -> S3Client:
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        # S3-compatible servers are addressed by path (http://host:port/bucket/key); AWS by name.
        s3={"addressing_style": "path" if location.endpoint_url else "auto"},
    )
    try:
        session = boto3.session.Session(region_name=location.region or None)
        client: S3Client = session.client("s3", endpoint_url=location.endpoint_url or None, config=config)
    except BotoCoreError as exc:
        raise ObjectStoreError(f"cannot set up the S3 client for {location.describe()}: {exc}") from exc
    return client
