"""Where the hub keeps package blobs and publishes its TUF repository.

    blobs = blob_store(settings)          # DATA/blobs, or the bucket (blob_store = "s3")
    publisher = tuf_publisher(settings)   # None, or the bucket (tuf_publish = "s3")
    repo = signed_repository(settings, engine=db.engine)
                                          # the TUF repository: DATA/tuf, published to the
                                          # bucket, or kept there (tuf_state = "s3")

The filesystem is the default and needs nothing more. An S3-compatible store (AWS S3, MinIO,
Ceph RGW, ...) needs boto3 (`pip install 'outpost[s3]'`); `s3` is the only module that imports
it, and only when the settings ask for the bucket, so a hub without boto3 runs on the
filesystem. Errors: `hub.errors.ObjectStoreError` (unreachable, refused), `SettingsError` for
settings the hub cannot use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.registry.blobs import Blobs, BlobStore
from hub.settings import HubSettings, SettingsError
from hub.signing import KeyStore, SignedRepository
from hub.signing.lock import AdvisoryLock, SigningLock
from hub.signing.mirror import Mirror
from hub.signing.publish import TUF, Publisher

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from hub.objectstore.s3 import S3Bucket

__all__ = ["blob_store", "bucket", "signed_repository", "tuf_publisher"]


def bucket(settings: HubSettings) -> S3Bucket:
    """The settings' bucket (s3_bucket, s3_prefix, s3_endpoint_url, s3_region)."""
    try:
        from hub.objectstore.s3 import S3Bucket
    except ImportError as exc:
        raise SettingsError(
            f'blob_store or tuf_publish = "s3" needs boto3 ({exc}): pip install "outpost[s3]"'
        ) from exc
    return S3Bucket(settings.s3_location())


def blob_store(settings: HubSettings, shared: S3Bucket | None = None) -> Blobs:
    if settings.blob_store != "s3":
        return BlobStore(settings.blobs_dir)
    from hub.registry.s3blobs import S3BlobStore

    return S3BlobStore(shared if shared is not None else bucket(settings))


def tuf_publisher(settings: HubSettings, shared: S3Bucket | None = None) -> Publisher | None:
    if settings.tuf_publish != "s3":
        return None
    return Publisher(shared if shared is not None else bucket(settings))


def signed_repository(
    settings: HubSettings, shared: S3Bucket | None = None, engine: Engine | None = None
) -> SignedRepository:
    """The hub's TUF repository as the settings want it: DATA/tuf alone, published to the bucket
    (tuf_publish = "s3"), or kept in the bucket (tuf_state = "s3": a copy in DATA/tuf, pulled
    before every change). In the last case, with `engine` on PostgreSQL, changes take an
    advisory lock there, so hosts sharing the database sign one at a time (hub.signing.lock);
    on SQLite (one host) the directory's flock does."""
    keys = KeyStore(settings.online_keys, settings.offline_keys)
    if settings.tuf_state != "s3":
        return SignedRepository(
            settings.tuf_dir, keys, settings.expiry_policy(), publisher=tuf_publisher(settings, shared)
        )
    store = shared if shared is not None else bucket(settings)
    lock: SigningLock | None = None
    if engine is not None and engine.dialect.name == "postgresql":
        # Named by bucket and prefix only (not the endpoint, which hosts may spell differently):
        # every host signing into this repository takes the same lock.
        where = settings.s3_location()
        lock = AdvisoryLock(engine, f"s3://{where.bucket}/{where.prefix}{TUF}", settings.tuf_dir / ".lock")
    return SignedRepository(
        settings.tuf_dir,
        keys,
        settings.expiry_policy(),
        publisher=Publisher(store),
        mirror=Mirror(store),
        lock=lock,
    )
