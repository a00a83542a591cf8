"""Celery tasks of a host: thin shells that re-check the world and call worker.build.

Registered only in the `virtfleet worker` process, which consumes `host.<name>`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from fleet import contract as c
from fleet.exceptions import BuildError
from worker import actions, build, cache, networks

log = logging.getLogger(__name__)


def register(app: Celery, ctx: build.HostContext,
             after_delete: Callable[[], None] | None = None) -> None:
    @app.task(name=c.TASK_BUILD_VM, acks_late=True, ignore_result=True)
    def build_vm(payload: dict[str, Any]) -> None:
        vm_id, job_id = payload["vm"]["id"], payload["job_id"]
        try:
            build.build_vm(ctx, payload)
        except BuildError as exc:
            ctx.emit(c.EV_BUILD_FAILED, vm_id=vm_id, job_id=job_id, step=exc.step,
                     reason=str(exc))
            return
        ctx.emit(c.EV_BUILD_DONE, vm_id=vm_id, job_id=job_id, state="running")

    @app.task(name=c.TASK_DELETE_VM, acks_late=True, ignore_result=True)
    def delete_vm(payload: dict[str, Any]) -> None:
        vm_id, job_id = payload["vm_id"], payload["job_id"]
        try:
            build.delete_vm(ctx, vm_id)
        except Exception as exc:  # noqa: BLE001 - reported to the control plane as an event
            log.exception("delete of %s failed", vm_id)
            ctx.emit(c.EV_DELETE_FAILED, vm_id=vm_id, job_id=job_id,
                     reason=build.scrub(f"delete failed: {exc}"))
            return
        ctx.emit(c.EV_DELETED, vm_id=vm_id, job_id=job_id, state="deleted")
        if after_delete is not None:
            after_delete()  # e.g. wake the base-image cache clean-up

    @app.task(name=c.TASK_PREWARM_IMAGE, acks_late=True, ignore_result=True)
    def prewarm_image(payload: dict[str, Any]) -> None:
        image = payload["image"]
        try:
            cache.ensure_base(ctx.host.storage_dir, image, ctx.host_token)
        except cache.CacheError as exc:
            ctx.emit(c.EV_IMAGE_CACHE_FAILED, image_id=image.get("id", ""),
                     sha256=image.get("sha256", ""), reason=build.scrub(str(exc)))
            return
        ctx.emit(c.EV_IMAGE_CACHED, image_id=image.get("id", ""), sha256=image["sha256"])

    @app.task(name=c.TASK_REMOVE_NETWORK, acks_late=True, ignore_result=True)
    def remove_network(payload: dict[str, Any]) -> None:
        networks.remove_fleet_network(ctx.virt, str(payload["name"]),
                                      str(payload.get("uuid") or ""))

    @app.task(name=c.TASK_VM_ACTION, acks_late=True, ignore_result=True)
    def vm_action(payload: dict[str, Any]) -> None:
        actions.run(ctx, payload)

    @app.task(name=c.TASK_CONSOLE_LOG, ignore_result=False, acks_late=False)
    def console_log(vm_id: str, max_bytes: int) -> str:
        return build.console_tail(ctx.host.storage_dir, vm_id, int(max_bytes))
