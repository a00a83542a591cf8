"""The web's half of an image import: bytes in, format pinned from the header, nothing run.

Owns streaming an image into `<state_dir>/imports/<image id>` — an upload's body (under
gunicorn received straight from the socket into the chunks; elsewhere read from the WSGI
input as the server hands it over: no form parsing, no extra copy), an http(s) URL
fetched through fleet.download (http(s) only; loopback, link-local and metadata addresses
refused, every redirect checked again), or, for admins, a qcow2 file on the controller (its
holes are not read) — in chunks, never whole in memory, size-limited, all-zero blocks left as
holes (the same bytes, read back, for a fraction of the writes: a disk image is mostly empty),
a qcow2's sha256 computed on a thread of its own as the bytes go by, and the kernel told to
start writing each few MiB to disk as soon as they are in (the job's fsync then has little
left to wait for). An admin's *raw* file on the controller is not copied: `imports/<id>` is a
symbolic link to it, and the job converts it from there, read as raw (which follows nothing
the bytes say; the content address is the converted qcow2's anyway).

And the header check, made on the first bytes before anything is written, that decides the
format once (qcow2 magic: qcow2; anything else: raw) and refuses at once (422) what must never
reach qemu-img: qcow2 with a backing file, an external data file or encryption; VMDK, VHD(X),
VDI, QED and other formats that may name other files; a virtual size above
`max_virtual_bytes`.

Must not: run qemu-img (scheduler/imagejobs.py inspects and converts the stored file, always
with the pinned format), keep any part of a refused file, or show a controller path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from werkzeug.wsgi import get_input_stream

from fleet import download
from fleet.exceptions import BadRequest
from fleet.writeback import WritebackBehind

CHUNK = 512 * 1024
"""Bytes read at a time (at most). Not more: gunicorn's body reader copies every piece a few
times, and asked for 1 MiB at a time it took three to four times the CPU it takes at 512 KiB
(0.9-1.3 against 0.3 s per GiB, the reader alone on the test machine)."""

SPARSE_BLOCK = 64 * 1024
"""All-zero blocks of this size (aligned in the file) are not written: they stay holes."""

WRITEBACK_STEP = 8 * 1024 * 1024
"""Every this many bytes of the file, the kernel is asked to start writing them to disk
(sync_file_range, not waited for): the disk works while the rest comes in, instead of all of
it at the job's fsync (1 GiB: about 0.7 s of waiting on the test machine)."""

HASH_QUEUE = 8
"""Chunks (of at most CHUNK bytes) waiting for the hashing thread, at most."""

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
    """`imports/<id>`: the bytes, or (an admin's raw file) a symbolic link to them."""
    sha256: str
    """sha256 of the stored bytes for qcow2 (they are what hosts will download); empty for
    raw, whose content address is that of the qcow2 the control plane converts it to."""
    size_bytes: int
    disk_format: str
    """Decided from the header and pinned: every later qemu-img call names it."""
    virtual_size_bytes: int
    original_format: str = ""
    """What the client sent, when the stored file is already something else (a sparse raw
    upload, converted to qcow2 as it came: web/sparse.py); empty: `disk_format`."""


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
            size = 0
            digest: HashBehind | None = None
            out: SparseWriter | None = None
            try:
                digest = HashBehind() if fmt == "qcow2" else None
                out = SparseWriter(fd, writeback_step=WRITEBACK_STEP)
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
                sha = digest.hexdigest() if digest is not None else ""
            finally:
                if out is not None:
                    out.close()
                os.close(fd)
                if digest is not None:
                    digest.close()
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # a download generator closes its connection
    return StoredFile(dest, sha, size, fmt, vsize if fmt == "qcow2" else size)


class HashBehind:
    """sha256 of the chunks given to :meth:`update`, computed on a thread of its own.

    hashlib lets go of the GIL while it hashes a chunk, so the hash of one chunk runs on
    another CPU while the request's thread receives and writes the next: on the request's
    thread, hashing was 40 % of a qcow2 upload's CPU (0.65 s per GiB on the test machine).
    At most HASH_QUEUE chunks wait (bounded memory); chunks must not change once given
    (bytes do not)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=HASH_QUEUE)
        self._stop = False
        self._result = ""
        self._thread = threading.Thread(target=self._run, name="upload-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if not self._stop:
                self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        """The sha256 of everything given (waits for the thread to catch up)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self._result = self._digest.hexdigest()
        return self._result

    def close(self) -> None:
        """Stop the thread (what is still queued is dropped); safe to call again."""
        if self._thread.is_alive():
            self._stop = True
            self._queue.put(None)
            self._thread.join()


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
    the block, as request bodies and downloads are here). With `writeback_step`, each such
    step of the file is handed, as soon as it is written, to a thread that has the kernel
    start writing it to disk (:class:`WritebackBehind`). :meth:`close` once done with it."""

    def __init__(self, fd: int, writeback_step: int = 0) -> None:
        self.fd = fd
        self.offset = 0
        """Where the next block starts (a multiple of SPARSE_BLOCK)."""
        self.carry = b""
        self.writeback_step = writeback_step
        self.written_back = 0
        """Up to where writeback was asked for."""
        self._behind = WritebackBehind(fd) if writeback_step else None

    def write(self, chunk: bytes) -> None:
        if self.carry:
            chunk = self.carry + chunk
        whole = len(chunk) - len(chunk) % SPARSE_BLOCK
        self.carry = chunk[whole:]
        self._write(chunk, whole)
        if self._behind is not None and self.offset - self.written_back >= self.writeback_step:
            self._behind.start(self.written_back, self.offset - self.written_back)
            self.written_back = self.offset

    def finish(self) -> None:
        """Write what is left and give the file its full size (the holes at its end)."""
        size = self.offset + len(self.carry)
        if self.carry.count(0) != len(self.carry):
            self._write(self.carry, len(self.carry))
        self.carry = b""
        os.ftruncate(self.fd, size)
        if self._behind is not None:
            self._behind.start(self.written_back, size - self.written_back)
            self.written_back = size

    def close(self) -> None:
        """Wait for the writeback thread to be done with the file (before it is closed)."""
        if self._behind is not None:
            self._behind.close()


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

    Under gunicorn, a body of declared length is received straight from the connection's
    socket into the chunks (:func:`_socket_body`). Otherwise, a server that ends the input
    itself at the end of the body (WSGI's `wsgi.input_terminated`) is read directly,
    without werkzeug's limiting wrapper and its copy of every chunk; else the input is
    limited to the declared Content-Length (no length: an empty body). The caller enforces
    its own size limit as the chunks come.
    """
    direct = _socket_body(environ)
    if direct is not None:
        return direct
    return read_stream(get_input_stream(environ, max_content_length=None))


class BodyCutShort(BadRequest):
    """The client closed the connection before the end of its declared body."""


def _socket_body(environ: dict[str, Any]) -> Iterator[bytes] | None:
    """A gunicorn request body of declared length (``Content-Length``) as chunks received
    with recv_into straight from the socket: one copy per byte (the kernel's), where
    gunicorn's own reader receives pieces of at most 1 MiB and copies each through two
    BytesIO buffers and slices (about 0.3 s of CPU per GiB on an idle test machine, 1 s
    and more under load: more than the rest of an upload together). Only when the input
    is exactly what this expects (gunicorn's Body over a LengthReader over the socket's
    SocketUnreader, nothing read from it yet); None otherwise (the generic reader then).

    What gunicorn read ahead with the headers comes first; bytes past the body (a next
    request pipelined behind it) are given back to it. The reader's count of what is left
    is kept as the bytes come, so that gunicorn finds the body read, or closes the
    connection after a failure. A body left unread (the upload refused part way: too large,
    another format's header, a bad frame) also marks the connection failed when its chunks
    are closed: gunicorn then closes it rather than receive and drop the rest (gigabytes,
    for a disk image) before it serves the next request."""
    try:
        from gunicorn.http.body import Body, LengthReader
        from gunicorn.http.unreader import SocketUnreader
    except ImportError:
        return None
    body, sock = environ.get("wsgi.input"), environ.get("gunicorn.socket")
    reader = getattr(body, "reader", None)
    unreader = getattr(reader, "unreader", None)
    if not (type(body) is Body and type(reader) is LengthReader
            and type(unreader) is SocketUnreader and sock is not None
            and unreader.sock is sock and body.buf.tell() == 0
            and hasattr(unreader, "take_buffered") and hasattr(sock, "recv_into")):
        return None
    return _recv_body(body, reader, unreader, sock)


def _recv_body(body: Any, reader: Any, unreader: Any, sock: Any) -> Iterator[bytes]:
    try:
        yield from _recv_chunks(body, reader, unreader, sock)
    finally:
        if reader.length > 0:  # closed before the end: the rest is never read
            body.failed = True


def _recv_chunks(body: Any, reader: Any, unreader: Any, sock: Any) -> Iterator[bytes]:
    held = unreader.take_buffered()
    if len(held) > reader.length:
        unreader.unread(held[reader.length:])
        held = held[:reader.length]
    reader.length -= len(held)
    if held:
        yield held
    while reader.length > 0:
        buf = bytearray(min(CHUNK, reader.length))
        with memoryview(buf) as view:
            got = 0
            while got < len(buf):
                try:
                    n = sock.recv_into(view[got:])
                except BaseException:
                    body.failed = True  # gunicorn closes the connection
                    raise
                if not n:
                    body.failed = True
                    raise BodyCutShort("the request body ended before its Content-Length")
                got += n
                reader.length -= n
        yield buf  # a new buffer each time: never written again once given


def _open_local(path: str) -> IO[bytes]:
    """An absolute path on the controller, opened unbuffered (messages safe to show)."""
    p = Path(path)
    if not p.is_absolute():
        raise BadRequest("a local image source must be an absolute path")
    try:
        return p.open("rb", buffering=0)
    except OSError:
        raise BadRequest("the local image source cannot be read") from None


def _local(path: str) -> Iterator[bytes]:
    with _open_local(path) as fh:
        yield from _sparse_read(fh)


def store_local(path: str, dest: Path, limits: Limits,
                declared: str | None = None) -> StoredFile:
    """An admin's image file on the controller into `dest`: a qcow2 is copied (its bytes
    become the stored file, whose sha256 hosts check: the store must own them), a raw file
    is linked — `dest` a symbolic link to its real path, made atomically — and converted by
    the job straight from there, read as raw: raw follows nothing its bytes say, and what
    is stored is the conversion, content-addressed by its own sha256. The file must be a
    regular file, and stay in place until the image is active (gone or changed before:
    the import ends in error, or holds the bytes read then). Same header check and limits as
    an upload."""
    p = Path(path)
    with _open_local(path) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest("a local image source must be a regular file")
        head = fh.read(HEADER_BYTES)
        if not head:
            raise ImageRefused("the image is empty")
        fmt, _ = inspect_header(head, st.st_size, limits.max_virtual_bytes, declared)
        if fmt != "raw":
            fh.seek(0)
            return store_stream(_sparse_read(fh), dest, limits, declared)
    if st.st_size > limits.max_bytes:
        raise ImageTooLarge(f"the image is larger than the limit of {limits.max_bytes} bytes")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}-{os.urandom(4).hex()}")
    try:
        os.symlink(os.path.realpath(p), tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StoredFile(dest, "", st.st_size, "raw", st.st_size)


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


def _check_source(source: str, allow_local: bool) -> bool:
    """Whether `source` is an http(s) URL (else an absolute path on the controller, allowed
    to admins only). Raises BadRequest with a message safe to show."""
    if source.lower().startswith(("http://", "https://")):
        return True
    if "://" in source or source.lower().startswith("file:"):
        raise BadRequest("image URLs must be http:// or https://")
    if not allow_local:
        raise BadRequest("only admins may import from a path on the controller")
    return False


def source_chunks(source: str, allow_local: bool) -> Iterator[bytes]:
    """The bytes of an image source: an http(s) URL (public addresses only), or an absolute
    path on the controller (admins only). Raises BadRequest with a message safe to show."""
    if _check_source(source, allow_local):
        return download.stream(source)
    return _local(source)


Stash = Callable[[Path, Limits, "str | None"], StoredFile]
"""Puts an image into `imports/<id>` (the path given) under the limits, checking the
declared format: see :func:`store_stream` and :func:`store_local`."""


def source_stash(source: str, allow_local: bool) -> Stash:
    """How to bring an image source into `imports/`: a URL's bytes streamed (and stored), a
    controller path through :func:`store_local` (a raw file linked, not copied). Checks the
    source (and who may use it) now; raises BadRequest with a message safe to show."""
    if _check_source(source, allow_local):
        chunks = download.stream(source)
        return lambda dest, limits, declared: store_stream(chunks, dest, limits, declared)
    return lambda dest, limits, declared: store_local(source, dest, limits, declared)
