"""What the API does to a VM after its build: actions (start, stop, reboot, force_off,
resize, snapshot_create/revert/delete, rebuild) and its snapshot list.

Owns the request-side half of an action: whether it fits the VM's state (the rules are
scheduler.events.ACTIONS, shared with the scheduler that settles actions), the
compare-and-set that moves the VM into its transitional state, a resize's growth claimed on
its host with the compare-and-set on the host's generation, the snapshot row, the job, the
first event (it records the action, the state before and the arguments, which the scheduler
reads back), and the message to the host. The VM changes, the job and the event are written
in one transaction; if the message cannot be sent, all of it is undone (503).

Must not: reach hosts other than through the dispatcher, or settle an action: the scheduler
does that from the host's vm.action.done / vm.action.failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from fleet import contract as c
from fleet.bus import Bus
from fleet.config import Settings
from fleet.exceptions import BadRequest, Conflict, NotFound
from fleet.store.models import VM, Claim, Event, Host, Job, Project, Snapshot, utcnow
from fleet.store.session import Store
from scheduler import quotas
from scheduler.events import (
    ACTIONS,
    CONCURRENT_ACTIONS,
    action_allowed,
    build_payload,
    not_allowed_message,
    record,
    settle_claim,
)
from web.auth import Principal
from web.vmops import Unavailable, _publish, get_vm

log = logging.getLogger(__name__)

CAS_ROUNDS = 5
"""Times a resize re-reads its host after losing the compare-and-set on its generation."""

Undo = Callable[[Session], None]


def check_allowed(action: str, state: str) -> None:
    """Raise the 409 (naming the states that allow it) if `action` does not fit `state`."""
    if action not in ACTIONS:
        raise BadRequest(f"unknown action '{action}'")
    if not action_allowed(action, state):
        raise Conflict(not_allowed_message(action, state),
                       {"state": state, "allowed": list(ACTIONS[action].allowed)})


def open_action(session: Session, vm_id: str, settings: Settings) -> Job | None:
    """The VM's action still queued or running on its host, if any. A job older than the
    broker's visibility timeout (twice the task time limit) no longer counts: its message
    was lost, and it must not block the VM for ever."""
    since = utcnow() - timedelta(seconds=settings.task_time_limit * 2)
    return session.scalars(
        select(Job).where(Job.vm_id == vm_id, Job.kind.in_(tuple(ACTIONS)),
                          Job.state.in_(("queued", "running")), Job.created_at >= since)
        .order_by(Job.created_at)).first()


def compare_and_set(session: Session, vm: VM, allowed: tuple[str, ...], to: str) -> bool:
    """Move the VM to `to` only if it is still in one of `allowed` states and unchanged
    since it was read (its `updated_at`): of two concurrent requests only one wins, even
    for an action that keeps the VM's state (start)."""
    res = session.execute(
        update(VM).where(VM.id == vm.id, VM.state.in_(allowed),
                         VM.updated_at == vm.updated_at)
        .values(state=to, state_reason="", failed_step="", updated_at=utcnow())
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


# -- capacity -------------------------------------------------------------------------------


def _free(host: Host, settings: Settings) -> dict[str, float]:
    """Free capacity after the allocation ratios (the rule of scheduler.claims.snapshot)."""
    return {
        "vcpus": host.vcpus * (host.cpu_ratio or settings.cpu_allocation_ratio)
        - host.used_vcpus,
        "memory_mb": host.memory_mb * (host.ram_ratio or settings.ram_allocation_ratio)
        - host.used_memory_mb,
        "disk_gb": host.disk_gb * (host.disk_ratio or settings.disk_allocation_ratio)
        - host.used_disk_gb,
    }


def grow_claim(session: Session, settings: Settings, vm: VM, *, vcpus: int, memory_mb: int,
               disk_gb: int) -> tuple[int, int, int]:
    """Take what a resize adds on the VM's host before it is sent: the claim becomes the
    larger of its size and the new one in each resource, with a compare-and-set on the
    host's generation (a lost race re-reads the host). Nothing is given back here: the
    scheduler sets the claim to the new size when the resize is done, or back when it
    failed. Returns the claim's size before; raises Conflict when the host has no room."""
    claim = session.scalars(select(Claim).where(Claim.vm_id == vm.id)).first()
    if claim is None:
        raise Conflict("the VM holds no capacity on a host, so it cannot be resized")
    before = (claim.vcpus, claim.memory_mb, claim.disk_gb)
    want = (max(vcpus, claim.vcpus), max(memory_mb, claim.memory_mb),
            max(disk_gb, claim.disk_gb))
    delta = dict(zip(("vcpus", "memory_mb", "disk_gb"),
                     (w - b for w, b in zip(want, before, strict=True)), strict=True))
    if not any(delta.values()):
        return before
    for _ in range(CAS_ROUNDS):
        host = session.get(Host, claim.host_id, populate_existing=True)
        assert host is not None
        free = _free(host, settings)
        short = {name: {"more": need, "free": max(0.0, free[name])}
                 for name, need in delta.items() if need > 0 and free[name] < need}
        if short:
            detail = "; ".join(f"{name} +{v['more']} but {v['free']:g} free"
                               for name, v in short.items())
            raise Conflict(f"host {host.name} has no room to grow this VM ({detail})",
                           {"host": host.name, "short": short})
        res = session.execute(
            update(Host).where(Host.id == host.id, Host.generation == host.generation)
            .values(used_vcpus=Host.used_vcpus + delta["vcpus"],
                    used_memory_mb=Host.used_memory_mb + delta["memory_mb"],
                    used_disk_gb=Host.used_disk_gb + delta["disk_gb"],
                    generation=Host.generation + 1)
            .execution_options(synchronize_session=False))
        if res.rowcount == 1:
            claim.vcpus, claim.memory_mb, claim.disk_gb = want
            session.flush()
            return before
    raise Conflict(f"host {host.name} kept changing while this resize was claimed; "
                   "try again")


def check_quota_growth(session: Session, project_id: int, grow: dict[str, int]) -> None:
    """Raise QuotaExceeded if growing one VM by `grow` takes its project above a quota
    (scheduler.quotas.check counts whole new VMs; a resize adds no instance)."""
    project = session.scalars(select(Project).where(Project.id == project_id)
                              .with_for_update()).one()
    used = quotas.usage(session, project_id)
    over = {}
    for attr, name in quotas.LIMITS:
        limit = getattr(project, attr)
        if name in grow and grow[name] > 0 and limit is not None \
                and used[name] + grow[name] > limit:
            over[name] = {"limit": limit, "used": used[name], "requested": grow[name]}
    if over:
        raise quotas.QuotaExceeded(f"project quota exceeded for {', '.join(over)}",
                                   {"quota": over})


# -- per-action preparation ------------------------------------------------------------------


@dataclass
class Prepared:
    """What an action records (`args`, read back by the scheduler), what it sends (`send`)
    and how to take back its store changes if the message cannot be sent."""

    args: dict[str, Any]
    send: dict[str, Any]
    undo: list[Undo] = field(default_factory=list)


def _snapshot(session: Session, vm_id: str, name: str) -> Snapshot | None:
    return session.scalars(select(Snapshot).where(Snapshot.vm_id == vm_id,
                                                  Snapshot.name == name)).first()


def _prepare_resize(s: Session, settings: Settings, vm: VM, args: dict[str, Any]) -> Prepared:
    want = {"vcpus": int(args.get("vcpus", vm.vcpus)),
            "memory_mb": int(args.get("memory_mb", vm.memory_mb)),
            "disk_gb": int(args.get("disk_gb", vm.disk_gb))}
    if want["disk_gb"] < vm.disk_gb:
        raise Conflict(f"a disk can only grow: this VM's disk is {vm.disk_gb} GiB and "
                       f"{want['disk_gb']} GiB was asked (shrinking would cut off the guest's "
                       f"data)", {"disk_gb": {"current": vm.disk_gb,
                                              "requested": want["disk_gb"]}})
    snaps = s.scalars(select(Snapshot.name).where(Snapshot.vm_id == vm.id)
                      .order_by(Snapshot.created_at)).all()
    if snaps:
        raise Conflict("resize needs a VM without snapshots (reverting to one would bring "
                       "back its old size): delete " + ", ".join(snaps) + " first",
                       {"snapshots": list(snaps)})
    grow = {k: max(0, want[k] - getattr(vm, k)) for k in want}
    if any(grow.values()):
        check_quota_growth(s, vm.project_id, grow)
    before = grow_claim(s, settings, vm, **want)
    vm_id = vm.id
    return Prepared(args=want, send=dict(want),
                    undo=[lambda s2: settle_claim(s2, vm_id, *before)])


def _prepare_snapshot(s: Session, vm: VM, action: str, args: dict[str, Any]) -> Prepared:
    name = args["name"]
    snap = _snapshot(s, vm.id, name)
    vm_id = vm.id
    if action == "snapshot_create":
        if snap is not None and snap.state != "error":
            raise Conflict(f"VM '{vm.name}' already has a snapshot named '{name}' "
                           f"({snap.state})")
        if snap is not None:
            s.delete(snap)  # a failed attempt's row: this one replaces it
            s.flush()
        s.add(Snapshot(vm_id=vm.id, name=name, state="creating"))
        s.flush()

        def undo_create(s2: Session) -> None:
            s2.execute(delete(Snapshot).where(Snapshot.vm_id == vm_id, Snapshot.name == name))
        return Prepared(args={"name": name}, send={"name": name}, undo=[undo_create])
    if snap is None:
        raise NotFound(f"VM '{vm.name}' has no snapshot named '{name}'")
    if action == "snapshot_revert":
        if snap.state != "ready":
            raise Conflict(f"snapshot '{name}' is {snap.state}: only a ready snapshot can "
                           "be reverted to")
        return Prepared(args={"name": name}, send={"name": name})
    if snap.state not in ("ready", "error"):
        raise Conflict(f"snapshot '{name}' is {snap.state}: only a ready (or failed) "
                       "snapshot can be deleted")
    was = snap.state
    snap.state, snap.state_reason = "deleting", ""

    def undo_delete(s2: Session) -> None:
        s2.execute(update(Snapshot).where(Snapshot.vm_id == vm_id, Snapshot.name == name)
                   .values(state=was))
    return Prepared(args={"name": name}, send={"name": name}, undo=[undo_delete])


def _prepare(s: Session, settings: Settings, vm: VM, action: str, args: dict[str, Any],
             job_id: str) -> Prepared:
    if action == "resize":
        return _prepare_resize(s, settings, vm, args)
    if action.startswith("snapshot_"):
        return _prepare_snapshot(s, vm, action, args)
    if action == "rebuild":
        if vm.image.status != "active":
            raise Conflict(f"image '{vm.image.name}' is {vm.image.status}, not active: the VM "
                           "cannot be rebuilt from it")
        payload = build_payload(vm, vm.image, job_id, settings)
        return Prepared(args={}, send={"vm": payload["vm"], "image": payload["image"]})
    if action in ("stop", "reboot"):
        send = {"timeout": int(args.get("timeout", 60))}
        if action == "reboot":
            send["hard"] = bool(args.get("hard", False))
        return Prepared(args=dict(send), send=send)
    return Prepared(args={}, send={})


# -- the request ---------------------------------------------------------------------------


def request_action(store: Store, settings: Settings, dispatcher: Any, bus: Bus | None,
                   who: Principal, vm_id: str, action: str, args: dict[str, Any]) -> Job:
    """Accept `action` on the caller's VM and send it to its host; the job comes back."""
    with store.session() as s:
        vm = get_vm(s, vm_id, who)
        check_allowed(action, vm.state)
        if vm.host is None:
            raise Conflict(f"VM '{vm.name}' has no host, so it cannot {action}")
        if action not in CONCURRENT_ACTIONS:
            busy = open_action(s, vm.id, settings)
            if busy is not None:
                raise Conflict(f"VM '{vm.name}' is still doing {busy.kind} (job {busy.id}); "
                               "ask again when it is done", {"job": busy.id})
        host_name, previous = vm.host.name, vm.state
        rule = ACTIONS[action]
        to = rule.during or vm.state
        job = Job(vm_id=vm.id, project_id=vm.project_id, kind=action, host_name=host_name)
        s.add(job)
        s.flush()
        prepared = _prepare(s, settings, vm, action, args, job.id)
        if not compare_and_set(s, vm, rule.allowed, to):
            s.refresh(vm)
            raise Conflict(f"VM '{vm.name}' changed meanwhile (it is `{vm.state}` now); "
                           "try again", {"state": vm.state})
        ev = record(s, c.make_event(c.EV_STATE, host=host_name, vm_id=vm.id, job_id=job.id,
                                    state=to, action=action, previous=previous,
                                    args=prepared.args), vm.project_id)
        s.flush()
        payload = {"vm_id": vm.id, "job_id": job.id, "action": action, "args": prepared.send}
        s.refresh(job)
    try:
        dispatcher.action(host_name, payload)
    except Exception:
        log.exception("could not send %s of %s", action, vm_id)
        with store.session() as s:
            s.execute(update(VM).where(VM.id == vm_id, VM.state == to)
                      .values(state=previous, updated_at=utcnow())
                      .execution_options(synchronize_session=False))
            for undo in prepared.undo:
                undo(s)
            s.execute(delete(Job).where(Job.id == job.id))
            s.execute(delete(Event).where(Event.id == ev.id))
        raise Unavailable("the message broker is not reachable; the VM was left as it was") \
            from None
    _publish(bus, ev)
    return job


def list_snapshots(session: Session, who: Principal, vm_id: str) -> list[Snapshot]:
    vm = get_vm(session, vm_id, who)
    return list(session.scalars(select(Snapshot).where(Snapshot.vm_id == vm.id)
                                .order_by(Snapshot.created_at)))


def get_snapshot(session: Session, who: Principal, vm_id: str, name: str) -> Snapshot:
    vm = get_vm(session, vm_id, who)
    snap = _snapshot(session, vm.id, name)
    if snap is None:
        raise NotFound(f"VM '{vm.name}' has no snapshot named '{name}'")
    return snap
