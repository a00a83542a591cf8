"""The `virtfleet worker` process: one per host. Consumes `host.<name>`, sends heartbeats,
and turns libvirt lifecycle events into events for the control plane.

Owns wiring only; it holds no database credentials (it never imports the store).
"""

from __future__ import annotations

import logging
import shutil
import threading
from typing import Any

from fleet import contract as c
from fleet.celery_app import make_celery
from fleet.config import Settings
from worker import build, tasks
from worker.domain import HostSettings
from worker.heartbeat import domain_states, heartbeat_data
from worker.sysinfo import detect_virt_type, host_arch
from worker.virt import LifecycleListener, Virt

log = logging.getLogger(__name__)


def host_settings(settings: Settings) -> HostSettings:
    kind = settings.network_kind
    test_driver = settings.libvirt_uri.startswith("test:")
    return HostSettings(
        virt_type="test" if test_driver else detect_virt_type(settings.virt_type),
        arch=host_arch(),
        machine="pc",
        emulator=None if test_driver else shutil.which("qemu-system-x86_64"),
        network_kind=None if kind == "none" else kind,
        network_source=None if kind == "none" else settings.network_source,
        storage_dir=settings.storage_dir,
    )


def run(settings: Settings) -> None:
    app = make_celery(settings, f"virtfleet-worker-{settings.host_name}")
    host = host_settings(settings)
    virt = Virt(settings.libvirt_uri)
    name = settings.host_name

    def emit(type_: str, vm_id: str = "", job_id: str = "", **data: Any) -> None:
        event = c.make_event(type_, host=name, vm_id=vm_id, job_id=job_id, **data)
        app.send_task(c.TASK_EVENT, args=[event], queue=c.CONTROL_QUEUE)

    ctx = build.HostContext(virt=virt, host=host, host_token=settings.host_token, emit=emit)
    tasks.register(app, ctx)
    stop = threading.Event()

    known: dict[str, dict[str, str]] = {"domains": {}}

    def inventory() -> None:
        # Apart from the beat: listing domains waits while libvirt destroys one (seconds),
        # and a late beat would get a healthy host marked down.
        while True:
            try:
                # The build's own connection: a test:///file driver keeps its domains per
                # connection, so only this one sees what the builds defined.
                known["domains"] = domain_states(virt)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("listing domains failed")
            if stop.wait(settings.heartbeat_interval):
                return

    def beat() -> None:
        while True:
            try:
                emit(c.EV_HEARTBEAT, **heartbeat_data(virt, host, known["domains"]))
            except Exception:  # noqa: BLE001 - a missed beat is visible upstream; keep beating
                log.exception("heartbeat failed")
            if stop.wait(settings.heartbeat_interval):
                return

    def on_lifecycle(uuid: str, dom_name: str, event: str, detail: str) -> None:
        # A VM being built reports through its build (build.done); its own define/start
        # events would only queue in front of that.
        if dom_name.startswith("vf-") and uuid not in ctx.building:
            emit(c.EV_LIFECYCLE, vm_id=uuid, event=event, detail=detail)

    threading.Thread(target=inventory, name="inventory", daemon=True).start()
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    listener = LifecycleListener(settings.libvirt_uri, on_lifecycle).start()
    try:
        app.worker_main(["worker", "--queues", c.host_queue(name), "--pool", "threads",
                         "--concurrency", str(settings.worker_concurrency),
                         "--loglevel", settings.log_level, "--hostname", f"worker@{name}",
                         "--without-gossip", "--without-mingle", "--without-heartbeat"])
    finally:
        stop.set()
        listener.stop()
