"""Apply events from hosts to the store as state-machine transitions.

Owns what each event means for VMs, jobs and hosts. Every transition is a compare-and-set
on the VM's expected state. Returns the messages to send (reschedules) instead of sending
them, so it can be tested without a broker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from fleet import contract as c
from fleet import networks, userdata
from fleet.config import Settings
from fleet.exceptions import NoValidHost
from fleet.store.models import VM, Claim, Event, Host, Image, Job, Snapshot, utcnow
from scheduler import claims, ipam

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Build attempts per VM (first host plus alternates) before it goes to error."""


@dataclass
class Outgoing:
    """A message to send after the transaction commits."""

    task: str
    payload: dict[str, Any]
    queue: str


def transition(session: Session, vm_id: str, allowed: tuple[str, ...], to: str,
               reason: str = "", step: str = "", **extra: Any) -> bool:
    """Move a VM to `to` only if it is in one of `allowed` states (setting the columns in
    `extra` with it). True if it moved."""
    res = session.execute(
        update(VM).where(VM.id == vm_id, VM.state.in_(allowed))
        .values(state=to, state_reason=reason, failed_step=step, updated_at=utcnow(), **extra)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def up_state(vm: VM | None) -> str:
    """The state of a VM whose domain runs: `ready` once cloud-init has finished its first
    boot (ready_at; a reboot or a start does not undo that), else `running`."""
    return "ready" if vm is not None and vm.ready_at is not None else "running"


def _parse_ts(ts: str) -> datetime:
    try:
        dt = datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        return utcnow()
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def record(session: Session, event: dict[str, Any], project_id: int | None = None) -> Event:
    row = Event(type=event["type"], ts=_parse_ts(event.get("ts", "")),
                vm_id=event.get("vm_id", ""), job_id=event.get("job_id", ""),
                host_name=event.get("host", ""), project_id=project_id,
                data=event.get("data", {}))
    session.add(row)
    return row


def _job(session: Session, job_id: str, only_open: bool = False, **values: Any) -> None:
    if job_id:
        cond = [Job.id == job_id]
        if only_open:
            cond.append(Job.state.in_(("queued", "running")))
        session.execute(update(Job).where(*cond)
                        .values(updated_at=utcnow(), **values)
                        .execution_options(synchronize_session=False))


def build_payload(vm: VM, image: Image, job_id: str, settings: Settings) -> dict[str, Any]:
    """The build message: everything the host needs, nothing that needs the store.

    user_data is the final MIME multipart (the user's own, then virtfleet's hostname, SSH
    keys and ready signal: fleet.userdata.compose); network the NetworkSpec of its fleet
    network (None: the host's default); network_config the seed's v2 YAML for a fleet
    network (static address or DHCP, matched by MAC), "" otherwise."""
    net = networks.from_row(vm.network) if vm.network is not None else None
    static = vm.static_address if vm.address_mode == "static" else ""
    return {
        "vm": {"id": vm.id, "name": vm.name, "project": vm.project.name, "vcpus": vm.vcpus,
               "memory_mb": vm.memory_mb, "disk_gb": vm.disk_gb,
               "user_data": userdata.compose(vm.user_data or "", hostname=vm.name,
                                             ssh_keys=list(vm.ssh_keys or [])),
               "hostname": vm.name, "mac": vm.mac,
               "network": networks.spec(vm.network.name, net, vm.network.id)
               if net is not None and vm.network is not None else None,
               "network_config": networks.network_config(vm.mac, net, static)},
        "image": {"id": image.id, "sha256": image.sha256, "disk_format": image.disk_format,
                  "size_bytes": image.size_bytes,
                  "url": f"{settings.base_url}/api/v1/images/{image.id}/data"},
        "job_id": job_id,
        "attempt": vm.attempts,
    }


def on_heartbeat(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    d = event["data"]
    host = session.scalars(select(Host).where(Host.name == event["host"])).first()
    if host is None:
        host = Host(name=event["host"], labels={}, cached_images=[])
        session.add(host)
    was_down = host.id is not None and not host.alive
    before = (host.arch, host.virt_type, host.vcpus, host.memory_mb, host.disk_gb)
    host.arch = d.get("arch", host.arch)
    host.virt_type = d.get("virt_type", host.virt_type)
    host.vcpus = int(d.get("vcpus", host.vcpus))
    host.memory_mb = int(d.get("memory_mb", host.memory_mb))
    host.disk_gb = int(d.get("disk_gb", host.disk_gb))
    if was_down or (host.id is not None and (host.arch, host.virt_type, host.vcpus,
                                             host.memory_mb, host.disk_gb) != before):
        # Capacity changed or the host is back: a claim (or a cached host, see
        # scheduler/hostcache.py) computed against the old state must lose its CAS.
        host.generation = Host.generation + 1
    host.load = float(d.get("load", 0.0))
    host.cached_images = list(d.get("cached_images", []))
    host.last_heartbeat = utcnow()
    host.alive = True
    session.flush()
    if was_down:
        record(session, c.make_event(c.EV_HOST_UP, host=host.name))
    # VMs whose state we lost while the host was silent come back from what it reports.
    domains: dict[str, str] = d.get("domains", {})
    for vm in session.scalars(select(VM).where(VM.host_id == host.id, VM.state == "unknown")):
        seen = domains.get(vm.id)
        if seen is not None:
            transition(session, vm.id, ("unknown",), up_state(vm) if seen == "running"
                       else "stopped", reason="host reported again")
    return []


def on_build_step(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    _job(session, event["job_id"], only_open=True, state="running",
         step=event["data"].get("step", ""),
         host_name=event["host"])
    return []


def on_build_done(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    transition(session, event["vm_id"], ("building", "pending", "unknown"), "running")
    _job(session, event["job_id"], state="done", step="", message="")
    return []


def on_build_failed(session: Session, event: dict[str, Any],
                    settings: Settings) -> list[Outgoing]:
    vm = session.get(VM, event["vm_id"])
    step = event["data"].get("step", "")
    reason = event["data"].get("reason", "build failed")
    if vm is None or vm.state not in ("building", "pending"):
        _job(session, event["job_id"], state="failed", step=step, message=reason)
        return []
    failed_on = event["host"]
    if vm.host is not None and failed_on and vm.host.name != failed_on:
        # A late or redelivered failure from a host the VM has already left: the build on
        # its current host must keep its claim and its job.
        log.info("ignoring a build failure of %s on %s: it now builds on %s",
                 vm.id, failed_on, vm.host.name)
        return []
    claims.release(session, vm.id)
    alternates = [a for a in (vm.alternates or []) if a != failed_on]
    if vm.attempts + 1 < MAX_ATTEMPTS and alternates:
        req = claims.request_for(session, vm, vm.image.sha256)
        try:
            host = claims.place_and_claim(session, vm, req, settings, only=frozenset(alternates))
        except NoValidHost:
            host = None
        if host is not None:
            vm.attempts += 1
            vm.alternates = [a for a in alternates if a != host.name]
            _job(session, event["job_id"], state="queued", step="",
                 message=f"rescheduled after failure on {failed_on}: {reason}",
                 host_name=host.name)
            session.flush()
            return [Outgoing(c.TASK_BUILD_VM,
                             build_payload(vm, vm.image, event["job_id"], settings),
                             c.host_queue(host.name))]
    vm.host_id = None
    transition(session, vm.id, ("building", "pending"), "error", reason=reason, step=step)
    _job(session, event["job_id"], state="failed", step=step, message=reason)
    return []


LIFECYCLE_TO_STATE: dict[str, tuple[tuple[str, ...], str]] = {
    "started": (("stopped", "unknown", "rebooting", "error", "stopping"), "running"),
    "resumed": (("stopped", "unknown"), "running"),
    # Not from `rebooting`: a reboot powers the guest off and on again, and its own
    # vm.action.done (or the `started` that follows) settles the state.
    "stopped": (("running", "ready", "stopping", "unknown"), "stopped"),
    "crashed": (("running", "ready", "unknown"), "error"),
}


def on_lifecycle(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    name = event["data"].get("event", "")
    detail = event["data"].get("detail", "")
    if name == "stopped" and detail == "crashed":
        name = "crashed"
    if name in LIFECYCLE_TO_STATE:
        allowed, to = LIFECYCLE_TO_STATE[name]
        if to == "running":
            to = up_state(session.get(VM, event["vm_id"]))
        reason = "the guest crashed" if to == "error" else ""
        transition(session, event["vm_id"], allowed, to, reason=reason)
    return []


def on_deleted(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    claims.release(session, event["vm_id"])
    ipam.release(session, event["vm_id"])
    vm = session.get(VM, event["vm_id"])
    if vm is not None:
        session.delete(vm)
    _job(session, event["job_id"], state="done", step="")
    return []


def on_delete_failed(session: Session, event: dict[str, Any],
                     settings: Settings) -> list[Outgoing]:
    reason = event["data"].get("reason", "delete failed")
    transition(session, event["vm_id"], ("deleting",), "error", reason=reason, step="delete")
    _job(session, event["job_id"], state="failed", message=reason)
    return []


# -- actions on existing VMs (start, stop, reboot, force_off, resize, snapshots, rebuild) ----


@dataclass(frozen=True)
class ActionRule:
    """When an action may start, and the state a VM shows while it runs."""

    allowed: tuple[str, ...]
    """VM states the action may be asked in (anything else is a 409 naming these)."""
    during: str | None
    """The transitional state set by the request's compare-and-set; None: the VM keeps its
    state (the request still compare-and-sets it, on its version)."""


ACTIONS: dict[str, ActionRule] = {
    "start": ActionRule(("stopped", "error"), None),
    "stop": ActionRule(("running", "ready"), "stopping"),
    "reboot": ActionRule(("running", "ready"), "rebooting"),
    # Also while a clean stop is still waiting for the guest.
    "force_off": ActionRule(("running", "ready", "stopping", "error"), "stopping"),
    "resize": ActionRule(("stopped",), "resizing"),
    "snapshot_create": ActionRule(("running", "ready", "stopped"), "snapshotting"),
    "snapshot_revert": ActionRule(("running", "ready", "stopped"), "snapshotting"),
    "snapshot_delete": ActionRule(("running", "ready", "stopped"), "snapshotting"),
    "rebuild": ActionRule(("running", "ready", "stopped", "error"), "building"),
}
"""Every action a VM accepts after its build, by the name used in the API, the job's kind
and the `action` of ActionPayload."""

CONCURRENT_ACTIONS = frozenset({"force_off"})
"""Actions that may be asked while another action of the VM is still open."""


def action_allowed(action: str, state: str) -> bool:
    """Whether `action` may be asked of a VM in `state` (pure; the request re-checks it with
    a compare-and-set)."""
    rule = ACTIONS.get(action)
    return rule is not None and state in rule.allowed


def not_allowed_message(action: str, state: str) -> str:
    """The 409's message: what the VM is, and which states allow the action."""
    allowed = ACTIONS[action].allowed
    names = " or ".join(f"`{s}`" for s in allowed)
    return f"cannot {action.replace('_', ' ')} a VM that is `{state}`: {action} needs {names}"


BOOTING_ACTIONS = frozenset({"start", "reboot", "rebuild", "snapshot_revert"})
"""Actions after which a running guest is not (yet) `ready` again."""


def settled_state(observed: str, previous: str, action: str = "",
                  booted: bool = False) -> str | None:
    """The VM state for what its host reports after an action: `running` is `ready` when
    cloud-init has finished the VM's first boot (`booted`: a start or a reboot does not
    undo that), or when the VM was ready before and the action did not boot it (or bring
    back another moment); None when the domain is in no state an action ends in."""
    if observed == "running":
        if booted or (previous == "ready" and action not in BOOTING_ACTIONS):
            return "ready"
        return "running"
    if observed == "stopped":
        return "stopped"
    return None


def settle_claim(session: Session, vm_id: str, vcpus: int, memory_mb: int,
                 disk_gb: int) -> bool:
    """Set a VM's claim to exactly this size, giving back (or, for undoing a failed send,
    taking) the difference on its host. Only ever shrinks a claim in the scheduler: a resize
    claims its growth up front, with the compare-and-set on the host's generation
    (web/actionops.py). True if there was a claim."""
    claim = session.scalars(select(Claim).where(Claim.vm_id == vm_id)).first()
    if claim is None:
        return False
    dv, dm, dd = vcpus - claim.vcpus, memory_mb - claim.memory_mb, disk_gb - claim.disk_gb
    if (dv, dm, dd) == (0, 0, 0):
        return True
    session.execute(
        update(Host).where(Host.id == claim.host_id)
        .values(used_vcpus=Host.used_vcpus + dv, used_memory_mb=Host.used_memory_mb + dm,
                used_disk_gb=Host.used_disk_gb + dd, generation=Host.generation + 1)
        .execution_options(synchronize_session=False))
    claim.vcpus, claim.memory_mb, claim.disk_gb = vcpus, memory_mb, disk_gb
    return True


def action_request(session: Session, vm_id: str, job_id: str) -> dict[str, Any]:
    """What the API recorded when it accepted the action (its vm.state event): the action,
    the state before, the arguments. Sizes and names come from here, never from the host."""
    if not job_id:
        return {}
    row = session.scalars(select(Event).where(Event.vm_id == vm_id, Event.job_id == job_id,
                                              Event.type == c.EV_STATE)
                          .order_by(Event.id).limit(1)).first()
    return dict(row.data or {}) if row is not None else {}


def _snapshot_row(session: Session, vm_id: str, name: str) -> Snapshot | None:
    if not name:
        return None
    return session.scalars(select(Snapshot).where(Snapshot.vm_id == vm_id,
                                                  Snapshot.name == name)).first()


def first_boot_done(session: Session, vm: VM, action: str, args: dict[str, Any]) -> bool:
    """Whether the guest the VM runs after `action` has finished its first boot: it had
    (ready_at: a rebuild that replaced the disk has cleared it), and the action did not
    bring back a disk from before that (a snapshot taken before ready_at)."""
    if vm.ready_at is None:
        return False
    if action == "snapshot_revert":
        snap = _snapshot_row(session, vm.id, args.get("name", ""))
        return snap is not None and _aware(snap.created_at) >= _aware(vm.ready_at)
    return True


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def on_action_done(session: Session, event: dict[str, Any],
                   settings: Settings) -> list[Outgoing]:
    vm_id, job_id, d = event["vm_id"], event["job_id"], event["data"]
    req = action_request(session, vm_id, job_id)
    action = req.get("action") or d.get("action", "")
    args = req.get("args") or {}
    rule = ACTIONS.get(action)
    vm = session.get(VM, vm_id)
    if vm is None or rule is None:
        _job(session, job_id, state="done", step="", message=d.get("message", ""))
        return []
    previous = req.get("previous", "")
    if action == "rebuild":
        vm.ready_at, vm.boot_seconds = None, None  # a new disk: its first boot is to come
    to = settled_state(d.get("state", ""), previous, action,
                       booted=first_boot_done(session, vm, action, args))
    expect = (rule.during,) if rule.during else rule.allowed
    if to is None:
        transition(session, vm_id, expect, "error", step=action,
                   reason=f"after {action} the domain is {d.get('state') or 'gone'}")
    else:
        transition(session, vm_id, expect, to)
    if to == "stopped":
        vm.addresses = []  # a stopped guest has none; its host reports them again on start
    if action == "resize":
        vm.vcpus = int(args.get("vcpus", vm.vcpus))
        vm.memory_mb = int(args.get("memory_mb", vm.memory_mb))
        vm.disk_gb = int(args.get("disk_gb", vm.disk_gb))
        settle_claim(session, vm_id, vm.vcpus, vm.memory_mb, vm.disk_gb)
    elif action == "snapshot_create":
        snap = _snapshot_row(session, vm_id, args.get("name", ""))
        if snap is not None:
            snap.state, snap.state_reason = "ready", ""
    elif action == "snapshot_delete":
        session.execute(delete(Snapshot).where(Snapshot.vm_id == vm_id,
                                               Snapshot.name == args.get("name", ""))
                        .execution_options(synchronize_session=False))
    elif action == "rebuild":
        # A new disk: the old one's internal snapshots are gone with it.
        session.execute(delete(Snapshot).where(Snapshot.vm_id == vm_id)
                        .execution_options(synchronize_session=False))
    _job(session, job_id, state="done", step="", message=d.get("message", ""))
    return []


def on_action_failed(session: Session, event: dict[str, Any],
                     settings: Settings) -> list[Outgoing]:
    vm_id, job_id, d = event["vm_id"], event["job_id"], event["data"]
    req = action_request(session, vm_id, job_id)
    action = req.get("action") or d.get("action", "")
    args = req.get("args") or {}
    reason = d.get("reason") or f"{action} failed"
    step = d.get("step") or action
    _job(session, job_id, state="failed", step=step, message=reason)
    rule = ACTIONS.get(action)
    vm = session.get(VM, vm_id)
    if vm is None or rule is None:
        return []
    if action == "rebuild" and d.get("disk_replaced"):
        vm.ready_at, vm.boot_seconds = None, None
    to = settled_state(d.get("state", ""), req.get("previous", ""), action,
                       booted=first_boot_done(session, vm, action, args))
    expect = (rule.during,) if rule.during else rule.allowed
    if to is None:
        transition(session, vm_id, expect, "error", reason=reason, step=step)
    else:
        # The action did not happen; the VM is as its host sees it, the reason on the job.
        transition(session, vm_id, expect, to)
    if action == "resize":
        settle_claim(session, vm_id, vm.vcpus, vm.memory_mb, vm.disk_gb)
    elif action in ("snapshot_create", "snapshot_delete"):
        snap = _snapshot_row(session, vm_id, args.get("name", ""))
        if snap is not None:
            snap.state, snap.state_reason = "error", reason
    elif action == "rebuild" and d.get("disk_replaced"):
        session.execute(delete(Snapshot).where(Snapshot.vm_id == vm_id)
                        .execution_options(synchronize_session=False))
    return []


def on_addresses(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    """A host's view of a VM's IP addresses (DHCP leases, guest agent), sent on change."""
    vm = session.get(VM, event["vm_id"])
    if vm is None or (vm.host is not None and event["host"] and vm.host.name != event["host"]):
        return []  # gone, or a late report from a host the VM has left
    addresses = event["data"].get("addresses")
    if isinstance(addresses, list):
        vm.addresses = [a for a in addresses if isinstance(a, dict)]
    return []


# -- the guest's first boot (cloud-init), seen by its host on the serial console ---------------

GUEST_REASON_LIMIT = 2048
"""The longest guest reason kept as a VM's state_reason."""


def _from_its_host(vm: VM, event: dict[str, Any]) -> bool:
    return vm.host is None or not event.get("host") or vm.host.name == event["host"]


def on_vm_ready(session: Session, event: dict[str, Any], settings: Settings) -> list[Outgoing]:
    """cloud-init finished the first boot: running -> ready, with when and how long it took.
    Ignored for a VM that is gone, not running (stopped, rebuilding, already ready...) or
    on another host now."""
    vm = session.get(VM, event["vm_id"])
    if vm is None or vm.state != "running" or not _from_its_host(vm, event):
        return []
    seconds = event["data"].get("boot_seconds")
    boot = float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) \
        and seconds >= 0 else None
    transition(session, vm.id, ("running",), "ready", ready_at=_parse_ts(event.get("ts", "")),
               boot_seconds=boot)
    return []


def on_guest_failed(session: Session, event: dict[str, Any],
                    settings: Settings) -> list[Outgoing]:
    """cloud-init finished the first boot with errors: running -> error, the guest's own
    messages as the reason (step `cloud-init`). Ignored as vm.ready is."""
    vm = session.get(VM, event["vm_id"])
    if vm is None or vm.state != "running" or not _from_its_host(vm, event):
        return []
    reason = str(event["data"].get("reason") or "cloud-init reported errors")
    transition(session, vm.id, ("running",), "error", step="cloud-init",
               reason=f"cloud-init failed in the guest: {reason}"[:GUEST_REASON_LIMIT])
    return []


def on_ready_timeout(session: Session, event: dict[str, Any],
                     settings: Settings) -> list[Outgoing]:
    """No ready line within ready_timeout: the VM stays `running`, and says why it is not
    `ready` (its state_reason). Ignored as vm.ready is."""
    vm = session.get(VM, event["vm_id"])
    if vm is None or vm.state != "running" or not _from_its_host(vm, event):
        return []
    seconds = event["data"].get("seconds")
    within = f" within {seconds:g} s" if isinstance(seconds, int | float) \
        and not isinstance(seconds, bool) else ""
    transition(session, vm.id, ("running",), "running",
               reason=f"cloud-init printed no ready line on the serial console{within} of "
                      "the start: the image may lack cloud-init or a console on ttyS0")
    return []


HANDLERS = {
    c.EV_HEARTBEAT: on_heartbeat,
    c.EV_BUILD_STEP: on_build_step,
    c.EV_BUILD_DONE: on_build_done,
    c.EV_BUILD_FAILED: on_build_failed,
    c.EV_LIFECYCLE: on_lifecycle,
    c.EV_DELETED: on_deleted,
    c.EV_DELETE_FAILED: on_delete_failed,
    c.EV_ACTION_DONE: on_action_done,
    c.EV_ACTION_FAILED: on_action_failed,
    c.EV_ADDRESSES: on_addresses,
    c.EV_VM_READY: on_vm_ready,
    c.EV_GUEST_FAILED: on_guest_failed,
    c.EV_READY_TIMEOUT: on_ready_timeout,
}


def apply_event(session: Session, event: dict[str, Any],
                settings: Settings) -> tuple[list[Outgoing], Event | None]:
    """Apply one event; heartbeats are not kept in the event log (they would flood it)."""
    handler = HANDLERS.get(event.get("type", ""))
    if handler is None:
        log.warning("ignoring unknown event type %r", event.get("type"))
        return [], None
    vm = session.get(VM, event["vm_id"]) if event.get("vm_id") else None
    project_id = vm.project_id if vm is not None else None
    out = handler(session, event, settings)
    row = None if event["type"] == c.EV_HEARTBEAT else record(session, event, project_id)
    if vm is not None and event["type"] != c.EV_DELETED:
        session.flush()
        session.refresh(vm)
        if row is not None:
            row.data = {**row.data, "state": vm.state}
    return out, row


def mark_silent_hosts_down(session: Session, settings: Settings,
                           now: datetime | None = None) -> list[str]:
    """Hosts that missed `missed_heartbeats` beats go down; their VMs become unknown."""
    now = now or utcnow()
    limit = now - timedelta(seconds=settings.heartbeat_interval * settings.missed_heartbeats)
    down: list[str] = []
    for host in session.scalars(select(Host).where(Host.alive.is_(True))):
        last = host.last_heartbeat
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=UTC)
        if last is None or last < limit:
            host.alive = False
            host.generation = Host.generation + 1  # cached copies of it must lose their CAS
            down.append(host.name)
            record(session, c.make_event(c.EV_HOST_DOWN, host=host.name))
            for vm in session.scalars(select(VM).where(VM.host_id == host.id)):
                if vm.state not in ("deleting", "error", "unknown"):
                    transition(session, vm.id, (vm.state,), "unknown",
                               reason=f"host {host.name} stopped reporting")
                    record(session, c.make_event(c.EV_STATE, host=host.name, vm_id=vm.id,
                                                 state="unknown"), vm.project_id)
    return down
