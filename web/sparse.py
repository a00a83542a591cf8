"""The sparse upload of a raw disk: only its data travels, and it is converted as it comes.

A raw disk is mostly holes (a 4 GiB cloud disk holds about 1 GiB): sent as a plain body,
every hole travels as zeros. A sparse body (``Content-Type: application/x-virtfleet-sparse``,
the disk's size in the ``virtual_size`` query parameter; the precedents: ``virsh vol-upload
--sparse``, oVirt imageio's zero ranges) is a sequence of frames, each an 8-byte big-endian
offset, an 8-byte big-endian length and that many bytes of the disk from that offset. What
no frame covers reads as zeros. Frames come in increasing order, never overlap, are never
empty, and stay inside the disk.

Owns reading and checking such a body (every fault a 4xx with a message that names no
path on the controller; nothing kept of a refused upload), the header check of the disk's
first bytes (web.imports.inspect_header: a "raw" disk that is really a qcow2, VMDK, ... is
refused before anything is written; bytes no frame covers are zeros), and handing the data
to the conversion that runs while the rest arrives (scheduler/streamconvert.py, which runs
qemu-img through worker.images). What is stored in ``imports/<id>`` is the qcow2 of the disk:
the image job hashes, checks, syncs and publishes it.

Must not: run qemu-img itself, read the body whole into memory, or show a controller path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from fleet.exceptions import BadRequest, VirtfleetError
from fleet.imageclient import FRAME, SPARSE_CONTENT_TYPE
from fleet.proc import ProcError
from scheduler.streamconvert import StreamConversion
from web.imports import (
    HEADER_BYTES,
    ImageRefused,
    ImageTooLarge,
    Limits,
    StoredFile,
    inspect_header,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = SPARSE_CONTENT_TYPE
"""The media type of a sparse body (its wire format is fleet.imageclient's: the client
that sends it)."""


class SparseRefused(BadRequest):
    """The sparse body breaks the protocol (answered 400)."""


class ConversionFailed(VirtfleetError):
    """qemu-img could not convert the disk as it came (answered 500; the log says why)."""

    http_status = 500


def frames(chunks: Iterable[bytes], virtual_size: int) -> Iterator[tuple[int, memoryview]]:
    """The data of a sparse body as (offset in the disk, bytes) pieces, in order, checked:
    each frame after the end of the one before, not empty, inside `virtual_size`; the body
    must end on a frame's end. Pieces are views of the chunks (no copy)."""
    head = bytearray()
    left = at = end = 0
    for chunk in chunks:
        view = memoryview(chunk)
        i, n = 0, len(view)
        while i < n:
            if not left:
                take = view[i:i + FRAME.size - len(head)]
                head += take
                i += len(take)
                if len(head) < FRAME.size:
                    break
                offset, length = FRAME.unpack(head)
                head.clear()
                _check_frame(offset, length, end, virtual_size)
                at, left, end = offset, length, offset + length
                continue
            take = min(left, n - i)
            yield at, view[i:i + take]
            at, left, i = at + take, left - take, i + take
    if head or left:
        raise SparseRefused("the sparse body ends inside a frame")


def _check_frame(offset: int, length: int, end: int, virtual_size: int) -> None:
    if not length:
        raise SparseRefused(f"the frame at offset {offset} is empty")
    if offset < end:
        raise SparseRefused(f"the frame at offset {offset} starts before the end of the one "
                            f"before ({end}): frames must be in order and not overlap")
    if offset + length > virtual_size:
        raise SparseRefused(f"the frame at offset {offset} ({length} bytes) goes past the "
                            f"disk's virtual size ({virtual_size} bytes)")


def check_virtual_size(virtual_size: int, limits: Limits) -> None:
    """A sparse upload's declared size, before a byte of the body is read."""
    if virtual_size <= 0:
        raise SparseRefused("virtual_size must be a positive number of bytes")
    if virtual_size > limits.max_virtual_bytes:
        raise ImageRefused(f"the image's virtual size ({virtual_size} bytes) is above the "
                           f"limit of {limits.max_virtual_bytes} bytes")


def store_sparse(chunks: Iterable[bytes], dest: Path, limits: Limits, virtual_size: int,
                 declared: str | None = None) -> StoredFile:
    """Read a sparse body, check it and its header, and store the qcow2 of the disk at
    `dest` (atomically). Data above max_image_bytes is 413; any other fault 400/422;
    a failed conversion 500. Nothing is left of a refused or failed upload."""
    check_virtual_size(virtual_size, limits)
    if declared not in (None, "raw"):
        raise ImageRefused("a sparse body is a raw disk: send a qcow2 image as "
                           "application/octet-stream")
    pieces = frames(chunks, virtual_size)
    held, head = _header(pieces, min(HEADER_BYTES, virtual_size))
    inspect_header(head, virtual_size, limits.max_virtual_bytes, "raw")
    data = 0
    try:
        with StreamConversion(dest.parent, dest.name, virtual_size) as conv:
            for offset, piece in _chain(held, pieces):
                data += len(piece)
                if data > limits.max_bytes:
                    raise ImageTooLarge(f"the image's data is larger than the limit of "
                                        f"{limits.max_bytes} bytes")
                conv.write(offset, piece)
            qcow2 = conv.finish()
            qcow2.replace(dest)
    except ProcError as exc:
        log.warning("a sparse upload could not be converted: %s", exc)
        raise ConversionFailed("the disk could not be converted to qcow2") from None
    log.info("sparse upload %s: %d bytes of data, qemu-img %.3fs, %.3fs after the last byte",
             dest.name, data, conv.convert_s, conv.tail_s)
    return StoredFile(dest, "", dest.stat().st_size, "qcow2", conv.size, original_format="raw")


def _header(pieces: Iterator[tuple[int, memoryview]],
            size: int) -> tuple[list[tuple[int, memoryview]], bytes]:
    """The disk's first `size` bytes (zeros where no frame is) and the pieces read to know
    them (at most `size` bytes of data, and one piece past them)."""
    head = bytearray(size)
    held: list[tuple[int, memoryview]] = []
    for offset, piece in pieces:
        held.append((offset, piece))
        if offset < size:
            part = piece[:size - offset]
            head[offset:offset + len(part)] = part
        if offset + len(piece) >= size:
            break
    return held, bytes(head)


def _chain(held: list[tuple[int, memoryview]],
           rest: Iterator[tuple[int, memoryview]]) -> Iterator[tuple[int, memoryview]]:
    yield from held
    held.clear()
    yield from rest
