"""hub.api.upload reads a package from its bytes or from the file the API spools it to."""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

import pytest

from hub.api.upload import read_package_tar
from hub.errors import PackageRejected, PackageTooLarge
from tests.support.packages import affine_package


def archive(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("manifest.json", "model.onnx"):
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


def spooled(data: bytes, in_memory: int) -> tempfile.SpooledTemporaryFile[bytes]:
    spool = tempfile.SpooledTemporaryFile(max_size=in_memory)  # noqa: SIM115 (the callers close it)
    spool.write(data)  # left at the end, as the API leaves it
    return spool


@pytest.mark.parametrize("in_memory", [1 << 20, 16], ids=["spool-in-memory", "spool-on-disk"])
def test_a_spooled_upload_reads_as_its_bytes(tmp_path: Path, in_memory: int) -> None:
    data = archive(affine_package(tmp_path / "affine"))
    with spooled(data, in_memory) as spool:
        assert read_package_tar(spool, 1 << 24) == read_package_tar(data, 1 << 24)


def test_a_spooled_upload_over_the_limit(tmp_path: Path) -> None:
    data = archive(affine_package(tmp_path / "affine"))
    with spooled(data, 16) as spool, pytest.raises(PackageTooLarge, match=f"is {len(data)} bytes"):
        read_package_tar(spool, len(data) - 1)


def test_a_spooled_upload_that_is_no_tar() -> None:
    with spooled(b"not a tar" * 100, 16) as spool, pytest.raises(PackageRejected, match="not a package"):
        read_package_tar(spool, 1 << 24)
