"""Reading an uploaded package: a tar archive holding manifest.json and the model it names.

Pure apart from reading the bytes or the file given: no files are written. Only regular members are
looked at, by base name, and every size is bounded before anything is read.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import IO, cast

from agent.package.manifest import MANIFEST_FILE
from hub.errors import PackageRejected, PackageTooLarge


@dataclass(frozen=True)
class Upload:
    manifest: bytes
    model: bytes
    # The files of the hardware variants the manifest lists (hub.registry.variants), by name.
    files: dict[str, bytes] = field(default_factory=dict)


def _variant_file_names(manifest: bytes) -> list[str]:
    """The file names the manifest's `variants` list; checked properly by the registry."""
    try:
        items = json.loads(manifest).get("variants", [])
    except (ValueError, AttributeError):
        return []
    names = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            names += [n for k in ("manifest", "model") if isinstance(n := item.get(k), str)]
    return names


def read_package_tar(data: bytes | IO[bytes], max_bytes: int) -> Upload:
    """The package in `data`: the archive's bytes, or a seekable file holding them (the API
    spools an upload to a temporary file rather than keep the whole archive in memory)."""
    if isinstance(data, bytes):
        size, archive = len(data), cast(IO[bytes], io.BytesIO(data))
    else:
        archive = data
        size = archive.seek(0, io.SEEK_END)
        archive.seek(0)
    if size > max_bytes:
        raise PackageTooLarge(f"the upload is {size} bytes; the hub accepts at most {max_bytes}")
    try:
        with tarfile.open(fileobj=archive) as tar:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            manifest_member = members.get(MANIFEST_FILE)
            if manifest_member is None:
                raise PackageRejected("the package archive has no manifest.json")
            manifest_file = tar.extractfile(manifest_member)
            assert manifest_file is not None
            manifest = manifest_file.read()
            try:
                model_name = json.loads(manifest)["model"]["file"]
            except (ValueError, KeyError, TypeError):
                raise PackageRejected("manifest.json does not name its model file (model.file)") from None
            model_member = members.get(str(model_name))
            if model_member is None:
                raise PackageRejected(f"the package archive has no {model_name!r}, which its manifest names")
            model_file = tar.extractfile(model_member)
            assert model_file is not None
            files: dict[str, bytes] = {}
            for name in _variant_file_names(manifest):
                member = members.get(name)
                extracted = tar.extractfile(member) if member is not None else None
                if extracted is not None:
                    files[name] = extracted.read()
            return Upload(manifest, model_file.read(), files)
    except tarfile.TarError as exc:
        raise PackageRejected(
            f"the upload is not a package archive (tar of manifest.json and the model): {exc}"
        ) from exc
