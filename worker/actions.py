"""Actions on an existing VM of this host: start, stop, reboot, force_off, resize, snapshots
(create, revert, delete) and rebuild. Plain functions; :func:`run` is what the task calls.

Owns how each action is done with libvirt and qemu-img, and what it reports: one
``vm.action.done`` (with the domain's state after it) or one ``vm.action.failed`` (with the
reason and the state the domain is left in) per message. Each action re-checks the world
first, so a redelivered message (acks_late) does no harm: starting a running domain, stopping
a stopped one or deleting a deleted snapshot is success; and the outcome of each job is kept
in the instance directory (``actions.json``) before it is reported, so a message delivered
again after its action was done (the worker stopped before acknowledging it) is answered
with that outcome instead of being done twice (a reboot that reboots once).

Snapshots are libvirt *internal* snapshots of the qcow2 overlay: of a running domain a full
checkpoint (disk and memory, QEMU's savevm; reverting brings the guest back running where it
was), of a stopped one the disk only. The raw seed cdrom is read-only and left out
(``snapshot='no'``). Reverting also brings back the disk size and definition of the time of
the snapshot, which is why the API refuses to resize a VM that has snapshots.

Talks to libvirt only through worker.virt, to qemu-img only through worker.images; never to
the store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet import contract as c
from fleet.exceptions import BuildError
from worker import build, cache, images
from worker.domain import KIB_PER_MIB, instance_paths

log = logging.getLogger(__name__)

GIB = 1024**3

DEFAULT_STOP_TIMEOUT = 60.0
"""Seconds a stop (or soft reboot) waits for the guest to power off before forcing it."""

SHUTDOWN_REPEAT = 10.0
"""Seconds between ACPI power-button presses while waiting (a guest may miss the first one,
e.g. while it is still booting)."""

POLL = 0.2
"""Seconds between looks at a domain's state while waiting for it."""


class ActionError(Exception):
    """An action could not be done; the message is safe to show a tenant. ``data`` travels
    in the failure event (e.g. ``step``, ``disk_replaced``)."""

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.data = data


Handler = Callable[[build.HostContext, str, str, dict[str, Any]], dict[str, Any] | None]
"""handler(ctx, vm_id, job_id, args) -> extra data for vm.action.done (or None)."""

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _vm_lock(vm_id: str) -> threading.Lock:
    """One action at a time per VM on this worker (force_off excepted)."""
    with _locks_guard:
        return _locks.setdefault(vm_id, threading.Lock())


def observed_state(ctx: build.HostContext, vm_id: str) -> str:
    """The domain's state in the vocabulary of vm.action events: running, stopped, absent,
    or libvirt's name for anything else (paused...)."""
    try:
        state = ctx.virt.state(vm_id)
    except Exception:  # noqa: BLE001 - reported as unknown; the scheduler decides
        log.exception("state of %s", vm_id)
        return "unknown"
    if state is None:
        return "absent"
    if state in ("running", "blocked"):
        return "running"
    if state in ("shutoff", "crashed"):
        return "stopped"
    return state


DONE_FILE = "actions.json"
"""In the instance directory: the outcome of the VM's last DONE_KEPT action jobs."""

DONE_KEPT = 32


def _done_path(ctx: build.HostContext, vm_id: str) -> Path | None:
    try:
        return instance_paths(ctx.host.storage_dir, vm_id).dir / DONE_FILE
    except ValueError:
        return None  # not a VM id: nothing of it on this host


def _outcome_of(ctx: build.HostContext, vm_id: str, job_id: str) -> dict[str, Any] | None:
    """The recorded outcome of job `job_id` on this VM, if it was done here already."""
    path = _done_path(ctx, vm_id)
    try:
        done = json.loads(path.read_text()) if path is not None else []
    except (OSError, ValueError):
        return None
    for entry in done if isinstance(done, list) else []:
        if isinstance(entry, dict) and entry.get("job_id") == job_id:
            return entry
    return None


def _record(ctx: build.HostContext, vm_id: str, job_id: str, type_: str,
            data: dict[str, Any]) -> None:
    """Keep the outcome of a job (before it is reported): a message delivered again (the
    worker stopped between the action and its acknowledgement) is answered from here, not
    done twice. Only for a VM whose instance directory is on this host."""
    path = _done_path(ctx, vm_id)
    if path is None or not path.parent.is_dir():
        return
    try:
        done = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):
        done = []
    done = [e for e in done if isinstance(e, dict)][-(DONE_KEPT - 1):]
    done.append({"job_id": job_id, "type": type_, "data": data})
    tmp = path.with_name(f".{DONE_FILE}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(done))
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        log.warning("outcome of job %s on VM %s not recorded: %s", job_id, vm_id, exc)


def _report(ctx: build.HostContext, vm_id: str, job_id: str, type_: str,
            **data: Any) -> None:
    _record(ctx, vm_id, job_id, type_, data)
    ctx.emit(type_, vm_id=vm_id, job_id=job_id, **data)


def run(ctx: build.HostContext, payload: dict[str, Any]) -> None:
    """Do the action in ``payload`` (an ActionPayload) and report it as one event; a job
    done here already (its message delivered again) is reported again, not done again."""
    vm_id, job_id = payload["vm_id"], payload["job_id"]
    action, args = payload.get("action", ""), dict(payload.get("args") or {})
    handler = HANDLERS.get(action)
    if handler is None:
        ctx.emit(c.EV_ACTION_FAILED, vm_id=vm_id, job_id=job_id, action=action,
                 reason=f"this host does not know the action {action!r}",
                 state=observed_state(ctx, vm_id))
        return
    done = _outcome_of(ctx, vm_id, job_id)
    if done is not None:
        log.info("%s of %s (job %s) was done already: its outcome is sent again", action,
                 vm_id, job_id)
        ctx.emit(str(done["type"]), vm_id=vm_id, job_id=job_id, **dict(done.get("data") or {}))
        return
    ctx.emit(c.EV_BUILD_STEP, vm_id=vm_id, job_id=job_id, step=action)
    started = time.monotonic()
    lock = None if action == "force_off" else _vm_lock(vm_id)
    try:
        if lock is not None:
            lock.acquire()
        try:
            extra = handler(ctx, vm_id, job_id, args) or {}
        finally:
            if lock is not None:
                lock.release()
    except Exception as exc:  # noqa: BLE001 - every failure is reported as an event
        data = dict(getattr(exc, "data", {}) or {})
        if not isinstance(exc, ActionError):
            log.exception("%s of %s failed", action, vm_id)
        reason = build.scrub(f"{action} failed: {exc}")
        _report(ctx, vm_id, job_id, c.EV_ACTION_FAILED, action=action, reason=reason,
                state=observed_state(ctx, vm_id),
                seconds=round(time.monotonic() - started, 3), **data)
        return
    _report(ctx, vm_id, job_id, c.EV_ACTION_DONE, action=action,
            state=observed_state(ctx, vm_id), seconds=round(time.monotonic() - started, 3),
            **extra)


# -- power --------------------------------------------------------------------------------


def _timeout(args: dict[str, Any]) -> float:
    try:
        value = float(args.get("timeout", DEFAULT_STOP_TIMEOUT))
    except (TypeError, ValueError):
        value = DEFAULT_STOP_TIMEOUT
    return max(0.0, value)


def _require_defined(ctx: build.HostContext, vm_id: str) -> None:
    if ctx.virt.state(vm_id) is None:
        raise ActionError("the VM's domain is not defined on this host")


def power_off(ctx: build.HostContext, vm_id: str, timeout: float,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> bool:
    """Power the guest off cleanly (ACPI, pressed again every SHUTDOWN_REPEAT seconds), and
    force it off after ``timeout`` seconds. True if it had to be forced."""
    if not ctx.virt.is_active(vm_id):
        return False
    deadline = clock() + timeout
    press = clock()
    while ctx.virt.is_active(vm_id):
        now = clock()
        if now >= deadline:
            ctx.virt.destroy(vm_id)
            return True
        if now >= press:
            ctx.virt.shutdown(vm_id)
            press = now + SHUTDOWN_REPEAT
        sleep(POLL)
    return False


def do_start(ctx: build.HostContext, vm_id: str, job_id: str,
             args: dict[str, Any]) -> dict[str, Any]:
    _require_defined(ctx, vm_id)
    return {"started": ctx.virt.start(vm_id)}


def do_stop(ctx: build.HostContext, vm_id: str, job_id: str,
            args: dict[str, Any]) -> dict[str, Any]:
    _require_defined(ctx, vm_id)
    timeout = _timeout(args)
    forced = power_off(ctx, vm_id, timeout)
    message = (f"the guest did not power off within {timeout:g} s: forced off" if forced
               else "")
    return {"forced": forced, "message": message}


def do_reboot(ctx: build.HostContext, vm_id: str, job_id: str,
              args: dict[str, Any]) -> dict[str, Any]:
    """A soft reboot powers the guest off cleanly (forced after the timeout) and starts it
    again, as nova's libvirt driver does: it works with any guest that honours the power
    button, and the guest boots with its current definition. ``hard``: off at once."""
    _require_defined(ctx, vm_id)
    if args.get("hard"):
        ctx.virt.destroy(vm_id)
        forced = True
    else:
        forced = power_off(ctx, vm_id, _timeout(args))
    ctx.virt.start(vm_id)
    message = "forced off, then started" if forced and not args.get("hard") else ""
    return {"forced": forced, "message": message}


def do_force_off(ctx: build.HostContext, vm_id: str, job_id: str,
                 args: dict[str, Any]) -> dict[str, Any]:
    _require_defined(ctx, vm_id)
    return {"forced": ctx.virt.destroy(vm_id)}


# -- resize -------------------------------------------------------------------------------


def resized_xml(xml: str, vcpus: int, memory_mb: int) -> str:
    """The domain's own (inactive) XML with its vCPU count and memory replaced; everything
    else, device addresses included, stays as libvirt has it."""
    root = ET.fromstring(xml)
    vcpu = root.find("vcpu")
    if vcpu is None:
        vcpu = ET.SubElement(root, "vcpu", placement="static")
    vcpu.text = str(int(vcpus))
    vcpu.attrib.pop("current", None)
    kib = str(int(memory_mb) * KIB_PER_MIB)
    for tag in ("memory", "currentMemory"):
        el = root.find(tag)
        if el is None:
            el = ET.SubElement(root, tag)
        el.text = kib
        el.set("unit", "KiB")
    return ET.tostring(root, encoding="unicode")


def do_resize(ctx: build.HostContext, vm_id: str, job_id: str,
              args: dict[str, Any]) -> dict[str, Any]:
    """vCPUs and memory into the definition, disk grown with qemu-img; only while the
    domain is off. Each part is idempotent (a redelivered resize finds it done)."""
    _require_defined(ctx, vm_id)
    if ctx.virt.is_active(vm_id):
        raise ActionError("the VM is running: resize needs it stopped")
    out: dict[str, Any] = {}
    if args.get("disk_gb") is not None:
        disk = instance_paths(ctx.host.storage_dir, vm_id).disk
        want = int(args["disk_gb"]) * GIB
        have = images.virtual_size(disk, "qcow2")
        if want < have:
            raise ActionError(f"refusing to shrink the disk from {have} to {want} bytes")
        if want > have:
            images.resize(disk, "qcow2", want)
        out["disk_bytes"] = images.virtual_size(disk, "qcow2")
    if args.get("vcpus") is not None or args.get("memory_mb") is not None:
        xml = ctx.virt.xml(vm_id)
        root = ET.fromstring(xml)
        vcpus = int(args.get("vcpus") or (root.findtext("vcpu") or "1").strip())
        memory_mb = args.get("memory_mb")
        if memory_mb is None:
            memory_mb = int((root.findtext("memory") or "0").strip()) // KIB_PER_MIB
        ctx.virt.define(resized_xml(xml, vcpus, int(memory_mb)))
        out.update(vcpus=vcpus, memory_mb=int(memory_mb))
    return out


# -- snapshots ----------------------------------------------------------------------------


def snapshot_xml(name: str, domain_xml: str, description: str = "") -> str:
    """``<domainsnapshot>`` for an internal snapshot: every qcow2 disk internal, every other
    disk (the raw, read-only seed cdrom) left out. libvirt adds the memory of a running
    domain itself."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    disks = ET.SubElement(root, "disks")
    dom = ET.fromstring(domain_xml)
    for disk in dom.findall("devices/disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = disk.find("driver")
        internal = (disk.get("device", "disk") == "disk" and driver is not None
                    and driver.get("type") == "qcow2" and disk.find("readonly") is None)
        ET.SubElement(disks, "disk", name=target.get("dev", ""),
                      snapshot="internal" if internal else "no")
    return ET.tostring(root, encoding="unicode")


def _snapshot_name(args: dict[str, Any]) -> str:
    name = str(args.get("name") or "")
    if not c.NAME_RE.match(name):
        raise ActionError("a snapshot needs a valid name")
    return name


def do_snapshot_create(ctx: build.HostContext, vm_id: str, job_id: str,
                       args: dict[str, Any]) -> dict[str, Any]:
    name = _snapshot_name(args)
    _require_defined(ctx, vm_id)
    if ctx.virt.snapshot_exists(vm_id, name):
        return {"snapshot": name}
    kind = ctx.virt.snapshot_create(
        vm_id, snapshot_xml(name, ctx.virt.xml(vm_id, inactive=False),
                            description=f"virtfleet snapshot {name}"))
    return {"snapshot": name, "snapshot_state": kind}


def do_snapshot_revert(ctx: build.HostContext, vm_id: str, job_id: str,
                       args: dict[str, Any]) -> dict[str, Any]:
    name = _snapshot_name(args)
    _require_defined(ctx, vm_id)
    ctx.virt.snapshot_revert(vm_id, name)
    return {"snapshot": name}


def do_snapshot_delete(ctx: build.HostContext, vm_id: str, job_id: str,
                       args: dict[str, Any]) -> dict[str, Any]:
    name = _snapshot_name(args)
    if ctx.virt.state(vm_id) is None:
        return {"snapshot": name, "deleted": False}  # nothing left to delete it from
    return {"snapshot": name, "deleted": ctx.virt.snapshot_delete(vm_id, name)}


# -- rebuild ------------------------------------------------------------------------------


def do_rebuild(ctx: build.HostContext, vm_id: str, job_id: str,
               args: dict[str, Any]) -> dict[str, Any]:
    """The VM again from its image, same id, name and MAC: base image first (a missing image
    leaves the VM as it was), then destroy and undefine (snapshot metadata too), a new
    overlay and seed, define, start; the build's own steps (worker.build)."""
    vm, image = dict(args.get("vm") or {}), dict(args.get("image") or {})
    if vm.get("id") != vm_id or not image.get("sha256"):
        raise ActionError("a rebuild message needs the VM and its image")
    try:
        ctx.emit(c.EV_BUILD_STEP, vm_id=vm_id, job_id=job_id, step="image")
        cache.ensure_base(ctx.host.storage_dir, image, ctx.host_token)
    except Exception as exc:
        raise ActionError(build.scrub(f"image failed: {exc}"), step="image") from exc
    paths = instance_paths(ctx.host.storage_dir, vm_id)
    ctx.building.add(vm_id)  # its destroy and start are the rebuild's, not lifecycle news
    step = "destroy"
    try:
        ctx.emit(c.EV_BUILD_STEP, vm_id=vm_id, job_id=job_id, step=step)
        ctx.virt.destroy_and_undefine(vm_id)
        for path in (paths.disk, paths.seed):
            path.unlink(missing_ok=True)
        step = "overlay"
        build.build_vm(ctx, {"vm": vm, "image": image, "job_id": job_id, "attempt": 0})
    except BuildError as exc:
        raise ActionError(str(exc), step=exc.step, disk_replaced=True) from exc
    except Exception as exc:
        raise ActionError(build.scrub(f"{step} failed: {exc}"), step=step,
                          disk_replaced=True) from exc
    finally:
        ctx.building.discard(vm_id)
    return {"message": ""}


HANDLERS: dict[str, Handler] = {
    "start": do_start,
    "stop": do_stop,
    "reboot": do_reboot,
    "force_off": do_force_off,
    "resize": do_resize,
    "snapshot_create": do_snapshot_create,
    "snapshot_revert": do_snapshot_revert,
    "snapshot_delete": do_snapshot_delete,
    "rebuild": do_rebuild,
}
"""Every action this host does, by name (the contract's ActionPayload.action)."""

