"""Warming a fresh web worker before it serves: what its first requests would otherwise pay.

Owns `warm_up(app)`, run by each gunicorn worker once forked (web/server.py), before it
takes requests. A fresh process's first create cost ~40 ms more than the next ones (the ORM's
mappers configured, the store's connections opened, every host read into the host cache)
and its first message to a host ~30 ms more (Celery's app finalized, a broker connection
and a producer made): in a burst, every request queued behind them waited that long too. The
warm-up only reads and connects; nothing is written or sent. A failure (the broker or the
store not reachable yet) is logged and left to the first request, which meets it as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.orm import configure_mappers

from scheduler import hostcache

log = logging.getLogger(__name__)


def warm_up(app: Any) -> None:
    started = time.perf_counter()
    settings = app.extensions["virtfleet.settings"]
    store = app.extensions["virtfleet.store"]
    dispatcher = app.extensions["virtfleet.dispatcher"]
    try:
        configure_mappers()
        with store.sessions() as s:
            cached = hostcache.for_session(s, settings)
            if cached is not None:
                cached.hosts()
        warm = getattr(dispatcher, "warm_up", None)
        if warm is not None:
            warm()
    except Exception as exc:  # noqa: BLE001 - a warm-up never stops a worker from serving
        log.warning("warm-up incomplete (%s: %s): the first requests will finish it",
                    type(exc).__name__, exc)
        return
    log.info("warmed up in %.0f ms", (time.perf_counter() - started) * 1000)
