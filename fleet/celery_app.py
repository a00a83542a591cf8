"""The Celery app shared by web, scheduler and workers: JSON only, acks_late, Redis broker.

Owns Celery configuration. Tasks are registered by scheduler.tasks and worker.tasks, each in
its own process; the web only sends tasks by name.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from fleet.config import Settings
from fleet.contract import CONTROL_QUEUE


def make_celery(settings: Settings, name: str = "virtfleet") -> Celery:
    app = Celery(name, broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_expires=600,
        task_time_limit=settings.task_time_limit,
        broker_transport_options={"visibility_timeout": settings.task_time_limit * 2},
        result_backend_transport_options={"visibility_timeout": settings.task_time_limit * 2},
        broker_connection_retry_on_startup=True,
        task_default_queue=CONTROL_QUEUE,
        task_queues=[Queue(CONTROL_QUEUE)],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app
