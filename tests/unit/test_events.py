"""Events from hosts applied to a migrated SQLite store: hosts, builds, reschedules, lifecycle,
deletes, and hosts that fall silent and come back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from fleet import contract as c
from fleet.config import Settings
from fleet.store.migrate import upgrade
from fleet.store.models import VM, Claim, Event, Host, Image, Job, Project, utcnow
from fleet.store.session import Store
from scheduler import claims
from scheduler.events import MAX_ATTEMPTS, apply_event, mark_silent_hosts_down
from scheduler.placement import Request

SETTINGS = Settings(host_name="controller", public_url="http://ctl.example:8080",
                    heartbeat_interval=5.0, missed_heartbeats=3)
SHA = "cd" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    s = Store(url)
    with s.session() as session:
        project = Project(name="p1")
        session.add(project)
        session.flush()
        session.add(Image(id="img-1", name="base", project_id=project.id, sha256=SHA,
                          size_bytes=1234))
    yield s
    s.dispose()


def apply(store: Store, event: dict[str, Any]) -> tuple[list[Any], dict[str, Any] | None]:
    with store.session() as s:
        out, row = apply_event(s, event, SETTINGS)
        s.flush()
        seen = None if row is None else {"id": row.id, "type": row.type, "data": dict(row.data),
                                         "project_id": row.project_id}
    return out, seen


def heartbeat(name: str, **data: Any) -> dict[str, Any]:
    values = {"arch": "x86_64", "virt_type": "qemu", "vcpus": 4, "memory_mb": 4096,
              "disk_gb": 100, "load": 0.5, "cached_images": [], "domains": {}}
    values.update(data)
    return c.make_event(c.EV_HEARTBEAT, host=name, **values)


def add_hosts(store: Store, *specs: tuple[str, int]) -> None:
    """Hosts registered by their first heartbeat; memory decides their ranking."""
    for name, memory_mb in specs:
        apply(store, heartbeat(name, memory_mb=memory_mb))


def building_vm(store: Store, name: str = "vm1") -> tuple[str, str]:
    """A VM as the API leaves it: placed, claimed, `building`, with a queued build job."""
    with store.session() as s:
        project = s.scalars(select(Project)).one()
        vm = VM(name=name, project_id=project.id, image_id="img-1", vcpus=1, memory_mb=512,
                disk_gb=2, state="pending")
        s.add(vm)
        s.flush()
        host = claims.place_and_claim(s, vm, Request(vcpus=1, memory_mb=512, disk_gb=2),
                                      SETTINGS)
        vm.state = "building"
        job = Job(vm_id=vm.id, project_id=project.id, kind="build", host_name=host.name)
        s.add(job)
        s.flush()
        return vm.id, job.id


def vm_row(store: Store, vm_id: str) -> VM | None:
    with store.sessions() as s:
        vm = s.get(VM, vm_id)
        if vm is not None:
            _ = vm.host
            s.expunge_all()
        return vm


def host_row(store: Store, name: str) -> Host:
    with store.sessions() as s:
        host = s.scalars(select(Host).where(Host.name == name)).one()
        s.expunge(host)
        return host


def job_row(store: Store, job_id: str) -> Job:
    with store.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def claim_hosts(store: Store) -> dict[str, str]:
    with store.sessions() as s:
        return {cl.vm_id: s.get(Host, cl.host_id).name for cl in s.scalars(select(Claim))}


def used(store: Store, name: str) -> tuple[int, int, int]:
    h = host_row(store, name)
    return h.used_vcpus, h.used_memory_mb, h.used_disk_gb


# -- heartbeats ---------------------------------------------------------------------------


def test_heartbeat_registers_a_host(store: Store) -> None:
    out, row = apply(store, heartbeat("node1", vcpus=8, memory_mb=16384, disk_gb=200,
                                      cached_images=[SHA]))
    assert out == [] and row is None  # heartbeats are not kept in the event log
    host = host_row(store, "node1")
    assert (host.vcpus, host.memory_mb, host.disk_gb) == (8, 16384, 200)
    assert host.alive and host.enabled and not host.maintenance
    assert host.cached_images == [SHA]
    assert host.last_heartbeat is not None
    assert (host.used_vcpus, host.used_memory_mb, host.used_disk_gb) == (0, 0, 0)


def test_heartbeat_updates_a_host_and_moves_its_generation_on_capacity_change(
        store: Store) -> None:
    apply(store, heartbeat("node1"))
    first = host_row(store, "node1")
    apply(store, heartbeat("node1", load=2.0))  # same capacity
    same = host_row(store, "node1")
    assert same.load == 2.0
    assert same.generation == first.generation
    assert same.last_heartbeat >= first.last_heartbeat
    apply(store, heartbeat("node1", memory_mb=2048))  # the host lost memory
    changed = host_row(store, "node1")
    assert changed.memory_mb == 2048
    assert changed.generation == first.generation + 1
    with store.sessions() as s:
        assert len(s.scalars(select(Host)).all()) == 1


# -- builds -------------------------------------------------------------------------------


def test_build_steps_then_done(store: Store) -> None:
    add_hosts(store, ("node1", 4096))
    vm_id, job_id = building_vm(store)

    out, row = apply(store, c.make_event(c.EV_BUILD_STEP, host="node1", vm_id=vm_id,
                                         job_id=job_id, step="overlay"))
    assert out == []
    job = job_row(store, job_id)
    assert (job.state, job.step, job.host_name) == ("running", "overlay", "node1")
    assert row is not None and row["data"]["state"] == "building"
    assert vm_row(store, vm_id).state == "building"

    out, row = apply(store, c.make_event(c.EV_BUILD_DONE, host="node1", vm_id=vm_id,
                                         job_id=job_id, state="running"))
    assert out == []
    vm = vm_row(store, vm_id)
    assert vm.state == "running" and vm.host.name == "node1"
    job = job_row(store, job_id)
    assert (job.state, job.step) == ("done", "")
    assert row is not None and row["type"] == c.EV_BUILD_DONE
    assert row["data"]["state"] == "running" and row["project_id"] == vm.project_id
    assert claim_hosts(store) == {vm_id: "node1"}  # a running VM keeps its claim

    # A late step event must not reopen a finished job.
    apply(store, c.make_event(c.EV_BUILD_STEP, host="node1", vm_id=vm_id, job_id=job_id,
                              step="start"))
    assert job_row(store, job_id).state == "done"


def test_build_failed_with_an_alternate_reschedules_there(store: Store) -> None:
    add_hosts(store, ("big", 8192), ("small", 4096))
    vm_id, job_id = building_vm(store)
    assert vm_row(store, vm_id).host.name == "big"
    assert vm_row(store, vm_id).alternates == ["small"]

    out, row = apply(store, c.make_event(c.EV_BUILD_FAILED, host="big", vm_id=vm_id,
                                         job_id=job_id, step="start",
                                         reason="domain did not start"))
    assert len(out) == 1
    msg = out[0]
    assert msg.task == c.TASK_BUILD_VM
    assert msg.queue == "host.small"
    assert msg.payload["vm"]["id"] == vm_id
    assert msg.payload["job_id"] == job_id
    assert msg.payload["attempt"] == 1
    assert msg.payload["image"]["sha256"] == SHA
    assert msg.payload["image"]["url"] == "http://ctl.example:8080/api/v1/images/img-1/data"

    vm = vm_row(store, vm_id)
    assert vm.state == "building" and vm.host.name == "small"
    assert vm.attempts == 1 and vm.alternates == []
    assert claim_hosts(store) == {vm_id: "small"}
    assert used(store, "big") == (0, 0, 0)  # the failed host's claim was given back
    assert used(store, "small") == (1, 512, 2)
    job = job_row(store, job_id)
    assert job.state == "queued" and job.host_name == "small"
    assert "big" in job.message and "domain did not start" in job.message
    assert row is not None and row["data"]["state"] == "building"


def test_build_failed_without_alternates_goes_to_error(store: Store) -> None:
    add_hosts(store, ("node1", 4096))
    vm_id, job_id = building_vm(store)
    out, row = apply(store, c.make_event(c.EV_BUILD_FAILED, host="node1", vm_id=vm_id,
                                         job_id=job_id, step="image",
                                         reason="image checksum mismatch"))
    assert out == []
    vm = vm_row(store, vm_id)
    assert vm.state == "error"
    assert vm.state_reason == "image checksum mismatch"
    assert vm.failed_step == "image"
    assert vm.host_id is None
    assert claim_hosts(store) == {}
    assert used(store, "node1") == (0, 0, 0)
    job = job_row(store, job_id)
    assert (job.state, job.step, job.message) == ("failed", "image", "image checksum mismatch")
    assert row is not None and row["data"]["state"] == "error"


def test_build_failed_when_the_alternate_has_no_room_goes_to_error(store: Store) -> None:
    add_hosts(store, ("big", 8192), ("small", 4096))
    vm_id, job_id = building_vm(store)
    with store.session() as s:  # the alternate filled up meanwhile
        s.execute(update(Host).where(Host.name == "small").values(used_memory_mb=4096))
    out, _ = apply(store, c.make_event(c.EV_BUILD_FAILED, host="big", vm_id=vm_id,
                                       job_id=job_id, step="define", reason="bad xml"))
    assert out == []
    vm = vm_row(store, vm_id)
    assert (vm.state, vm.failed_step, vm.state_reason) == ("error", "define", "bad xml")
    assert claim_hosts(store) == {}
    assert used(store, "big") == (0, 0, 0)
    assert job_row(store, job_id).state == "failed"


def test_build_gives_up_after_max_attempts(store: Store) -> None:
    add_hosts(store, ("a", 8192), ("b", 6144), ("c", 4096), ("d", 2048))
    vm_id, job_id = building_vm(store)
    queues = []
    for failing in ("a", "b", "c"):
        out, _ = apply(store, c.make_event(c.EV_BUILD_FAILED, host=failing, vm_id=vm_id,
                                           job_id=job_id, step="start", reason="no"))
        queues += [m.queue for m in out]
    assert queues == ["host.b", "host.c"]  # three attempts in all, then error
    vm = vm_row(store, vm_id)
    assert vm.state == "error" and vm.attempts == MAX_ATTEMPTS - 1
    assert claim_hosts(store) == {}
    assert [used(store, n) for n in ("a", "b", "c", "d")] == [(0, 0, 0)] * 4
    assert job_row(store, job_id).state == "failed"


def test_a_late_failure_from_the_previous_host_is_ignored(store: Store) -> None:
    add_hosts(store, ("big", 8192), ("small", 4096))
    vm_id, job_id = building_vm(store)
    failure = c.make_event(c.EV_BUILD_FAILED, host="big", vm_id=vm_id, job_id=job_id,
                           step="start", reason="domain did not start")
    out, _ = apply(store, failure)
    assert [m.queue for m in out] == ["host.small"]
    out, _ = apply(store, failure)  # delivered again
    assert out == []
    vm = vm_row(store, vm_id)
    assert vm.state == "building" and vm.host.name == "small"
    assert claim_hosts(store) == {vm_id: "small"}
    assert used(store, "small") == (1, 512, 2)
    assert job_row(store, job_id).state == "queued"


# -- lifecycle ----------------------------------------------------------------------------


def lifecycle(vm_id: str, event: str, detail: str = "") -> dict[str, Any]:
    return c.make_event(c.EV_LIFECYCLE, host="node1", vm_id=vm_id, event=event, detail=detail)


def test_lifecycle_transitions(store: Store) -> None:
    add_hosts(store, ("node1", 4096))
    vm_id, job_id = building_vm(store)

    apply(store, lifecycle(vm_id, "started", "booted"))  # during the build: not a transition
    assert vm_row(store, vm_id).state == "building"
    apply(store, c.make_event(c.EV_BUILD_DONE, host="node1", vm_id=vm_id, job_id=job_id))
    assert vm_row(store, vm_id).state == "running"

    _, row = apply(store, lifecycle(vm_id, "stopped", "shutdown"))  # shut down from inside
    assert vm_row(store, vm_id).state == "stopped"
    assert row is not None and row["data"]["state"] == "stopped"

    apply(store, lifecycle(vm_id, "started", "booted"))
    assert vm_row(store, vm_id).state == "running"

    apply(store, lifecycle(vm_id, "stopped", "crashed"))
    vm = vm_row(store, vm_id)
    assert vm.state == "error" and vm.state_reason == "the guest crashed"

    apply(store, lifecycle(vm_id, "started", "booted"))  # restarted after the crash
    vm = vm_row(store, vm_id)
    assert vm.state == "running" and vm.state_reason == ""

    apply(store, lifecycle(vm_id, "crashed", "panicked"))
    assert vm_row(store, vm_id).state == "error"

    apply(store, lifecycle(vm_id, "defined", "updated"))  # not a state change
    assert vm_row(store, vm_id).state == "error"
    assert claim_hosts(store) == {vm_id: "node1"}


def test_steps_are_recorded_with_timestamps(store: Store) -> None:
    add_hosts(store, ("node1", 4096))
    vm_id, job_id = building_vm(store)
    apply(store, c.make_event(c.EV_BUILD_DONE, host="node1", vm_id=vm_id, job_id=job_id))
    apply(store, lifecycle(vm_id, "stopped", "shutdown"))
    with store.sessions() as s:
        rows = s.scalars(select(Event).where(Event.vm_id == vm_id).order_by(Event.id)).all()
    assert [(r.type, r.data.get("state")) for r in rows] == [
        (c.EV_BUILD_DONE, "running"), (c.EV_LIFECYCLE, "stopped")]
    assert all(r.ts is not None for r in rows)


# -- delete -------------------------------------------------------------------------------


def test_deleted_removes_the_vm_and_its_claim(store: Store) -> None:
    add_hosts(store, ("node1", 4096))
    vm_id, _ = building_vm(store)
    apply(store, c.make_event(c.EV_BUILD_DONE, host="node1", vm_id=vm_id))
    with store.session() as s:
        project_id = s.get(VM, vm_id).project_id
        s.get(VM, vm_id).state = "deleting"
        job = Job(vm_id=vm_id, project_id=project_id, kind="delete", host_name="node1")
        s.add(job)
        s.flush()
        delete_job = job.id
    out, row = apply(store, c.make_event(c.EV_DELETED, host="node1", vm_id=vm_id,
                                         job_id=delete_job, state="deleted"))
    assert out == []
    assert vm_row(store, vm_id) is None
    assert claim_hosts(store) == {}
    assert used(store, "node1") == (0, 0, 0)
    assert job_row(store, delete_job).state == "done"
    assert row is not None and row["project_id"] == project_id  # the tenant still sees it
    # Delivered twice: nothing more to do, nothing breaks.
    out, _ = apply(store, c.make_event(c.EV_DELETED, host="node1", vm_id=vm_id,
                                       job_id=delete_job, state="deleted"))
    assert out == [] and used(store, "node1") == (0, 0, 0)


def test_delete_failed_goes_to_error(store: Store) -> None:
    add_hosts(store, ("node1", 4096))
    vm_id, _ = building_vm(store)
    with store.session() as s:
        s.get(VM, vm_id).state = "deleting"
    apply(store, c.make_event(c.EV_DELETE_FAILED, host="node1", vm_id=vm_id,
                              reason="disk busy"))
    vm = vm_row(store, vm_id)
    assert (vm.state, vm.state_reason, vm.failed_step) == ("error", "disk busy", "delete")
    assert claim_hosts(store) == {vm_id: "node1"}  # still on the host: still counted


def test_unknown_event_type_is_ignored(store: Store) -> None:
    assert apply(store, {"type": "vm.teleported", "vm_id": "x", "data": {}}) == ([], None)


# -- silent hosts -------------------------------------------------------------------------


def test_silent_host_goes_down_and_comes_back(store: Store) -> None:
    add_hosts(store, ("node1", 8192), ("node2", 4096))
    running_id, job_id = building_vm(store, "vm-running")
    apply(store, c.make_event(c.EV_BUILD_DONE, host="node1", vm_id=running_id, job_id=job_id))
    gone_id, _ = building_vm(store, "vm-gone")
    with store.session() as s:  # both on node1, node2 stays empty
        assert s.get(VM, gone_id).host.name == "node1"
        s.get(VM, gone_id).state = "running"

    # node2 keeps beating; node1 falls silent for longer than 3 x 5 s.
    later = utcnow() + timedelta(seconds=16)
    with store.session() as s:
        s.execute(update(Host).where(Host.name == "node2").values(last_heartbeat=later))
    with store.session() as s:
        assert mark_silent_hosts_down(s, SETTINGS, now=later) == ["node1"]
    assert not host_row(store, "node1").alive
    assert host_row(store, "node2").alive
    for vm_id in (running_id, gone_id):
        vm = vm_row(store, vm_id)
        assert vm.state == "unknown"
        assert "node1" in vm.state_reason
        assert vm.host.name == "node1"  # never silently deleted
    assert claim_hosts(store) == {running_id: "node1", gone_id: "node1"}
    with store.sessions() as s:
        types = [(e.type, e.host_name, e.vm_id, e.data.get("state"))
                 for e in s.scalars(select(Event).order_by(Event.id))]
    assert (c.EV_HOST_DOWN, "node1", "", None) in types
    assert (c.EV_STATE, "node1", running_id, "unknown") in types
    # A second check does not report it again.
    with store.session() as s:
        assert mark_silent_hosts_down(s, SETTINGS, now=later) == []

    # A down host takes no new VMs.
    with store.session() as s:
        with pytest.raises(claims.NoValidHost):
            vm = VM(name="vm-new", project_id=s.scalars(select(Project)).one().id,
                    image_id="img-1", vcpus=1, memory_mb=8000, disk_gb=1)
            s.add(vm)
            s.flush()
            claims.place_and_claim(s, vm, Request(vcpus=1, memory_mb=8000, disk_gb=1),
                                   SETTINGS)

    # node1 reports again, listing only one of its VMs.
    apply(store, heartbeat("node1", memory_mb=8192, domains={running_id: "running"}))
    assert host_row(store, "node1").alive
    vm = vm_row(store, running_id)
    assert vm.state == "running" and vm.state_reason == "host reported again"
    assert vm_row(store, gone_id).state == "unknown"  # not reported: still unknown
    with store.sessions() as s:
        assert s.scalars(select(Event).where(Event.type == c.EV_HOST_UP,
                                             Event.host_name == "node1")).first() is not None

    apply(store, heartbeat("node1", memory_mb=8192,
                           domains={running_id: "running", gone_id: "shutoff"}))
    assert vm_row(store, gone_id).state == "stopped"


def test_host_never_heard_from_goes_down(store: Store) -> None:
    with store.session() as s:
        s.add(Host(name="ghost", labels={}, cached_images=[]))
    with store.session() as s:
        assert mark_silent_hosts_down(s, SETTINGS) == ["ghost"]


def test_vms_in_error_or_deleting_stay_as_they_are_when_the_host_goes_down(
        store: Store) -> None:
    add_hosts(store, ("node1", 8192))
    broken, _ = building_vm(store, "broken")
    leaving, _ = building_vm(store, "leaving")
    with store.session() as s:
        s.get(VM, broken).state = "error"
        s.get(VM, leaving).state = "deleting"
    with store.session() as s:
        assert mark_silent_hosts_down(s, SETTINGS, now=utcnow() + timedelta(minutes=1)) == \
            ["node1"]
    assert vm_row(store, broken).state == "error"
    assert vm_row(store, leaving).state == "deleting"
