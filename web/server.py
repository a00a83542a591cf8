"""Serving the web app with gunicorn (threads, so live event streams do not block others)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Any

from gunicorn.app.base import BaseApplication

from fleet.config import Settings


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.application


log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's mallopt() parameters (malloc.h)."""

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc keep up to TRIM_THRESHOLD of freed memory at the top of each heap (and
    serve blocks below MMAP_THRESHOLD from the heap) instead of giving it back at once.

    An upload makes a new buffer of up to 512 KiB for every piece it receives (web/imports.py
    receives a body of declared length straight from the socket; a chunked one goes through
    gunicorn's body reader, which makes buffers of about a MiB). By default glibc hands such
    memory back to the kernel as soon as a thread's heap has a few MiB free at its top
    (madvise) and faults it in again, page by page, for the next piece: through gunicorn's
    reader that cost three to four times all the rest of the upload (13 s against 3 s of CPU
    for a 4 GiB disk on the test machine). At most TRIM_THRESHOLD per arena stays with the
    process. Returns whether it could be set (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


GIL_SWITCH_INTERVAL = 0.001
"""Seconds a thread may keep the GIL while others wait for it (Python's default: 0.005).
A request thread holding the store's writer lock gives up the GIL at each SQLite call and
then waits behind the other request threads to get it back; with the default, a create's
write transaction took about three times its own CPU time in a burst of 200 creates, and
every other writer of every process waited for it."""


def serve(settings: Settings) -> None:
    """gunicorn with `web_workers` processes of `web_threads` threads each. One process by
    default: writes to the store queue one at a time whatever the number of processes (SQLite
    has one writer), and each more process is one more writer to hand the lock to and one more
    interpreter competing for the CPUs; in a burst of 200 creates through two API processes,
    1 x 32 answered the slowest request about 40% sooner than 2 x 16."""
    from web import create_app
    from web.warmup import warm_up
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # inherited by gunicorn's forked workers
    if not keep_freed_memory():  # before gunicorn forks its workers: they inherit it
        log.info("glibc's mallopt is not available: memory is left as the C library keeps it")
    app = create_app(settings=settings)

    def post_worker_init(_worker: Any) -> None:
        warm_up(app)  # in each worker, once forked: connections are its own

    _Gunicorn(app, {
        "bind": settings.web_bind, "workers": settings.web_workers,
        "threads": settings.web_threads,
        "worker_class": "gthread", "timeout": 120, "graceful_timeout": 5,
        "accesslog": "-", "loglevel": settings.log_level.lower(),
        "post_worker_init": post_worker_init,
    }).run()
