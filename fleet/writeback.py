"""Asking the kernel to write a file's dirty pages to disk ahead of its fsync, and to
forget pages that were only a step on the way.

Owns sync_file_range(2) (start writing a range, do not wait) on a thread of its own
(:class:`WritebackBehind`: the writer never waits for the disk's queue), and punching
holes (fallocate(2) PUNCH_HOLE) in a staging file whose bytes are done with. Neither is a
guarantee of anything: an fsync is.

Must not: fsync, or decide what a file is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading
from typing import Any

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A function of the C library taking `argtypes` and returning an int, or None where
    the library has none of that name."""
    fn = getattr(_LIBC, name, None)
    if fn is not None:
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_function("sync_file_range", ctypes.c_int, ctypes.c_longlong,
                                  ctypes.c_longlong, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2
"""sync_file_range(2): start writing the dirty pages of the range, do not wait for them."""


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing `length` bytes of `fd` from `offset` to disk, without
    waiting for the disk (it is no guarantee of anything: the job's fsync is). False where
    sync_file_range is not available (the fsync then does all of it)."""
    if _SYNC_FILE_RANGE is None or length <= 0:
        return False
    return _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


class WritebackBehind:
    """A thread that asks the kernel to start writing ranges of a file to disk
    (:func:`start_writeback`), so that the writer never waits for it: sync_file_range
    waits whenever the disk's queue is full, and on the request's thread that made an
    upload as slow as the disk (1 GiB: 0.8 s) on top of receiving it."""

    def __init__(self, fd: int, name: str = "upload-writeback") -> None:
        self.fd = fd
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            start_writeback(self.fd, *job)

    def start(self, offset: int, length: int) -> None:
        self._queue.put((offset, length))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


_FALLOCATE = _libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                            ctypes.c_longlong)
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Turn `length` bytes of `fd` from `offset` into a hole (the file keeps its size; its
    pages there, dirty or not, are dropped: never written to disk). False where the file
    system or the C library cannot (the bytes then simply stay)."""
    if _FALLOCATE is None or length <= 0:
        return False
    return _FALLOCATE(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0
