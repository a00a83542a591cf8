"""Celery tasks of the scheduler service: thin shells over scheduler.events.

Registered only in the `virtfleet scheduler` process; it consumes the control queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from fleet import contract as c
from fleet.bus import Bus, event_payload
from fleet.config import Settings
from fleet.store.session import Store
from scheduler import imagejobs
from scheduler.events import apply_event

log = logging.getLogger(__name__)


def register(app: Celery, store: Store, settings: Settings, bus: Bus) -> None:
    """Bind the control-queue tasks to this process's store and bus."""

    def publish_row(row: Any) -> None:
        bus.publish_safely(event_payload(row))

    images = imagejobs.Runner(store, settings, publish_row)

    @app.task(name=c.TASK_INSPECT_IMAGE, acks_late=True, ignore_result=True)
    def inspect_image(payload: dict[str, Any]) -> None:
        # Off this thread: a conversion must not hold up events and heartbeats. A job lost
        # with this process is picked up again at the next start (Runner.resume).
        images.submit(str(payload["image_id"]))

    images.resume()

    @app.task(name=c.TASK_EVENT, acks_late=True, ignore_result=True)
    def handle_event(event: dict[str, Any]) -> None:
        image_handler = imagejobs.HANDLERS.get(event.get("type", ""))
        with store.session() as session:
            if image_handler is not None:
                outgoing, row = [], image_handler(session, event)
                session.flush()
            else:
                outgoing, row = apply_event(session, event, settings)
            published = event_payload(row) if row is not None else None
        for msg in outgoing:
            app.send_task(msg.task, args=[msg.payload], queue=msg.queue)
        if published is not None:
            bus.publish_safely(published)
