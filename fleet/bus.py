"""The live event bus for web pages: Redis pub/sub on one channel.

Owns publishing applied events and subscribing to them (SSE). Not a queue: a page that is
not listening misses nothing it cannot re-read from the store's event log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import redis

CHANNEL = "virtfleet:events"
"""The pub/sub channel carrying every applied event as JSON."""

log = logging.getLogger(__name__)


def event_payload(row: Any) -> dict[str, Any]:
    """An event row of the store as pages receive it."""
    return {"id": row.id, "type": row.type, "ts": row.ts.isoformat(), "vm_id": row.vm_id,
            "job_id": row.job_id, "host": row.host_name, "project_id": row.project_id,
            "data": row.data}


class Bus:
    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5,
                                           socket_connect_timeout=5)

    def publish(self, event: dict[str, Any]) -> None:
        self._redis.publish(CHANNEL, json.dumps(event, default=str))

    def publish_safely(self, event: dict[str, Any]) -> None:
        """Publish, logging a failure: live updates are best effort, the store has it all."""
        try:
            self.publish(event)
        except Exception:  # noqa: BLE001 - a page re-reads the store when it reconnects
            log.warning("could not publish event %s", event.get("id"))

    def listen(self, timeout: float = 15.0) -> Iterator[dict[str, Any] | None]:
        """Yield events as they come; None every `timeout` seconds of silence (keep-alive)."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(CHANNEL)
        try:
            while True:
                msg = pubsub.get_message(timeout=timeout)
                if msg is None:
                    yield None
                elif msg.get("type") == "message":
                    yield json.loads(msg["data"])
        finally:
            pubsub.close()
