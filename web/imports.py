"""The web's half of an image import: bytes in, format pinned from the header, nothing run.

Owns streaming an image into `<state_dir>/imports/<image id>` — an upload's body, an http(s)
URL fetched through fleet.download (http(s) only; loopback, link-local and metadata addresses
refused, every redirect checked again), or, for admins, a path on the controller — in chunks,
never whole in memory, size-limited; and the header check, made on the first bytes before
anything is written, that decides the format once (qcow2 magic: qcow2; anything else: raw)
and refuses at once (422) what must never reach qemu-img: qcow2 with a backing file, an
external data file or encryption; VMDK, VHD(X), VDI, QED and other formats that may name
other files; a virtual size above `max_virtual_bytes`.

Must not: run qemu-img (scheduler/imagejobs.py inspects and converts the stored file, always
with the pinned format), keep any part of a refused file, or show a controller path.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fleet import download
from fleet.exceptions import BadRequest

CHUNK = 1024 * 1024
"""Bytes read and written at a time."""

HEADER_BYTES = 512
"""How much of the start of a file the header check reads before anything is stored."""

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_V2_HEADER = 72
QCOW2_V3_HEADER = 104
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_KNOWN = 0b11111
"""dirty, corrupt, external data file, compression type, extended L2."""

REFUSED_MAGICS: dict[bytes, str] = {
    b"KDMV": "VMDK", b"COWD": "VMDK", b"# Disk Descriptor": "VMDK descriptor",
    b"vhdxfile": "VHDX", b"conectix": "VHD", b"QED\x00": "QED", b"LUKS\xba\xbe": "LUKS",
    b"Bochs Virtual HD Image": "Bochs", b"WithoutFreeSpace": "Parallels",
    b"WithouFreSpacExt": "Parallels", b"#!/bin/sh\n#V2.0 Format": "cloop",
}
"""Formats refused by their first bytes (they may name other files, or are not disks)."""

VDI_SIGNATURE = (64, b"\x7f\x10\xda\xbe")
"""VDI's signature sits at offset 64."""

DISK_FORMATS = ("qcow2", "raw")
"""What an import may be: qcow2 stays as it is, raw is converted to qcow2 by the control
plane."""


class ImageRefused(BadRequest):
    """The file is not an image virtfleet accepts (answered 422)."""

    http_status = 422


class ImageTooLarge(ImageRefused):
    """The file is larger than max_image_bytes (answered 413)."""

    http_status = 413


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    """max_image_bytes: the largest file accepted."""
    max_virtual_bytes: int
    """max_virtual_bytes: the largest disk an image may describe."""


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    """sha256 of the stored bytes for qcow2 (they are what hosts will download); empty for
    raw, whose content address is that of the qcow2 the control plane converts it to."""
    size_bytes: int
    disk_format: str
    """Decided from the header and pinned: every later qemu-img call names it."""
    virtual_size_bytes: int


def inspect_header(head: bytes, file_size: int | None, max_virtual_bytes: int,
                   declared: str | None = None) -> tuple[str, int]:
    """(format, virtual size) from the first bytes of a file; refuses unsafe formats.

    `file_size` is None while the rest of a raw file is still coming (its virtual size is
    then checked as it grows). `declared`, when the client named a format, must agree.
    """
    if head.startswith(QCOW2_MAGIC):
        fmt, size = "qcow2", _qcow2_header(head, max_virtual_bytes)
    else:
        for magic, name in REFUSED_MAGICS.items():
            if head.startswith(magic):
                raise ImageRefused(f"{name} images are refused: use qcow2 or raw")
        off, sig = VDI_SIGNATURE
        if head[off:off + len(sig)] == sig:
            raise ImageRefused("VDI images are refused: use qcow2 or raw")
        fmt, size = "raw", file_size or len(head)
        if size > max_virtual_bytes:
            raise _too_big_virtual(size, max_virtual_bytes)
    if declared is not None and declared != fmt:
        raise ImageRefused(f"the file is a {fmt} image, not {declared} as declared")
    return fmt, size


def _too_big_virtual(size: int, limit: int) -> ImageRefused:
    return ImageRefused(f"the image's virtual size ({size} bytes) is above the limit of "
                        f"{limit} bytes")


def _qcow2_header(head: bytes, max_virtual_bytes: int) -> int:
    if len(head) < QCOW2_V2_HEADER:
        raise ImageRefused("the qcow2 header is truncated")
    version, backing_off, backing_len = struct.unpack(">IQI", head[4:20])
    if version not in (2, 3):
        raise ImageRefused(f"qcow2 version {version} is not supported")
    if version == 3 and len(head) < QCOW2_V3_HEADER:
        raise ImageRefused("the qcow2 header is truncated")
    if backing_off or backing_len:
        raise ImageRefused("qcow2 images with a backing file are refused")
    size = struct.unpack(">Q", head[24:32])[0]
    crypt = struct.unpack(">I", head[32:36])[0]
    if crypt:
        raise ImageRefused("encrypted qcow2 images are refused")
    if version == 3:
        incompat = struct.unpack(">Q", head[72:80])[0]
        if incompat & QCOW2_INCOMPAT_DATA_FILE:
            raise ImageRefused("qcow2 images with an external data file are refused")
        if incompat & QCOW2_INCOMPAT_CORRUPT:
            raise ImageRefused("the qcow2 image is marked corrupt")
        if incompat & ~QCOW2_INCOMPAT_KNOWN:
            raise ImageRefused("the qcow2 image uses features virtfleet does not know")
    if size == 0:
        raise ImageRefused("the qcow2 image has no virtual size")
    if size > max_virtual_bytes:
        raise _too_big_virtual(size, max_virtual_bytes)
    return size


def _header_and_rest(chunks: Iterator[bytes]) -> tuple[bytes, list[bytes], bool]:
    """Read until HEADER_BYTES are in hand (or the end): the header, the chunks read, and
    whether that was the end already."""
    held: list[bytes] = []
    have = 0
    for chunk in chunks:
        if chunk:
            held.append(chunk)
            have += len(chunk)
        if have >= HEADER_BYTES:
            return b"".join(held)[:HEADER_BYTES], held, False
    return b"".join(held), held, True


def store_stream(chunks: Iterable[bytes], dest: Path, limits: Limits,
                 declared: str | None = None) -> StoredFile:
    """Write `chunks` to `dest` (atomically: a hidden temporary file renamed at the end).

    The header is judged before a byte is written, so a refused file never touches the
    disk; the size (and a raw file's virtual size, its size) is checked as it grows.
    """
    it = iter(chunks)
    try:
        head, held, ended = _header_and_rest(it)
        if not head:
            raise ImageRefused("the image is empty")
        fmt, vsize = inspect_header(head, len(head) if ended else None,
                                    limits.max_virtual_bytes, declared)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256() if fmt == "qcow2" else None
            size = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in _chain(held, it):
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise ImageTooLarge(f"the image is larger than the limit of "
                                            f"{limits.max_bytes} bytes")
                    if fmt == "raw" and size > limits.max_virtual_bytes:
                        raise _too_big_virtual(size, limits.max_virtual_bytes)
                    if digest is not None:
                        digest.update(chunk)
                    out.write(chunk)
            os.chmod(tmp, 0o640)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a download generator closes its connection
    return StoredFile(dest, digest.hexdigest() if digest else "", size, fmt,
                      vsize if fmt == "qcow2" else size)


def _chain(held: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from held
    held.clear()
    for chunk in rest:
        if chunk:
            yield chunk


def read_stream(stream: IO[bytes]) -> Iterator[bytes]:
    """A request body (or any file object) in chunks of at most CHUNK bytes."""
    while chunk := stream.read(CHUNK):
        yield chunk


def _local(path: str) -> Iterator[bytes]:
    p = Path(path)
    if not p.is_absolute():
        raise BadRequest("a local image source must be an absolute path")
    try:
        fh = p.open("rb")
    except OSError:
        raise BadRequest("the local image source cannot be read") from None
    with fh:
        yield from read_stream(fh)


def source_chunks(source: str, allow_local: bool) -> Iterator[bytes]:
    """The bytes of an image source: an http(s) URL (public addresses only), or an absolute
    path on the controller (admins only). Raises BadRequest with a message safe to show."""
    if source.lower().startswith(("http://", "https://")):
        return download.stream(source)
    if "://" in source or source.lower().startswith("file:"):
        raise BadRequest("image URLs must be http:// or https://")
    if not allow_local:
        raise BadRequest("only admins may import from a path on the controller")
    return _local(source)
