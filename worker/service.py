"""The `virtfleet worker` process: one per host. Consumes `host.<name>`, sends heartbeats,
turns libvirt lifecycle events into events for the control plane, and watches new VMs'
consoles for the ready line (worker.readiness).

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
from worker import build, cache, tasks
from worker import console as console_server
from worker.addresses import AddressReporter
from worker.domain import HostSettings
from worker.heartbeat import domain_states, heartbeat_data
from worker.readiness import ReadyWatcher
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

    # One thread watches the console logs of new VMs for cloud-init's ready line.
    ready = ReadyWatcher(emit, host.storage_dir, timeout=settings.ready_timeout)
    ctx = build.HostContext(virt=virt, host=host, host_token=settings.host_token, emit=emit,
                            ready=ready)
    gc_wake = threading.Event()
    tasks.register(app, ctx, after_delete=gc_wake.set)
    stop = threading.Event()

    known: dict[str, dict[str, str]] = {"domains": {}}
    addresses = AddressReporter(virt, emit, interval=2.0,  # vm.addresses, on change only
                                storage_dir=host.storage_dir)

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
            try:
                addresses.poll()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("reading VM addresses failed")
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

    console = None
    if settings.console_bind:
        try:
            console = console_server.ConsoleServer(settings).start()
        except Exception as exc:  # noqa: BLE001 - the host still builds VMs without it
            log.error("no interactive console on this host: %s", exc)
    console_server.register(app, console, virt.state)

    def cache_gc() -> None:
        # Every cache_gc_interval seconds, and soon after a VM is deleted.
        while not stop.is_set():
            gc_wake.wait(settings.cache_gc_interval)
            gc_wake.clear()
            if stop.is_set():
                return
            try:
                cache.collect_garbage(settings.storage_dir, settings.cache_max_bytes)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("base-image cache clean-up failed")

    threading.Thread(target=cache_gc, name="cache-gc", daemon=True).start()
    threading.Thread(target=inventory, name="inventory", daemon=True).start()
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()

    def running_vms() -> list[str]:
        # After a restart: VMs whose domains run, to re-send or resume their ready watch.
        return [d["vm_id"] for d in virt.list_domains()
                if d["vm_id"] and d["state"] in ("running", "blocked")]

    ready.start(running=running_vms)
    listener = LifecycleListener(settings.libvirt_uri, on_lifecycle).start()
    try:
        app.worker_main(["worker", "--queues", c.host_queue(name), "--pool", "threads",
                         "--concurrency", str(settings.worker_concurrency),
                         "--loglevel", settings.log_level, "--hostname", f"worker@{name}",
                         "--without-gossip", "--without-mingle", "--without-heartbeat"])
    finally:
        stop.set()
        gc_wake.set()
        ready.stop()
        listener.stop()
        if console is not None:
            console.stop()
