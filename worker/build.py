"""Build and delete flows on a host: plain functions, each step idempotent and undone on error.

Owns the order of a build (image → overlay → seed → define, with the VM's fleet network
realised by worker.networks → start, then the console watched for the ready line by
worker.readiness) and of a delete. Talks to libvirt only through worker.virt, to qemu-img
only through worker.images; reports progress through the `emit` callable it is given, never
to the store.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleet import contract as c
from fleet.exceptions import BuildError
from fleet.scrub import scrub
from worker import cache, images
from worker.domain import HostSettings, InstancePaths, design, instance_paths, to_xml
from worker.networks import ensure_network
from worker.readiness import ReadyWatcher
from worker.seed import start_seed_iso
from worker.virt import Virt

log = logging.getLogger(__name__)

Emit = Callable[..., None]
"""emit(event_type, vm_id=..., job_id=..., **data) sends an event to the control plane."""

GIB = 1024**3


@dataclass
class HostContext:
    """Everything a flow needs on this host."""

    virt: Virt
    host: HostSettings
    host_token: str
    emit: Emit
    building: set[str] = field(default_factory=set)
    """VMs this worker is building now: their lifecycle events are the build's own."""
    ready: ReadyWatcher | None = None
    """Watches the console of each VM a build starts for the ready line (none: no watching)."""


def network_config(mac: str) -> str:
    """cloud-init network-config v2: DHCP on the NIC with the VM's MAC."""
    eth: dict[str, Any] = {"dhcp4": True}
    if mac:
        eth.update({"match": {"macaddress": mac}, "set-name": "eth0"})
    return yaml.safe_dump({"version": 2, "ethernets": {"eth0": eth}}, sort_keys=False)


def build_vm(ctx: HostContext, payload: dict[str, Any]) -> None:
    """Build (or finish building) the VM in `payload`; raises BuildError naming the step."""
    vm, job_id = payload["vm"], payload["job_id"]
    vm_id = vm["id"]
    paths = instance_paths(ctx.host.storage_dir, vm_id)

    def step(name: str) -> None:
        ctx.emit(c.EV_BUILD_STEP, vm_id=vm_id, job_id=job_id, step=name)

    if ctx.virt.state(vm_id) == "running":
        return  # a redelivered message for a build that already finished
    ctx.building.add(vm_id)
    try:
        _build(ctx, payload, paths, step)
    finally:
        ctx.building.discard(vm_id)


def _build(ctx: HostContext, payload: dict[str, Any], paths: InstancePaths,
           step: Callable[[str], None]) -> None:
    vm = payload["vm"]
    vm_id = vm["id"]
    current = "image"
    try:
        with ExitStack() as undo:
            step(current)
            base = cache.ensure_base(ctx.host.storage_dir, payload["image"], ctx.host_token)

            current = "overlay"
            step(current)
            paths.dir.mkdir(parents=True, exist_ok=True)
            undo.callback(shutil.rmtree, paths.dir, ignore_errors=True)
            # The seed is written while qemu-img makes the overlay (step "seed" waits for it;
            # on a failure, the undo waits for it before removing the directory).
            # user_data is the control plane's final document (multipart): used unchanged.
            seeding = start_seed_iso(paths.seed, instance_id=vm_id, hostname=vm["hostname"],
                                     user_data=vm.get("user_data") or "",
                                     network_config=(vm.get("network_config")
                                                     or network_config(vm.get("mac", ""))))
            undo.callback(seeding.settle)
            if not paths.disk.exists():
                images.create_overlay(base, paths.disk, int(vm["disk_gb"]) * GIB,
                                      base_size=cache.base_virtual_size(base))

            current = "seed"
            step(current)
            seeding.wait()

            current = "define"
            step(current)
            xml = to_xml(design(vm, ctx.host))
            if vm.get("network"):
                ensure_network(ctx.virt, vm["network"])  # a fleet network, realised here
            elif ctx.host.network_kind == "network" and ctx.host.network_source:
                ctx.virt.ensure_network_active(ctx.host.network_source)
            current = "start"
            if ctx.ready is not None:
                ctx.ready.prepare(vm_id)  # only output from this boot on can say "ready"
            undo.callback(ctx.virt.destroy_and_undefine, vm_id)
            ctx.virt.define_and_start(xml)
            started = time.time()
            undo.pop_all()
            if ctx.ready is not None:
                ctx.ready.watch(vm_id, started)
    except BuildError:
        raise
    except Exception as exc:
        log.exception("build of %s failed at %s", vm_id, current)
        raise BuildError(current, f"{current} failed: {scrub(str(exc))}") from exc


def delete_vm(ctx: HostContext, vm_id: str) -> None:
    """Destroy and undefine the domain and remove its overlay, seed and log (idempotent)."""
    if ctx.ready is not None:
        ctx.ready.unwatch(vm_id)
    ctx.virt.destroy_and_undefine(vm_id)
    shutil.rmtree(instance_paths(ctx.host.storage_dir, vm_id).dir, ignore_errors=True)


def console_tail(storage_dir: Path, vm_id: str, max_bytes: int) -> str:
    path = instance_paths(storage_dir, vm_id).console
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
