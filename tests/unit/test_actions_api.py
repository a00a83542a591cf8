"""Actions and snapshots through the REST API (Flask's test client, a recording dispatcher)
and their settlement by the scheduler's event handlers, on a migrated SQLite store: the
409s, the transitional states, the claim of a resize, snapshot rows, tenancy, addresses, and
that a message that cannot be sent leaves nothing behind."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fleet import contract as c
from fleet.config import Settings, load_settings
from fleet.store.models import VM, Claim, Event, Host, Image, Job, Project, Snapshot, utcnow
from fleet.store.session import Store
from scheduler.events import apply_event
from web import create_app
from web.auth import create_token

SHA = "ab" * 32


@dataclass
class Recorder:
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    fail: bool = False

    def _send(self, kind: str, host: str, payload: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append((kind, host, payload))

    def build(self, host: str, payload: dict[str, Any]) -> None:
        self._send("build", host, payload)

    def delete(self, host: str, payload: dict[str, Any]) -> None:
        self._send("delete", host, payload)

    def action(self, host: str, payload: dict[str, Any]) -> None:
        self._send("action", host, payload)

    def remove_network(self, host: str, payload: dict[str, Any]) -> None:
        self._send("remove_network", host, payload)

    def actions(self) -> list[dict[str, Any]]:
        return [p for kind, _h, p in self.calls if kind == "action"]


@dataclass
class Env:
    client: FlaskClient
    store: Store
    settings: Settings
    dispatcher: Recorder
    tokens: dict[str, str]

    def call(self, method: str, path: str, who: str = "alice", **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return self.client.open("/api/v1" + path, method=method, headers=headers, **kw)

    def act(self, vm_id: str, who: str = "alice", **body: Any) -> Any:
        return self.call("POST", f"/vms/{vm_id}/actions", who=who, json=body)

    def apply(self, type_: str, vm_id: str, job_id: str = "", host: str = "node1",
              **data: Any) -> None:
        with self.store.session() as s:
            apply_event(s, c.make_event(type_, host=host, vm_id=vm_id, job_id=job_id, **data),
                        self.settings)

    def vm(self, vm_id: str) -> dict[str, Any]:
        resp = self.call("GET", f"/vms/{vm_id}")
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/jobs/{job_id}").get_json()

    def used(self) -> tuple[int, int, int]:
        with self.store.sessions() as s:
            h = s.scalars(select(Host).where(Host.name == "node1")).one()
            return h.used_vcpus, h.used_memory_mb, h.used_disk_gb

    def claim(self, vm_id: str) -> tuple[int, int, int]:
        with self.store.sessions() as s:
            cl = s.scalars(select(Claim).where(Claim.vm_id == vm_id)).one()
            return cl.vcpus, cl.memory_mb, cl.disk_gb

    def count(self, model: Any) -> int:
        with self.store.sessions() as s:
            return s.scalar(select(func.count()).select_from(model))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_db: Path) -> Iterator[Env]:
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    state = tmp_path / "state"
    state.mkdir()
    settings = load_settings(env={"VIRTFLEET_STATE_DIR": str(state), "VIRTFLEET_CONFIG": "",
                                  "VIRTFLEET_HOST_NAME": "controller",
                                  "VIRTFLEET_PUBLIC_URL": "http://ctl.example:8080"})
    shutil.copyfile(migrated_db, state / "virtfleet.db")
    store = Store(settings.db_url)
    with store.session() as s:
        tokens = {"alice": create_token(s, "alice", "team-a"),
                  "bob": create_token(s, "bob", "team-b"),
                  "root": create_token(s, "root", "ops", admin=True)}
        team_a = s.scalars(select(Project).where(Project.name == "team-a")).one()
        s.add(Image(id="img-a", name="debian", project_id=team_a.id, sha256=SHA,
                    size_bytes=1000, disk_format="qcow2"))
        s.add(Host(name="node1", vcpus=4, memory_mb=4096, disk_gb=20, cpu_ratio=1.0,
                   ram_ratio=1.0, disk_ratio=1.0, labels={}, cached_images=[]))
    recorder = Recorder()
    app = create_app(test_config={"TESTING": True, "STORE": store, "DISPATCHER": recorder,
                                  "BUS": None}, settings=settings)
    yield Env(app.test_client(), store, settings, recorder, tokens)
    store.dispose()


def make_vm(env: Env, name: str = "web1", state: str = "running", **size: Any) -> str:
    body = {"name": name, "image": "debian", "vcpus": 1, "memory_mb": 512, "disk_gb": 2,
            **size}
    resp = env.call("POST", "/vms", json=body)
    assert resp.status_code == 202, resp.get_json()
    vm_id = resp.get_json()["vm"]["id"]
    env.apply(c.EV_BUILD_DONE, vm_id, resp.get_json()["job"]["id"], state="running")
    if state != "running":
        with env.store.session() as s:
            s.get(VM, vm_id).state = state
    return vm_id


def accepted(resp: Any, kind: str) -> dict[str, Any]:
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["kind"] == kind and job["state"] == "queued" and job["host"] == "node1"
    return job


def error(resp: Any, code: int) -> dict[str, Any]:
    assert resp.status_code == code, resp.get_json()
    body = resp.get_json()
    assert set(body) == {"code", "status", "message", "errors"}
    return body


# -- power ----------------------------------------------------------------------------------


def test_stop_is_sent_and_settled_by_the_hosts_event(env: Env) -> None:
    vm_id = make_vm(env)
    job = accepted(env.act(vm_id, action="stop"), "stop")
    assert env.vm(vm_id)["state"] == "stopping"
    assert env.dispatcher.actions()[-1] == {"vm_id": vm_id, "job_id": job["id"],
                                            "action": "stop", "args": {"timeout": 60}}
    # A second stop meanwhile does not fit `stopping`.
    body = error(env.act(vm_id, action="stop"), 409)
    assert "`stopping`" in body["message"] and "`running` or `ready`" in body["message"]
    assert body["errors"]["allowed"] == ["running", "ready"]
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="stop", state="stopped",
              forced=False)
    assert env.vm(vm_id)["state"] == "stopped"
    assert env.job(job["id"])["state"] == "done"
    steps = [s["state"] for s in env.vm(vm_id)["steps"]]
    assert steps[-2:] == ["stopping", "stopped"]


def test_stop_timeout_travels_and_a_forced_stop_says_so(env: Env) -> None:
    vm_id = make_vm(env)
    job = accepted(env.act(vm_id, action="stop", timeout=5), "stop")
    assert env.dispatcher.actions()[-1]["args"] == {"timeout": 5}
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="stop", state="stopped",
              forced=True, message="the guest did not power off within 5 s: forced off")
    assert "forced off" in env.job(job["id"])["message"]


def test_start_keeps_the_state_until_the_host_reports(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    job = accepted(env.act(vm_id, action="start"), "start")
    assert env.vm(vm_id)["state"] == "stopped"
    # While the start is open, nothing else (but force_off) may be asked.
    body = error(env.act(vm_id, action="resize", vcpus=2), 409)
    assert "still doing start" in body["message"]
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="start", state="running")
    assert env.vm(vm_id)["state"] == "running"
    error(env.act(vm_id, action="start"), 409)


def test_a_failed_start_leaves_the_vm_as_its_host_sees_it(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    job = accepted(env.act(vm_id, action="start"), "start")
    env.apply(c.EV_ACTION_FAILED, vm_id, job["id"], action="start", state="stopped",
              reason="start failed: no room")
    assert env.vm(vm_id)["state"] == "stopped"
    assert env.job(job["id"])["state"] == "failed"
    assert env.job(job["id"])["message"] == "start failed: no room"
    # ...and a domain that is gone puts the VM in error.
    job = accepted(env.act(vm_id, action="start"), "start")
    env.apply(c.EV_ACTION_FAILED, vm_id, job["id"], action="start", state="absent",
              reason="start failed: the VM's domain is not defined on this host")
    vm = env.vm(vm_id)
    assert vm["state"] == "error" and "not defined" in vm["state_reason"]


def test_reboot_is_not_ended_by_the_guests_power_cycle(env: Env) -> None:
    vm_id = make_vm(env)
    job = accepted(env.act(vm_id, action="reboot"), "reboot")
    assert env.dispatcher.actions()[-1]["args"] == {"timeout": 60, "hard": False}
    env.apply(c.EV_LIFECYCLE, vm_id, event="stopped", detail="shutdown")
    assert env.vm(vm_id)["state"] == "rebooting"
    env.apply(c.EV_LIFECYCLE, vm_id, event="started", detail="booted")
    assert env.vm(vm_id)["state"] == "running"
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="reboot", state="running")
    assert env.vm(vm_id)["state"] == "running"
    assert env.job(job["id"])["state"] == "done"


def test_ready_stays_ready_across_a_snapshot_not_a_reboot(env: Env) -> None:
    vm_id = make_vm(env, state="ready")
    job = accepted(env.act(vm_id, action="snapshot_create", name="s1"), "snapshot_create")
    assert env.vm(vm_id)["state"] == "snapshotting"
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_create", state="running")
    assert env.vm(vm_id)["state"] == "ready"
    # A reboot boots the guest again: running, not ready, until it says so.
    job = accepted(env.act(vm_id, action="reboot"), "reboot")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="reboot", state="running")
    assert env.vm(vm_id)["state"] == "running"


def test_force_off_may_cut_a_stop_short(env: Env) -> None:
    vm_id = make_vm(env)
    stop = accepted(env.act(vm_id, action="stop"), "stop")
    force = accepted(env.act(vm_id, action="force_off"), "force_off")
    assert env.vm(vm_id)["state"] == "stopping"
    env.apply(c.EV_ACTION_DONE, vm_id, force["id"], action="force_off", state="stopped")
    env.apply(c.EV_ACTION_DONE, vm_id, stop["id"], action="stop", state="stopped")
    assert env.vm(vm_id)["state"] == "stopped"
    assert env.job(stop["id"])["state"] == env.job(force["id"])["state"] == "done"


def test_guest_powering_off_during_a_stop_or_by_itself_is_stopped(env: Env) -> None:
    vm_id = make_vm(env)
    env.apply(c.EV_LIFECYCLE, vm_id, event="stopped", detail="shutdown")
    assert env.vm(vm_id)["state"] == "stopped"


@pytest.mark.parametrize(("state", "action", "allowed"), [
    ("stopped", "stop", "`running` or `ready`"),
    ("stopped", "reboot", "`running` or `ready`"),
    ("running", "start", "`stopped` or `error`"),
    ("building", "snapshot_create", "`running` or `ready` or `stopped`"),
    ("deleting", "rebuild", "`running` or `ready` or `stopped` or `error`"),
    ("stopped", "force_off", "`running` or `ready` or `stopping` or `error`"),
])
def test_actions_that_do_not_fit_are_409_naming_the_states(env: Env, state: str, action: str,
                                                           allowed: str) -> None:
    vm_id = make_vm(env, state=state)
    body = error(env.act(vm_id, action=action, **({"name": "s1"} if "snap" in action else {})),
                 409)
    assert f"`{state}`" in body["message"] and allowed in body["message"]
    assert env.vm(vm_id)["state"] == state
    assert env.dispatcher.actions() == []


# -- validation and tenancy -------------------------------------------------------------------


@pytest.mark.parametrize(("body", "where"), [
    ({"action": "stop", "timout": 5}, "timout"),
    ({"action": "start", "vcpus": 2}, "vcpus"),
    ({"action": "explode"}, "action"),
    ({}, "action"),
    ({"action": "resize"}, "vcpus"),
    ({"action": "resize", "vcpus": 0}, "vcpus"),
    ({"action": "resize", "disk_gb": "3"}, "disk_gb"),
    ({"action": "snapshot_create"}, "name"),
    ({"action": "snapshot_create", "name": "Bad Name"}, "name"),
    ({"action": "stop", "timeout": 100000}, "timeout"),
    ({"action": "reboot", "hard": "yes please"}, "hard"),
])
def test_bad_bodies_are_422(env: Env, body: dict[str, Any], where: str) -> None:
    vm_id = make_vm(env)
    err = error(env.act(vm_id, **body), 422)
    assert where in err["message"] or where in str(err["errors"]), err
    assert env.vm(vm_id)["state"] == "running" and env.count(Job) == 1  # the build's


def test_other_tenants_get_404_and_admins_may_act(env: Env) -> None:
    vm_id = make_vm(env)
    for method, path, body in (("POST", f"/vms/{vm_id}/actions", {"action": "stop"}),
                               ("GET", f"/vms/{vm_id}/snapshots", None),
                               ("POST", f"/vms/{vm_id}/snapshots", {"name": "s1"}),
                               ("DELETE", f"/vms/{vm_id}/snapshots/s1", None),
                               ("POST", f"/vms/{vm_id}/snapshots/s1/revert", None)):
        body_ = error(env.call(method, path, who="bob", json=body), 404)
        assert vm_id in body_["message"]
    assert env.vm(vm_id)["state"] == "running" and env.dispatcher.actions() == []
    accepted(env.act(vm_id, who="root", action="stop"), "stop")
    error(env.call("GET", f"/jobs/{env.dispatcher.actions()[-1]['job_id']}", who="bob"), 404)


def test_an_unreachable_broker_leaves_the_vm_as_it_was(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    jobs, events, used = env.count(Job), env.count(Event), env.used()
    env.dispatcher.fail = True
    for body in ({"action": "resize", "vcpus": 3, "memory_mb": 1024, "disk_gb": 4},
                 {"action": "snapshot_create", "name": "s1"}, {"action": "start"},
                 {"action": "rebuild"}):
        error(env.act(vm_id, **body), 503)
        assert env.vm(vm_id)["state"] == "stopped"
        assert (env.count(Job), env.count(Event), env.used()) == (jobs, events, used)
        assert env.claim(vm_id) == (1, 512, 2)
        assert env.count(Snapshot) == 0
    env.dispatcher.fail = False
    accepted(env.act(vm_id, action="snapshot_create", name="s1"), "snapshot_create")


# -- resize ---------------------------------------------------------------------------------


def test_resize_while_running_is_409_saying_it_needs_stopped(env: Env) -> None:
    vm_id = make_vm(env)
    body = error(env.act(vm_id, action="resize", vcpus=2), 409)
    assert "needs `stopped`" in body["message"] and "`running`" in body["message"]


def test_resize_claims_the_growth_first_and_settles_on_done(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    assert env.used() == (1, 512, 2)
    job = accepted(env.act(vm_id, action="resize", vcpus=2, memory_mb=256, disk_gb=4),
                   "resize")
    assert env.vm(vm_id)["state"] == "resizing"
    # Growth claimed now (vCPUs, disk); the memory it gives back stays claimed until done.
    assert env.used() == (2, 512, 4) and env.claim(vm_id) == (2, 512, 4)
    assert env.dispatcher.actions()[-1]["args"] == {"vcpus": 2, "memory_mb": 256, "disk_gb": 4}
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="resize", state="stopped")
    vm = env.vm(vm_id)
    assert (vm["state"], vm["vcpus"], vm["memory_mb"], vm["disk_gb"]) == ("stopped", 2, 256, 4)
    assert env.used() == (2, 256, 4) and env.claim(vm_id) == (2, 256, 4)


def test_a_failed_resize_gives_the_growth_back(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    job = accepted(env.act(vm_id, action="resize", memory_mb=2048), "resize")
    assert env.used() == (1, 2048, 2)
    env.apply(c.EV_ACTION_FAILED, vm_id, job["id"], action="resize", state="stopped",
              reason="resize failed: boom")
    vm = env.vm(vm_id)
    assert (vm["state"], vm["memory_mb"]) == ("stopped", 512)
    assert env.used() == (1, 512, 2)


def test_resize_beyond_the_hosts_room_is_409(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    make_vm(env, name="other", vcpus=2)
    body = error(env.act(vm_id, action="resize", vcpus=3), 409)
    assert "no room" in body["message"] and "vcpus +2 but 1 free" in body["message"]
    assert env.vm(vm_id)["state"] == "stopped" and env.used() == (3, 1024, 4)
    accepted(env.act(vm_id, action="resize", vcpus=2), "resize")


def test_disk_shrink_is_refused(env: Env) -> None:
    vm_id = make_vm(env, state="stopped", disk_gb=3)
    body = error(env.act(vm_id, action="resize", disk_gb=2), 409)
    assert "can only grow" in body["message"] and "3 GiB" in body["message"]
    assert body["errors"]["disk_gb"] == {"current": 3, "requested": 2}
    assert env.vm(vm_id)["state"] == "stopped"


def test_resize_respects_project_quotas(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    resp = env.call("PATCH", "/projects/team-a", who="root", json={"max_vcpus": 1})
    assert resp.status_code == 200, resp.get_json()
    body = error(env.act(vm_id, action="resize", vcpus=2), 409)
    assert "quota" in body["message"]
    accepted(env.act(vm_id, action="resize", memory_mb=1024), "resize")


def test_resize_with_snapshots_is_refused(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    job = accepted(env.act(vm_id, action="snapshot_create", name="s1"), "snapshot_create")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_create", state="stopped")
    body = error(env.act(vm_id, action="resize", vcpus=2), 409)
    assert "without snapshots" in body["message"] and "s1" in body["message"]


# -- snapshots ------------------------------------------------------------------------------


def snapshots(env: Env, vm_id: str) -> list[tuple[str, str]]:
    resp = env.call("GET", f"/vms/{vm_id}/snapshots")
    assert resp.status_code == 200
    return [(s["name"], s["state"]) for s in resp.get_json()]


def test_snapshot_create_revert_delete(env: Env) -> None:
    vm_id = make_vm(env)
    job = accepted(env.call("POST", f"/vms/{vm_id}/snapshots", json={"name": "s1"}),
                   "snapshot_create")
    assert env.dispatcher.actions()[-1]["args"] == {"name": "s1"}
    assert snapshots(env, vm_id) == [("s1", "creating")]
    assert env.vm(vm_id)["state"] == "snapshotting"
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_create", state="running")
    assert snapshots(env, vm_id) == [("s1", "ready")]
    assert env.vm(vm_id)["state"] == "running"
    body = error(env.call("POST", f"/vms/{vm_id}/snapshots", json={"name": "s1"}), 409)
    assert "already has a snapshot named 's1'" in body["message"]
    one = env.call("GET", f"/vms/{vm_id}/snapshots/s1")
    assert one.status_code == 200 and one.get_json()["state"] == "ready"

    # Stop, then revert to the running snapshot: the VM runs again from it.
    stop = accepted(env.act(vm_id, action="stop"), "stop")
    env.apply(c.EV_ACTION_DONE, vm_id, stop["id"], action="stop", state="stopped")
    job = accepted(env.call("POST", f"/vms/{vm_id}/snapshots/s1/revert"), "snapshot_revert")
    assert env.vm(vm_id)["state"] == "snapshotting"
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_revert", state="running")
    assert env.vm(vm_id)["state"] == "running"

    job = accepted(env.call("DELETE", f"/vms/{vm_id}/snapshots/s1"), "snapshot_delete")
    assert snapshots(env, vm_id) == [("s1", "deleting")]
    error(env.call("POST", f"/vms/{vm_id}/snapshots/s1/revert"), 409)
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_delete", state="running")
    assert snapshots(env, vm_id) == []
    error(env.call("POST", f"/vms/{vm_id}/snapshots/s1/revert"), 404)
    error(env.call("DELETE", f"/vms/{vm_id}/snapshots/s1"), 404)
    error(env.call("GET", f"/vms/{vm_id}/snapshots/s1"), 404)


def test_the_actions_endpoint_does_snapshots_too(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    job = accepted(env.act(vm_id, action="snapshot_create", name="cold"), "snapshot_create")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_create", state="stopped")
    assert snapshots(env, vm_id) == [("cold", "ready")]
    assert env.vm(vm_id)["state"] == "stopped"


def test_a_failed_snapshot_is_an_error_row_that_can_be_retried(env: Env) -> None:
    vm_id = make_vm(env)
    job = accepted(env.act(vm_id, action="snapshot_create", name="s1"), "snapshot_create")
    env.apply(c.EV_ACTION_FAILED, vm_id, job["id"], action="snapshot_create", state="running",
              reason="snapshot_create failed: no space")
    snap = env.call("GET", f"/vms/{vm_id}/snapshots/s1").get_json()
    assert (snap["state"], snap["state_reason"]) == ("error", "snapshot_create failed: no space")
    assert env.vm(vm_id)["state"] == "running"
    error(env.call("POST", f"/vms/{vm_id}/snapshots/s1/revert"), 409)
    accepted(env.act(vm_id, action="snapshot_create", name="s1"), "snapshot_create")
    assert snapshots(env, vm_id) == [("s1", "creating")]


# -- rebuild --------------------------------------------------------------------------------


def test_rebuild_sends_the_vm_and_its_image_and_drops_snapshots(env: Env) -> None:
    vm_id = make_vm(env)
    snap = accepted(env.act(vm_id, action="snapshot_create", name="s1"), "snapshot_create")
    env.apply(c.EV_ACTION_DONE, vm_id, snap["id"], action="snapshot_create", state="running")
    before = env.vm(vm_id)
    job = accepted(env.act(vm_id, action="rebuild"), "rebuild")
    assert env.vm(vm_id)["state"] == "building"
    args = env.dispatcher.actions()[-1]["args"]
    assert args["vm"]["id"] == vm_id and args["vm"]["name"] == "web1"
    assert args["vm"]["mac"] == before["mac"] and args["image"]["sha256"] == SHA
    env.apply(c.EV_BUILD_STEP, vm_id, job["id"], step="overlay")
    assert env.job(job["id"])["state"] == "running"
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="rebuild", state="running")
    after = env.vm(vm_id)
    assert (after["state"], after["mac"], after["name"]) == ("running", before["mac"], "web1")
    assert snapshots(env, vm_id) == []
    assert env.job(job["id"])["state"] == "done"


def test_a_rebuild_that_lost_the_disk_is_error(env: Env) -> None:
    vm_id = make_vm(env)
    job = accepted(env.act(vm_id, action="rebuild"), "rebuild")
    env.apply(c.EV_ACTION_FAILED, vm_id, job["id"], action="rebuild", state="absent",
              step="seed", reason="seed failed: disk full", disk_replaced=True)
    vm = env.vm(vm_id)
    assert (vm["state"], vm["failed_step"], vm["state_reason"]) == \
        ("error", "seed", "seed failed: disk full")
    accepted(env.act(vm_id, action="rebuild"), "rebuild")


# -- addresses ------------------------------------------------------------------------------


def test_addresses_from_the_vms_host_are_shown_and_cleared_on_stop(env: Env) -> None:
    vm_id = make_vm(env)
    assert env.vm(vm_id)["addresses"] == []
    addrs = [{"ip": "192.168.122.50", "prefix": 24, "source": "lease"}]
    env.apply(c.EV_ADDRESSES, vm_id, addresses=addrs)
    assert env.vm(vm_id)["addresses"] == addrs
    listed = env.call("GET", "/vms").get_json()
    assert listed[0]["addresses"] == addrs
    env.apply(c.EV_ADDRESSES, vm_id, host="elsewhere", addresses=[])
    assert env.vm(vm_id)["addresses"] == addrs
    stop = accepted(env.act(vm_id, action="stop"), "stop")
    env.apply(c.EV_ACTION_DONE, vm_id, stop["id"], action="stop", state="stopped")
    assert env.vm(vm_id)["addresses"] == []


def test_a_job_whose_message_was_lost_long_ago_does_not_block_the_vm(env: Env) -> None:
    vm_id = make_vm(env, state="stopped")
    job = accepted(env.act(vm_id, action="start"), "start")
    error(env.act(vm_id, action="start"), 409)
    with env.store.session() as s:
        s.get(Job, job["id"]).created_at = utcnow() - timedelta(
            seconds=env.settings.task_time_limit * 2 + 1)
    accepted(env.act(vm_id, action="start"), "start")


def test_rebuild_needs_its_image_active(env: Env) -> None:
    vm_id = make_vm(env)
    with env.store.session() as s:
        s.get(Image, "img-a").status = "error"
    body = error(env.act(vm_id, action="rebuild"), 409)
    assert "not active" in body["message"]
    assert env.vm(vm_id)["state"] == "running"
