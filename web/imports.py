"""Bringing image files into the controller's content-addressed store (sha256 names).

Owns the import (fetched through fleet.download: http(s) only, loopback and link-local
addresses refused, every redirect checked again; size-limited) and the format check by header: qcow2
with a backing file or an external data file, and formats that reference other files, are
refused. The web never runs qemu-img; hosts convert raw images to qcow2 themselves.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fleet import download
from fleet.exceptions import BadRequest

CHUNK = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
REFUSED_MAGICS = {b"KDMV": "vmdk", b"# Di": "vmdk descriptor", b"vhdx": "vhdx",
                  b"conectix": "vpc"}


class ImageRefused(BadRequest):
    """The file is not an image virtfleet accepts (answered 422)."""

    http_status = 422


@dataclass(frozen=True)
class ImportedFile:
    path: Path
    sha256: str
    size_bytes: int
    disk_format: str
    virtual_size_bytes: int


def inspect_header(head: bytes, file_size: int) -> tuple[str, int]:
    """(format, virtual size) from the first bytes of a file; refuses unsafe formats."""
    if head.startswith(QCOW2_MAGIC):
        if len(head) < 72:
            raise ImageRefused("qcow2 header is truncated")
        version, backing_off = struct.unpack(">IQ", head[4:16])
        size = struct.unpack(">Q", head[24:32])[0]
        if backing_off:
            raise ImageRefused("qcow2 images with a backing file are refused")
        if version >= 3 and len(head) >= 80:
            incompat = struct.unpack(">Q", head[72:80])[0]
            if incompat & QCOW2_INCOMPAT_DATA_FILE:
                raise ImageRefused("qcow2 images with an external data file are refused")
        return "qcow2", size
    for magic, name in REFUSED_MAGICS.items():
        if head.startswith(magic):
            raise ImageRefused(f"{name} images are refused: use qcow2 or raw")
    return "raw", file_size


def _local(path: str) -> Iterator[bytes]:
    p = Path(path)
    if not p.is_absolute():
        raise BadRequest("a local image source must be an absolute path")
    try:
        fh = p.open("rb")
    except OSError:
        raise BadRequest("the local image source cannot be read") from None
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def store_stream(chunks: Iterable[bytes], images_dir: Path, max_bytes: int) -> ImportedFile:
    """Write chunks into the store under their sha256, checking the header on the way."""
    images_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    head = b""
    fd, tmp = tempfile.mkstemp(dir=images_dir, prefix=".import-")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise ImageRefused(f"the image is larger than the limit of {max_bytes} bytes")
                if len(head) < 512:
                    head += chunk[:512 - len(head)]
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise ImageRefused("the image is empty")
        fmt, vsize = inspect_header(head, size)
        final = images_dir / digest.hexdigest()
        if final.exists():
            os.unlink(tmp)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        return ImportedFile(final, digest.hexdigest(), size, fmt, vsize)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def import_source(source: str, images_dir: Path, max_bytes: int,
                  allow_local: bool) -> ImportedFile:
    if source.startswith(("http://", "https://")):
        return store_stream(download.stream(source), images_dir, max_bytes)
    if "://" in source:
        raise BadRequest("image URLs must be http:// or https://")
    if not allow_local:
        raise BadRequest("only admins may import from a path on the controller")
    return store_stream(_local(source), images_dir, max_bytes)

