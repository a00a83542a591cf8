"""What the API does to VMs: create (validate, place, claim, send), delete, and their history.

Owns the request-side half of a VM's life; hosts and the scheduler do the rest from messages
and events. The VM row, its claim, its job and its first event are written in one
transaction; if the build message cannot be sent, all of it is undone.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select
from sqlalchemy.orm import Session

from fleet import contract as c
from fleet import userdata
from fleet.bus import Bus, event_payload
from fleet.config import Settings
from fleet.contract import NAME_RE
from fleet.exceptions import BadRequest, Conflict, NotFound, VirtfleetError
from fleet.store.fast import FastStatement
from fleet.store.models import VM, Event, Image, Job, Network, new_id, utcnow
from fleet.store.session import Store
from scheduler import claims, ipam, quotas
from scheduler.events import build_payload, record
from web.api.groups import find_group
from web.api.images import find_image
from web.api.keypairs import find_keypairs
from web.api.networks import find_network
from web.auth import Principal

log = logging.getLogger(__name__)


class Unavailable(VirtfleetError):
    """The message broker could not take the job (answered 503)."""

    http_status = 503


def random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def get_vm(session: Session, vm_id: str, who: Principal) -> VM:
    """A VM of the caller's project (admins see all); others' VMs are simply not found."""
    vm = session.get(VM, vm_id)
    if vm is None or (not who.is_admin and vm.project_id != who.project_id):
        raise NotFound(f"VM '{vm_id}' not found")
    return vm


def list_vms(session: Session, who: Principal) -> list[VM]:
    q = select(VM).order_by(VM.created_at)
    if not who.is_admin:
        q = q.where(VM.project_id == who.project_id)
    return list(session.scalars(q))


def steps(session: Session, vm_id: str) -> list[dict[str, Any]]:
    """Each state the VM went through, when, and how long it stayed."""
    out: list[dict[str, Any]] = []
    for ev in session.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id)):
        state = (ev.data or {}).get("state")
        if state and (not out or out[-1]["state"] != state):
            out.append({"state": state, "at": ev.ts, "seconds": None})
    for prev, nxt in zip(out, out[1:], strict=False):
        prev["seconds"] = round((nxt["at"] - prev["at"]).total_seconds(), 3)
    return out


@dataclass
class Accepted:
    vms: list[Any]
    """VMView of each VM as written (no session needed to read them)."""
    jobs: list[Job]


class VMView:
    """A VM row just written, read without a session: its columns from the object the
    transaction wrote, and the relationships the build message and the API's answer read
    (project, host, network) from what the create already knew. Re-reading the rows after
    the commit cost more CPU than the write itself."""

    def __init__(self, vm: VM, project: str, host: str | None, network: Any) -> None:
        self._vm = vm
        self.project = SimpleNamespace(name=project)
        self.host = SimpleNamespace(name=host) if host is not None else None
        self.network = network

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vm, name)


def _publish(bus: Bus | None, ev: Event) -> None:
    if bus is not None:
        bus.publish_safely(event_payload(ev))


def vm_names(name: str, count: int) -> list[str]:
    if count == 1:
        return [name]
    names = [f"{name}-{i}" for i in range(1, count + 1)]
    if not NAME_RE.match(names[-1]):
        raise BadRequest(f"'{names[-1]}' would be too long: shorten the name for count={count}")
    return names


_JOB_INSERT = FastStatement(insert(Job), ("id", "vm_id", "project_id", "kind", "state", "step",
                                          "message", "host_name", "created_at", "updated_at"))
_EVENT_INSERT = FastStatement(insert(Event).returning(Event.id),
                              ("ts", "type", "vm_id", "project_id", "job_id", "host_name", "data"))
_IMAGE_STATUS = FastStatement(select(Image.status).where(Image.id == bindparam("image_id")),
                              ("image_id",))
_NAME_TAKEN = FastStatement(select(VM.id).where(VM.project_id == bindparam("project_id"),
                                                VM.name == bindparam("name")).limit(1),
                            ("project_id", "name"))
_NETWORK_HELD = FastStatement(select(Network.id).where(Network.id == bindparam("network_id"))
                              .with_for_update(key_share=True), ("network_id",))
"""A create's statements, compiled once, run on the driver's connection (fleet/store/fast.py):
SQLAlchemy's own work per statement cost more than SQLite's, under the writer lock."""


@dataclass
class _NewVM:
    """One VM of a create as it will be written: every column set in Python (none left to
    the INSERT's defaults), so the rows as written are what the build message and the answer
    read, with no read back. Made before the write transaction; the claim names its host."""

    values: dict[str, Any]
    vm: VM
    job: Job

    def request(self, image_sha256: str) -> claims.Request:
        v = self.values
        return claims.Request(vcpus=v["vcpus"], memory_mb=v["memory_mb"], disk_gb=v["disk_gb"],
                              image_sha256=image_sha256, constraints=v["constraints"])


def _new_vms(names: list[str], who: Principal, data: dict[str, Any], image: Image,
             group: Any, network: Any, address_mode: str, keys: list[Any]) -> list[_NewVM]:
    now = utcnow()
    out = []
    for name in names:
        values: dict[str, Any] = {
            "id": new_id(), "name": name, "project_id": who.project_id,
            "image_id": image.id, "vcpus": data["vcpus"], "memory_mb": data["memory_mb"],
            "disk_gb": data["disk_gb"], "user_data": data["user_data"],
            "state": "building", "state_reason": "", "failed_step": "",
            "constraints": dict(data.get("constraints") or {}),
            "server_group_id": group.id if group else None, "attempts": 0,
            "mac": random_mac(), "addresses": [],
            "network_id": network.id if network else None, "address_mode": address_mode,
            "static_address": "", "keypairs": [k.name for k in keys],
            "ssh_keys": [k.public_key for k in keys], "ready_at": None,
            "boot_seconds": None, "created_at": now, "updated_at": now}
        job = Job(id=new_id(), vm_id=values["id"], project_id=who.project_id, kind="build",
                  state="queued", step="", message="", host_name="", created_at=now,
                  updated_at=now)
        out.append(_NewVM(values, VM(**values), job))
    return out


def _placed(conn: Connection, new: _NewVM, host: str, who: Principal) -> Event:
    """The VM is claimed on `host`: its job and its first event, on the driver's connection."""
    new.job.host_name = host
    job = new.job
    _JOB_INSERT.execute(conn, {k: getattr(job, k) for k in _JOB_INSERT.keys})
    ev = c.make_event(c.EV_STATE, host=host, vm_id=job.vm_id, job_id=job.id, state="building")
    row = Event(type=ev["type"], ts=job.created_at, vm_id=job.vm_id, job_id=job.id,
                host_name=host, project_id=who.project_id, data=ev["data"])
    row.id = _EVENT_INSERT.execute(
        conn, {k: getattr(row, k) for k in _EVENT_INSERT.keys}).fetchone()[0]
    return row


def _check_image(conn: Connection, image: Image) -> None:
    found = _IMAGE_STATUS.execute(conn, {"image_id": image.id}).fetchone()
    if found is None or found[0] != "active":
        raise Conflict(f"image '{image.name}' is "
                       + ("gone" if found is None else f"{found[0]}, not active"))


def _check_names(conn: Connection, project_id: int | None, names: list[str]) -> None:
    for name in names:
        if _NAME_TAKEN.execute(conn, {"project_id": project_id, "name": name}).fetchone():
            raise Conflict(f"a VM named '{name}' already exists in this project")


def _write_plain(store: Store, settings: Settings, who: Principal, new: list[_NewVM],
                 image: Image, network: Any) -> list[Event]:
    """The write transaction of a create with no server group and no static address, the
    common case: a Core transaction (no ORM Session) of precompiled statements. Re-checks
    what a concurrent request could have changed since the reads (the image still active,
    the network still there, the quotas with the project's row locked, the names still
    free), then claims each VM with its row (claims.PlacedRow), job and event."""
    events = []
    with store.transaction() as conn:
        _check_image(conn, image)
        if network is not None and _NETWORK_HELD.execute(
                conn, {"network_id": network.id}).fetchone() is None:
            raise NotFound(f"network '{network.name}' not found")
        v = new[0].values
        quotas.check(conn, who.project_id, vcpus=v["vcpus"], memory_mb=v["memory_mb"],
                     disk_gb=v["disk_gb"], count=len(new))
        # After the quota check, which locked the project's row: on PostgreSQL the creates of
        # one project pass here one at a time, each seeing the names the previous one took.
        _check_names(conn, who.project_id, [n.values["name"] for n in new])
        for n in new:
            placed = claims.claim(conn, n.vm.id, n.request(image.sha256), settings,
                                  row=claims.PlacedRow(VM.__table__, n.values))
            n.vm.host_id, n.vm.alternates = placed.host.id, placed.alternates
            events.append(_placed(conn, n, placed.host.name, who))
    return events


def _write_session(store: Store, settings: Settings, who: Principal, new: list[_NewVM],
                   image: Image, group: Any, network: Any) -> list[Event]:
    """The write transaction of a create in a server group or with static addresses (the
    group's row locked, addresses taken by scheduler.ipam): an ORM Session."""
    events = []
    with store.session() as s:
        conn = s.connection()
        _check_image(conn, image)
        if group is not None:
            group = find_group(s, group.id, who)
        if network is not None:
            network = find_network(s, network.id, lock=True)
        v = new[0].values
        quotas.check(s, who.project_id, vcpus=v["vcpus"], memory_mb=v["memory_mb"],
                     disk_gb=v["disk_gb"], count=len(new))
        _check_names(conn, who.project_id, [n.values["name"] for n in new])
        for n in new:
            vm = n.vm
            req = claims.request_for(s, vm, image.sha256)
            if network is not None and vm.address_mode == "static":
                s.add(vm)
                s.flush()  # the address's row refers to the VM's
                vm.static_address = ipam.allocate(s, network, vm.id)  # 409 when exhausted
                host = claims.place_and_claim(s, vm, req, settings).name
                s.flush()
            else:
                placed = claims.claim(s, vm.id, req, settings,
                                      row=claims.PlacedRow(VM.__table__, n.values))
                vm.host_id, vm.alternates = placed.host.id, placed.alternates
                host = placed.host.name
            events.append(_placed(conn, n, host, who))
    return events


def create_vms(store: Store, settings: Settings, dispatcher: Any, bus: Bus | None,
               who: Principal, data: dict[str, Any]) -> Accepted:
    """Place and claim `count` VMs, all or nothing, then send their builds. A static
    address is taken for each VM (scheduler.ipam) in the same transaction as its row and
    claim: any failure gives everything back.

    What needs no writer lock is done first: the reads (the image, the keypairs, the group
    and network) in a read session, a refusal when no host has room as last committed, and
    the rows made in Python; the write transaction then only re-checks and writes (on SQLite
    every writer of every process waits for it)."""
    names = vm_names(data["name"], data.get("count", 1))
    userdata.validate(data.get("user_data") or "")  # 400 pointing at the line
    address_mode = data.get("address") or "dhcp"
    with store.sessions() as r:
        image = find_image(r, data["image"], who)
        if image.status != "active":
            raise Conflict(f"image '{image.name}' is {image.status}, not active"
                           + (f": {image.status_reason}" if image.status_reason else ""))
        group = find_group(r, data["server_group"], who) if data.get("server_group") else None
        keys = find_keypairs(r, list(data.get("keypairs") or []), who)
        network = find_network(r, data["network"]) if data.get("network") else None
        if address_mode == "static" and network is None:
            raise BadRequest("a static address needs a `network` to take it from",
                             {"address": ["a static address needs a `network`"]})
        new = _new_vms(names, who, data, image, group, network, address_mode, keys)
        if group is None:
            # No host with room as the store last committed it: refused here, without the
            # writer lock (a refusal is as true of that moment as of a later one).
            claims.check_room(r, new[0].request(image.sha256), settings)
    if group is None and address_mode != "static":
        events = _write_plain(store, settings, who, new, image, network)
    else:
        events = _write_session(store, settings, who, new, image, group, network)
    vms = [VMView(n.vm, who.project, n.job.host_name, network) for n in new]
    jobs = [n.job for n in new]
    # The build messages are made after the commit, from the rows as the transaction wrote
    # them (every column is set in Python: nothing to read back): composing user-data is
    # the slowest part of a create, and the store's writer (SQLite: one at a time for every
    # API process and the scheduler) need not wait for it.
    try:
        for vm, job in zip(vms, jobs, strict=True):
            dispatcher.build(job.host_name, build_payload(vm, image, job.id, settings))
    except Exception:
        log.exception("could not send builds")
        with store.session() as s:
            for vm, job in zip(vms, jobs, strict=True):
                claims.release(s, vm.id)
                ipam.release(s, vm.id)
                for row in (s.get(Job, job.id), s.get(VM, vm.id)):
                    if row is not None:
                        s.delete(row)
            # Nor a "building" event in the log for VMs that never were.
            s.execute(delete(Event).where(Event.id.in_([ev.id for ev in events])))
        raise Unavailable("the message broker is not reachable; nothing was created") from None
    for ev in events:
        _publish(bus, ev)
    return Accepted(vms, jobs)


def delete_vm(store: Store, dispatcher: Any, bus: Bus | None, who: Principal,
              vm_id: str) -> Job:
    with store.session() as s:
        vm = get_vm(s, vm_id, who)
        if vm.state == "deleting":
            job = s.scalars(select(Job).where(Job.vm_id == vm.id, Job.kind == "delete")
                            .order_by(Job.created_at.desc())).first()
            if job is not None:
                return job
        host_name = vm.host.name if vm.host else ""
        job = Job(vm_id=vm.id, project_id=vm.project_id, kind="delete", host_name=host_name)
        s.add(job)
        s.flush()
        if not host_name:
            claims.release(s, vm.id)
            ipam.release(s, vm.id)
            s.delete(vm)
            job.state = "done"
            ev = record(s, c.make_event(c.EV_DELETED, vm_id=vm.id, job_id=job.id,
                                        state="deleted"), vm.project_id)
            s.flush()
            _publish(bus, ev)
            return job
        previous = vm.state
        vm.state = "deleting"
        ev = record(s, c.make_event(c.EV_STATE, host=host_name, vm_id=vm.id, job_id=job.id,
                                    state="deleting"), vm.project_id)
        s.flush()
    try:
        dispatcher.delete(host_name, {"vm_id": vm_id, "job_id": job.id})
    except Exception:
        log.exception("could not send the delete of %s", vm_id)
        with store.session() as s:
            row = s.get(VM, vm_id)
            if row is not None:
                row.state = previous
            s.delete(s.get(Job, job.id))
            s.execute(delete(Event).where(Event.id == ev.id))
        raise Unavailable("the message broker is not reachable; the VM was left as it was") \
            from None
    _publish(bus, ev)
    return job


def evacuate(store: Store, settings: Settings, dispatcher: Any, bus: Bus | None,
             host_name: str) -> dict[str, Any]:
    """Disable a host and move off what can move by rebuilding it elsewhere.

    A VM that has never finished building (or failed) has nothing to lose: it is placed
    again on another host and rebuilt. A VM whose disk lives only on this host (it ran
    there) cannot move without losing that disk: it is listed, never destroyed.
    """
    from web.api.hosts import get_host
    moved: list[dict[str, Any]] = []
    not_moved: list[dict[str, Any]] = []
    sends: list[tuple[str, dict[str, Any]]] = []
    with store.session() as s:
        host = get_host(s, host_name)
        host.enabled = False
        host.generation = host.generation + 1
        for vm in s.scalars(select(VM).where(VM.host_id == host.id).order_by(VM.name)):
            if vm.state not in ("pending", "building", "error"):
                not_moved.append({"id": vm.id, "name": vm.name, "state": vm.state,
                                  "reason": "its disk is local to the host"})
                continue
            claims.release(s, vm.id)
            vm.host_id = None
            try:
                new = claims.place_and_claim(s, vm, claims.request_for(s, vm, vm.image.sha256),
                                             settings)
            except Conflict as exc:
                vm.state, vm.state_reason = "error", f"evacuation found no host: {exc}"
                not_moved.append({"id": vm.id, "name": vm.name, "state": vm.state,
                                  "reason": str(exc)})
                continue
            vm.state, vm.state_reason, vm.failed_step = "building", "", ""
            vm.ready_at, vm.boot_seconds = None, None  # a new disk: a new first boot
            job = Job(vm_id=vm.id, project_id=vm.project_id, kind="build", host_name=new.name)
            s.add(job)
            s.flush()
            record(s, c.make_event(c.EV_STATE, host=new.name, vm_id=vm.id, job_id=job.id,
                                   state="building", evacuated_from=host_name), vm.project_id)
            sends.append((new.name, build_payload(vm, vm.image, job.id, settings)))
            moved.append({"id": vm.id, "name": vm.name, "to": new.name})
    for target, payload in sends:
        dispatcher.build(target, payload)
    return {"host": host_name, "moved": moved, "not_moved": not_moved}
