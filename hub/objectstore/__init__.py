"""Where the hub keeps package blobs and publishes its TUF repository.

    blobs = blob_store(settings)          # DATA/blobs, or the bucket (blob_store = "s3")
    publisher = tuf_publisher(settings)   # None, or the bucket (tuf_publish = "s3")

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
from hub.signing.publish import Publisher

if TYPE_CHECKING:
    from hub.objectstore.s3 import S3Bucket

__all__ = ["blob_store", "bucket", "tuf_publisher"]


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
