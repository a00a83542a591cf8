"""The guest's first boot as the control plane sees it: vm.ready (running -> ready, ready_at,
boot seconds), vm.guest.failed (-> error with the guest's reason) and vm.ready.timeout (stays
running, with a reason), ignored unless the VM is running on the host that reports; a VM
that finished its first boot comes back `ready` after a stop/start, a reboot or its host's
silence, a rebuild starts a new first boot; and the build's step timings, through the REST
API (test_actions_api's env)."""
# ruff: noqa: F811 - the `env` fixture is imported from test_actions_api

from __future__ import annotations

from typing import Any

from fleet import contract as c
from fleet.store.models import VM
from scheduler.events import settled_state
from tests.unit.test_actions_api import Env, accepted, env, make_vm  # noqa: F401


def build(env: Env, name: str = "web1") -> tuple[str, str]:
    """A VM created through the API, its build steps and build done reported by node1."""
    resp = env.call("POST", "/vms", json={"name": name, "image": "debian", "vcpus": 1,
                                          "memory_mb": 256, "disk_gb": 1})
    assert resp.status_code == 202, resp.get_json()
    vm_id, job_id = resp.get_json()["vm"]["id"], resp.get_json()["job"]["id"]
    for step in c.BUILD_STEPS:
        env.apply(c.EV_BUILD_STEP, vm_id, job_id, step=step)
    env.apply(c.EV_BUILD_DONE, vm_id, job_id)
    return vm_id, job_id


def ready(env: Env, vm_id: str, **data: Any) -> None:
    env.apply(c.EV_VM_READY, vm_id, **{"boot_seconds": 2.5,
                                       "result": {"v1": {"datasource": "NoCloud",
                                                         "errors": []}}, **data})


def test_ready_sets_the_state_the_time_and_the_boot_seconds(env: Env) -> None:
    vm_id, _job = build(env)
    assert env.vm(vm_id)["state"] == "running" and env.vm(vm_id)["ready_at"] is None
    ready(env, vm_id)
    vm = env.vm(vm_id)
    assert (vm["state"], vm["boot_seconds"]) == ("ready", 2.5)
    assert vm["ready_at"] is not None
    assert [s["state"] for s in vm["steps"]] == ["building", "running", "ready"]
    # Said again (a restarted worker re-sends it): nothing changes.
    ready(env, vm_id, boot_seconds=99)
    assert env.vm(vm_id)["boot_seconds"] == 2.5


def test_timings_of_each_step_up_to_ready(env: Env) -> None:
    vm_id, _job = build(env)
    timings = env.vm(vm_id)["timings"]
    assert [t["step"] for t in timings] == ["placement", "queued", *c.BUILD_STEPS, "boot"]
    assert all(t["seconds"] is not None and t["seconds"] >= 0 for t in timings[:-1])
    assert timings[-1]["seconds"] is None  # still booting
    ready(env, vm_id, boot_seconds=41.25)
    timings = env.vm(vm_id)["timings"]
    assert timings[-1] == {**timings[-1], "step": "boot", "seconds": 41.25, "failed": False}


def test_timings_of_a_retried_and_a_failed_build(env: Env) -> None:
    resp = env.call("POST", "/vms", json={"name": "web1", "image": "debian"})
    vm_id, job_id = resp.get_json()["vm"]["id"], resp.get_json()["job"]["id"]
    assert [t["step"] for t in env.vm(vm_id)["timings"]] == ["placement", "queued"]
    env.apply(c.EV_BUILD_STEP, vm_id, job_id, step="image")
    env.apply(c.EV_BUILD_STEP, vm_id, job_id, step="overlay")
    env.apply(c.EV_BUILD_FAILED, vm_id, job_id, step="overlay", reason="overlay failed: x")
    timings = env.vm(vm_id)["timings"]  # no alternate host: the VM is in error
    assert [(t["step"], t["failed"]) for t in timings] == [
        ("placement", False), ("queued", False), ("image", False), ("overlay", True)]
    assert timings[-1]["seconds"] is not None


def test_guest_failure_is_an_error_with_the_guests_reason(env: Env) -> None:
    vm_id, _job = build(env)
    env.apply(c.EV_GUEST_FAILED, vm_id, reason="runcmd: command not found: htop",
              result={"v1": {"errors": ["runcmd: command not found: htop"]}})
    vm = env.vm(vm_id)
    assert (vm["state"], vm["failed_step"], vm["ready_at"]) == ("error", "cloud-init", None)
    assert "command not found: htop" in vm["state_reason"]
    assert vm["timings"][-1]["failed"] is True


def test_ready_timeout_keeps_running_and_says_why(env: Env) -> None:
    vm_id, _job = build(env)
    env.apply(c.EV_READY_TIMEOUT, vm_id, seconds=900.0)
    vm = env.vm(vm_id)
    assert (vm["state"], vm["ready_at"], vm["failed_step"]) == ("running", None, "")
    assert "no ready line on the serial console within 900 s" in vm["state_reason"]
    assert vm["timings"][-1]["seconds"] is None  # the boot never reported its end
    env.apply(c.EV_READY_TIMEOUT, vm_id, seconds=900.0, host="elsewhere")  # not its host
    ready(env, vm_id)  # a ready line reported after all: ready, the reason cleared
    vm = env.vm(vm_id)
    assert (vm["state"], vm["state_reason"]) == ("ready", "")


def test_ready_and_failed_are_ignored_unless_running_on_the_reporting_host(env: Env) -> None:
    vm_id, _job = build(env)
    ready(env, vm_id, host="elsewhere")  # a late report from a host the VM has left
    assert env.vm(vm_id)["state"] == "running"
    with env.store.session() as s:
        s.get(VM, vm_id).state = "stopped"
    ready(env, vm_id)
    env.apply(c.EV_GUEST_FAILED, vm_id, reason="late")
    vm = env.vm(vm_id)
    assert (vm["state"], vm["ready_at"], vm["state_reason"]) == ("stopped", None, "")
    # A VM that is being built or is gone: nothing happens, nothing breaks.
    resp = env.call("POST", "/vms", json={"name": "web2", "image": "debian"})
    other = resp.get_json()["vm"]["id"]
    ready(env, other)
    assert env.vm(other)["state"] == "building"
    ready(env, "no-such-vm")
    env.apply(c.EV_GUEST_FAILED, "no-such-vm", reason="x")


def test_a_ready_vm_comes_back_ready_after_reboot_stop_start_and_silence(env: Env) -> None:
    vm_id, _job = build(env)
    ready(env, vm_id)
    job = accepted(env.act(vm_id, action="reboot"), "reboot")
    assert env.vm(vm_id)["state"] == "rebooting"
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="reboot", state="running")
    assert env.vm(vm_id)["state"] == "ready"
    job = accepted(env.act(vm_id, action="stop"), "stop")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="stop", state="stopped")
    assert env.vm(vm_id)["state"] == "stopped"
    job = accepted(env.act(vm_id, action="start"), "start")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="start", state="running")
    assert env.vm(vm_id)["state"] == "ready"
    # The guest powers itself off, then someone starts it on the host.
    env.apply(c.EV_LIFECYCLE, vm_id, event="stopped", detail="shutdown")
    assert env.vm(vm_id)["state"] == "stopped"
    env.apply(c.EV_LIFECYCLE, vm_id, event="started", detail="booted")
    assert env.vm(vm_id)["state"] == "ready"
    # Its host falls silent and comes back reporting it running.
    with env.store.session() as s:
        s.get(VM, vm_id).state = "unknown"
    env.apply(c.EV_HEARTBEAT, "", host="node1", vcpus=4, memory_mb=4096, disk_gb=20,
              domains={vm_id: "running"})
    assert env.vm(vm_id)["state"] == "ready"


def test_rebuild_is_a_new_first_boot(env: Env) -> None:
    vm_id, _job = build(env)
    ready(env, vm_id)
    job = accepted(env.act(vm_id, action="rebuild"), "rebuild")
    for step in c.BUILD_STEPS:
        env.apply(c.EV_BUILD_STEP, vm_id, job["id"], step=step)
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="rebuild", state="running")
    vm = env.vm(vm_id)
    assert (vm["state"], vm["ready_at"], vm["boot_seconds"]) == ("running", None, None)
    assert [t["step"] for t in vm["timings"]] == ["queued", *c.BUILD_STEPS, "boot"]
    ready(env, vm_id, boot_seconds=3.0)
    vm = env.vm(vm_id)
    assert (vm["state"], vm["boot_seconds"]) == ("ready", 3.0)
    assert vm["timings"][-1]["seconds"] == 3.0


def test_a_failed_rebuild_that_kept_the_disk_keeps_ready(env: Env) -> None:
    vm_id, _job = build(env)
    ready(env, vm_id)
    job = accepted(env.act(vm_id, action="rebuild"), "rebuild")
    env.apply(c.EV_ACTION_FAILED, vm_id, job["id"], action="rebuild", state="running",
              step="image", reason="image failed: no room", disk_replaced=False)
    vm = env.vm(vm_id)
    assert vm["state"] == "ready" and vm["ready_at"] is not None


def test_reverting_to_a_snapshot_from_before_ready_is_running(env: Env) -> None:
    vm_id, _job = build(env)
    early = accepted(env.act(vm_id, action="snapshot_create", name="early"), "snapshot_create")
    env.apply(c.EV_ACTION_DONE, vm_id, early["id"], action="snapshot_create", state="running")
    ready(env, vm_id)
    late = accepted(env.act(vm_id, action="snapshot_create", name="late"), "snapshot_create")
    env.apply(c.EV_ACTION_DONE, vm_id, late["id"], action="snapshot_create", state="running")
    assert env.vm(vm_id)["state"] == "ready"
    job = accepted(env.act(vm_id, action="snapshot_revert", name="late"), "snapshot_revert")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_revert", state="running")
    assert env.vm(vm_id)["state"] == "ready"
    job = accepted(env.act(vm_id, action="snapshot_revert", name="early"), "snapshot_revert")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="snapshot_revert", state="running")
    assert env.vm(vm_id)["state"] == "running"


def test_ready_state_set_without_ready_at_keeps_the_old_rule(env: Env) -> None:
    vm_id = make_vm(env, state="ready")  # as before vm.ready existed
    job = accepted(env.act(vm_id, action="reboot"), "reboot")
    env.apply(c.EV_ACTION_DONE, vm_id, job["id"], action="reboot", state="running")
    assert env.vm(vm_id)["state"] == "running"


def test_settled_state_after_the_first_boot() -> None:
    assert settled_state("running", "ready", "reboot", booted=True) == "ready"
    assert settled_state("running", "stopped", "start", booted=True) == "ready"
    assert settled_state("running", "running", "reboot", booted=False) == "running"
    assert settled_state("stopped", "ready", "stop", booted=True) == "stopped"
    assert settled_state("absent", "ready", "start", booted=True) is None
