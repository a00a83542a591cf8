"""The web's half of an image import: bytes in, format pinned from the header, nothing run.

Owns streaming an image into `<state_dir>/imports/<image id>` — an upload's body (read from
the WSGI input as the server hands it over: no form parsing, no extra copy), an http(s) URL
fetched through fleet.download (http(s) only; loopback, link-local and metadata addresses
refused, every redirect checked again), or, for admins, a path on the controller (its holes
are not read) — in chunks, never whole in memory, size-limited, all-zero blocks left as holes
(the same bytes, read back, for a fraction of the writes: a disk image is mostly empty); and
the header check, made on the first bytes before anything is written, that decides the format
once (qcow2 magic: qcow2; anything else: raw) and refuses at once (422) what must never reach
qemu-img: qcow2 with a backing file, an external data file or encryption; VMDK, VHD(X), VDI,
QED and other formats that may name other files; a virtual size above `max_virtual_bytes`.

Must not: run qemu-img (scheduler/imagejobs.py inspects and converts the stored file, always
with the pinned format), keep any part of a refused file, or show a controller path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from werkzeug.wsgi import get_input_stream

from fleet import download
from fleet.exceptions import BadRequest

CHUNK = 512 * 1024
"""Bytes read at a time (at most). Not more: gunicorn's body reader copies every piece a few
times, and asked for 1 MiB at a time it took three to four times the CPU it takes at 512 KiB
(0.9-1.3 against 0.3 s per GiB, the reader alone on the test machine)."""

SPARSE_BLOCK = 64 * 1024
"""All-zero blocks of this size (aligned in the file) are not written: they stay holes."""

_ZERO_CHUNK = bytes(CHUNK)
_ZERO_BLOCK = bytes(SPARSE_BLOCK)

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
    All-zero blocks are left as holes (:class:`SparseWriter`): the file reads back the same.
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
            try:
                out = SparseWriter(fd)
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
                out.finish()
                os.fchmod(fd, 0o640)
            finally:
                os.close(fd)
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


def data_runs(chunk: bytes, end: int | None = None) -> list[tuple[int, int]]:
    """The (start, stop) positions in ``chunk[:end]`` (which starts on a SPARSE_BLOCK
    boundary of its file) of what is not made of all-zero SPARSE_BLOCKs; a last block cut
    short is data. `bytes.startswith` compares in place (memcmp, no copy): a block of data
    fails on its first bytes, a zero block costs one memcmp."""
    n = len(chunk) if end is None else end
    if n == len(chunk) == CHUNK and chunk == _ZERO_CHUNK:
        return []
    runs: list[tuple[int, int]] = []
    start = -1
    for pos in range(0, n, SPARSE_BLOCK):
        zero = pos + SPARSE_BLOCK <= n and chunk.startswith(_ZERO_BLOCK, pos)
        if zero and start >= 0:
            runs.append((start, pos))
            start = -1
        elif not zero and start < 0:
            start = pos
    if start >= 0:
        runs.append((start, n))
    return runs


class SparseWriter:
    """Writes a stream of chunks to a new file, leaving its all-zero SPARSE_BLOCKs (aligned
    in the file) as holes. Chunks may come in any size: what does not fill a last block is
    kept for the next chunk (a copy of less than a block; none when chunks are multiples of
    the block, as request bodies and downloads are here)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        """Where the next block starts (a multiple of SPARSE_BLOCK)."""
        self.carry = b""

    def write(self, chunk: bytes) -> None:
        if self.carry:
            chunk = self.carry + chunk
        whole = len(chunk) - len(chunk) % SPARSE_BLOCK
        self.carry = chunk[whole:]
        self._write(chunk, whole)

    def finish(self) -> None:
        """Write what is left and give the file its full size (the holes at its end)."""
        size = self.offset + len(self.carry)
        if self.carry.count(0) != len(self.carry):
            self._write(self.carry, len(self.carry))
        self.carry = b""
        os.ftruncate(self.fd, size)

    def _write(self, chunk: bytes, end: int) -> None:
        view = memoryview(chunk)
        for start, stop in data_runs(chunk, end):
            part, at = view[start:stop], self.offset + start
            while part:
                written = os.pwrite(self.fd, part, at)
                part, at = part[written:], at + written
        self.offset += end


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


def request_body(environ: dict[str, Any]) -> Iterator[bytes]:
    """The body of the request in `environ`, in chunks of at most CHUNK bytes.

    A server that ends the input itself at the end of the body (gunicorn: WSGI's
    `wsgi.input_terminated`) is read directly, without werkzeug's limiting wrapper and its
    copy of every chunk; otherwise the input is limited to the declared Content-Length (no
    length: an empty body). The caller enforces its own size limit as the chunks come.
    """
    return read_stream(get_input_stream(environ, max_content_length=None))


def _local(path: str) -> Iterator[bytes]:
    p = Path(path)
    if not p.is_absolute():
        raise BadRequest("a local image source must be an absolute path")
    try:
        fh = p.open("rb", buffering=0)
    except OSError:
        raise BadRequest("the local image source cannot be read") from None
    with fh:
        yield from _sparse_read(fh)


def _sparse_read(fh: Any) -> Iterator[bytes]:
    """A local file in chunks of at most CHUNK bytes, its holes given as zeros without
    reading them (SEEK_DATA/SEEK_HOLE; where the file system has neither, all is read)."""
    fd = fh.fileno()
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:  # ENXIO: nothing but a hole up to the end
            data = size if exc.errno == errno.ENXIO else pos
        data = min(data, size)
        while pos < data:  # a hole: zeros, not read
            n = min(CHUNK, data - pos)
            yield _ZERO_CHUNK if n == CHUNK else bytes(n)
            pos += n
        if pos >= size:
            break
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        os.lseek(fd, pos, os.SEEK_SET)
        while pos < hole:
            chunk = fh.read(min(CHUNK, hole - pos))
            if not chunk:
                return  # the file shrank meanwhile
            yield chunk
            pos += len(chunk)


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
