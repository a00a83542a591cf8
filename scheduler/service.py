"""The `virtfleet scheduler` process: a Celery worker on the control queue plus a liveness loop.

Owns wiring and the periodic host-liveness check; the logic lives in events.py.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import func, select

from fleet import contract as c
from fleet.bus import Bus, event_payload
from fleet.celery_app import make_celery
from fleet.config import Settings
from fleet.store.models import Event
from fleet.store.session import Store
from scheduler import tasks
from scheduler.events import mark_silent_hosts_down

log = logging.getLogger(__name__)


def liveness_loop(store: Store, settings: Settings, bus: Bus, stop: threading.Event) -> None:
    while not stop.wait(settings.heartbeat_interval / 2):
        try:
            with store.session() as session:
                before = session.scalar(select(func.max(Event.id))) or 0
                down = mark_silent_hosts_down(session, settings)
                session.flush()
                published = [event_payload(row) for row in session.scalars(
                    select(Event).where(Event.id > before).order_by(Event.id))]
            for name in down:
                log.warning("host %s missed %d heartbeats: marked down", name,
                            settings.missed_heartbeats)
            # host.down for admins, and each VM's move to `unknown` for its project's page
            for event in published:
                bus.publish(event)
        except Exception:  # noqa: BLE001 - keep checking; a DB hiccup must not stop liveness
            log.exception("liveness check failed")


def run(settings: Settings, concurrency: int = 1) -> None:
    store = Store(settings.db_url)
    bus = Bus(settings.redis_url)
    app = make_celery(settings, "virtfleet-scheduler")
    tasks.register(app, store, settings, bus)
    stop = threading.Event()
    thread = threading.Thread(target=liveness_loop, args=(store, settings, bus, stop),
                              name="liveness", daemon=True)
    thread.start()
    try:
        app.worker_main(["worker", "--queues", c.CONTROL_QUEUE, "--pool", "threads",
                         "--concurrency", str(concurrency), "--loglevel", settings.log_level,
                         "--hostname", f"scheduler@{settings.host_name}", "--without-gossip",
                         "--without-mingle", "--without-heartbeat"])
    finally:
        stop.set()
