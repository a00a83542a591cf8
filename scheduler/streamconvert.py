"""A raw disk converted to qcow2 while it is still arriving (a sparse upload's data).

Owns the staging of such a disk and its conversion as it comes: the data is written where
it belongs in a sparse staging file beside the destination, and each finished segment of
the disk (cluster-aligned, cut every SEGMENT_DATA bytes of data, so that a huge, mostly
empty disk does not start a process per hole) is converted into its place in the qcow2 by
``worker.images.convert_segment`` on a thread of its own — one qemu-img at a time — while
the next segment is received. A converted segment is punched out of the staging file (its
pages dropped, never written to disk). The qcow2 is not written back as it grows: the image
job's fsync hides under its sha256 anyway (1 GiB: 0.85 s of hashing, the fsync's wait after
it 0-3 ms on the test machine with or without), and sync_file_range behind the conversion
took CPU from it and made the end wait for the disk's queue (0.2 s after the last byte
against 0.1 s without).

The result is the qcow2 of the whole disk, not synced, not yet hashed: what the image job
(scheduler/imagejobs.py) checks, hashes, syncs and publishes like any uploaded qcow2.

qemu-img runs only through worker.images (as a library; every call names its formats).
Must not: parse HTTP (web/sparse.py does), hash, sync or publish, or leave a file behind
when it fails or is abandoned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from types import TracebackType

from fleet.writeback import punch_hole
from worker import images

log = logging.getLogger(__name__)

SEGMENT_DATA = 128 * 1024 * 1024
"""Bytes of data received between two segments handed to qemu-img (each one a process
start, and the qcow2's metadata read and written). Measured on the test machine, 1 GiB of
data: qemu-img ran 1.0-1.4 s in all with 128 MiB segments, 1.5-2.0 s with 64 MiB, 2.2-2.9 s
with 32 MiB; 256 MiB left up to 0.7 s of converting after the last byte."""

CLUSTER = 64 * 1024
"""Segments start and end on qcow2's (default) cluster boundaries: no cluster is written by
two conversions."""


class StreamConversion:
    """Converts a raw disk of ``virtual_size`` bytes into a new qcow2 while its data is
    :meth:`write`-n in increasing order; :meth:`finish` returns the qcow2. Use it as a
    context manager: leaving it by an exception (or without :meth:`finish`) stops the
    conversion and removes every file it made."""

    def __init__(self, directory: Path, name: str, virtual_size: int,
                 segment_data: int | None = None) -> None:
        tag = os.urandom(4).hex()
        self.staging = directory / f".{name}-{tag}.raw"
        self.qcow2 = directory / f".{name}-{tag}.qcow2"
        self.segment_data = segment_data or SEGMENT_DATA
        self.convert_s = 0.0
        """Seconds qemu-img ran (on the converter's thread)."""
        self.tail_s = 0.0
        """Seconds :meth:`finish` waited for the conversion after the last write."""
        self._fd = -1
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._stop = False
        self._handed = 0
        """Where the next segment starts (all before it is handed to the converter)."""
        self._data = 0
        """Bytes of data written since the last segment was handed."""
        self._thread: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.size = images.create_empty_qcow2(self.qcow2, virtual_size)
            self._fd = os.open(self.staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self._fd, self.size)
            self._thread = threading.Thread(target=self._run, name="stream-convert",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> StreamConversion:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None or self._fd >= 0:
            self.abort()

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Put `data` at `offset` of the disk: after everything written before (the caller
        checks the order), inside the disk."""
        self._raise_error()
        view = memoryview(data)
        at = offset
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n
        self._data += len(data)
        if self._data >= self.segment_data:
            cut = at // CLUSTER * CLUSTER
            if cut > self._handed:
                self._queue.put((self._handed, cut))
                self._handed, self._data = cut, 0

    def finish(self) -> Path:
        """Convert the rest, wait for the converter, drop the staging file; the qcow2 (not
        synced)."""
        t0 = time.perf_counter()
        if self._handed < self.size:
            self._queue.put((self._handed, self.size))
            self._handed = self.size
        self._queue.put(None)
        assert self._thread is not None
        self._thread.join()
        self._raise_error()
        self._close()
        self.staging.unlink(missing_ok=True)
        self.tail_s = time.perf_counter() - t0
        return self.qcow2

    def abort(self) -> None:
        """Stop after the qemu-img running now (if any) and remove every file made."""
        self._stop = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._close()
        for p in (self.staging, self.qcow2):
            p.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (segment := self._queue.get()) is not None:
            start, end = segment
            if self._stop or self._error is not None:
                continue
            try:
                t0 = time.perf_counter()
                images.convert_segment(self.staging, self.qcow2, start, end - start)
                self.convert_s += time.perf_counter() - t0
                punch_hole(self._fd, start, end - start)
            except BaseException as exc:  # noqa: BLE001 - raised on the writer's thread
                log.warning("conversion of a segment of %s failed: %s", self.qcow2.name, exc)
                self._error = exc
