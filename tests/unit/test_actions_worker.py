"""The host side of actions without QEMU: snapshot and resize XML, the clean power-off with
its forced fallback (a fake clock), every action through `run` against libvirt's
test:///default driver (events checked; a job delivered again is answered, not done twice),
and the address reporter (a fake libvirt)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from fleet import contract as c
from worker import actions
from worker.addresses import AGENT_RETRY, AddressReporter
from worker.build import HostContext
from worker.domain import HostSettings, design, instance_paths, to_xml
from worker.virt import Virt, VirtError

TEST_URI = "test:///default"


def host_settings(tmp_path: Path) -> HostSettings:
    return HostSettings(virt_type="test", arch="x86_64", machine="pc", emulator=None,
                        network_kind=None, network_source=None, storage_dir=tmp_path)


# -- XML ------------------------------------------------------------------------------------


def domain_xml(tmp_path: Path, **vm: Any) -> str:
    host = HostSettings(virt_type="qemu", arch="x86_64", machine="pc", emulator=None,
                        network_kind="network", network_source="default",
                        storage_dir=tmp_path)
    spec = {"id": str(uuid.uuid4()), "name": "web1", "project": "p", "vcpus": 1,
            "memory_mb": 192, "mac": "52:54:00:12:34:56", **vm}
    return to_xml(design(spec, host))


def test_snapshot_xml_is_internal_for_the_disk_and_leaves_the_seed_out(tmp_path: Path) -> None:
    root = ET.fromstring(actions.snapshot_xml("s1", domain_xml(tmp_path), "before <upgrade>"))
    assert root.tag == "domainsnapshot"
    assert root.findtext("name") == "s1"
    assert root.findtext("description") == "before <upgrade>"
    assert {d.get("name"): d.get("snapshot") for d in root.findall("disks/disk")} == \
        {"vda": "internal", "sda": "no"}
    assert root.find("memory") is None  # libvirt decides: internal when running


def test_resized_xml_changes_only_vcpus_and_memory(tmp_path: Path) -> None:
    xml = domain_xml(tmp_path)
    root = ET.fromstring(xml)
    root.find("vcpu").set("current", "1")  # type: ignore[union-attr]
    out = ET.fromstring(actions.resized_xml(ET.tostring(root, encoding="unicode"), 2, 512))
    assert out.findtext("vcpu") == "2" and out.find("vcpu").get("current") is None  # type: ignore[union-attr]
    assert out.findtext("memory") == out.findtext("currentMemory") == str(512 * 1024)
    assert out.find("memory").get("unit") == "KiB"  # type: ignore[union-attr]
    assert out.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    before = ET.fromstring(xml)
    for el in (before, out):
        for tag in ("vcpu", "memory", "currentMemory"):
            el.remove(el.find(tag))  # type: ignore[arg-type]
    assert ET.tostring(before) == ET.tostring(out)


# -- power off ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class PowerVirt:
    """A domain that powers off `after` seconds after the n-th power-button press."""

    def __init__(self, clock: FakeClock, press_needed: int | None, after: float = 1.0) -> None:
        self.clock, self.press_needed, self.after = clock, press_needed, after
        self.presses: list[float] = []
        self.destroyed_at: float | None = None
        self.off_at: float | None = None

    def is_active(self, vm_id: str) -> bool:
        if self.destroyed_at is not None:
            return False
        return self.off_at is None or self.clock.now < self.off_at

    def shutdown(self, vm_id: str) -> None:
        self.presses.append(self.clock.now)
        if self.press_needed is not None and len(self.presses) == self.press_needed:
            self.off_at = self.clock.now + self.after

    def destroy(self, vm_id: str) -> bool:
        self.destroyed_at = self.clock.now
        return True


def ctx_with(virt: Any, tmp_path: Path, events: list[tuple[str, dict[str, Any]]]
             ) -> HostContext:
    def emit(type_: str, **data: Any) -> None:
        events.append((type_, data))
    return HostContext(virt=virt, host=host_settings(tmp_path), host_token="t", emit=emit)


def test_a_guest_that_honours_the_button_is_not_forced(tmp_path: Path) -> None:
    clock = FakeClock()
    virt = PowerVirt(clock, press_needed=1, after=1.5)
    forced = actions.power_off(ctx_with(virt, tmp_path, []), "vm", 60, clock, clock.sleep)
    assert forced is False and virt.destroyed_at is None and virt.presses == [0.0]


def test_the_button_is_pressed_again_for_a_guest_that_missed_it(tmp_path: Path) -> None:
    clock = FakeClock()
    virt = PowerVirt(clock, press_needed=2)
    forced = actions.power_off(ctx_with(virt, tmp_path, []), "vm", 60, clock, clock.sleep)
    assert forced is False and len(virt.presses) == 2
    assert virt.presses[1] - virt.presses[0] == pytest.approx(actions.SHUTDOWN_REPEAT, abs=0.5)


def test_a_guest_that_ignores_the_button_is_forced_off_after_the_timeout(
        tmp_path: Path) -> None:
    clock = FakeClock()
    virt = PowerVirt(clock, press_needed=None)
    forced = actions.power_off(ctx_with(virt, tmp_path, []), "vm", 25, clock, clock.sleep)
    assert forced is True and virt.destroyed_at == pytest.approx(25, abs=0.5)
    assert len(virt.presses) == 3  # at 0, 10 and 20 s


# -- every action through run(), on libvirt's test driver -------------------------------------


@pytest.fixture
def test_host(tmp_path: Path) -> Any:
    virt = Virt(TEST_URI)
    vm_id = str(uuid.uuid4())
    xml = to_xml(design({"id": vm_id, "name": "t1", "project": "p", "vcpus": 1,
                         "memory_mb": 128}, host_settings(tmp_path)))
    virt.define_and_start(xml)
    events: list[tuple[str, dict[str, Any]]] = []
    yield ctx_with(virt, tmp_path, events), vm_id, events
    virt.destroy_and_undefine(vm_id)
    virt.close()


def act(ctx: HostContext, vm_id: str, events: list[Any], action: str,
        **args: Any) -> tuple[str, dict[str, Any]]:
    """One action as one job (a job id of its own), its two events checked."""
    events.clear()
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    actions.run(ctx, {"vm_id": vm_id, "job_id": job_id, "action": action, "args": args})
    assert events[0] == (c.EV_BUILD_STEP, {"vm_id": vm_id, "job_id": job_id, "step": action})
    assert len(events) == 2, events
    type_, data = events[1]
    assert data["action"] == action and data["job_id"] == job_id
    return type_, data


def test_power_actions_report_libvirts_state(test_host: Any) -> None:
    ctx, vm_id, events = test_host
    assert act(ctx, vm_id, events, "stop", timeout=5)[1]["state"] == "stopped"
    assert ctx.virt.state(vm_id) == "shutoff"
    ev, data = act(ctx, vm_id, events, "stop")  # again: nothing to do, still success
    assert (ev, data["state"], data["forced"]) == (c.EV_ACTION_DONE, "stopped", False)
    ev, data = act(ctx, vm_id, events, "start")
    assert (ev, data["state"], data["started"]) == (c.EV_ACTION_DONE, "running", True)
    assert act(ctx, vm_id, events, "start")[1]["started"] is False
    ev, data = act(ctx, vm_id, events, "reboot", timeout=5)
    assert (ev, data["state"]) == (c.EV_ACTION_DONE, "running")
    ev, data = act(ctx, vm_id, events, "reboot", hard=True)
    assert (ev, data["state"], data["forced"]) == (c.EV_ACTION_DONE, "running", True)
    ev, data = act(ctx, vm_id, events, "force_off")
    assert (ev, data["state"], data["forced"]) == (c.EV_ACTION_DONE, "stopped", True)
    assert ctx.virt.state(vm_id) == "shutoff"


def test_a_job_delivered_again_is_answered_not_done_twice(test_host: Any,
                                                          tmp_path: Path) -> None:
    """The worker stopped after the reboot but before acknowledging its message: the message
    comes again, and the VM is not rebooted a second time."""
    ctx, vm_id, events = test_host
    instance_paths(tmp_path, vm_id).dir.mkdir(parents=True)
    reboots: list[str] = []
    real = ctx.virt.start
    ctx.virt.start = lambda uuid_: (reboots.append(uuid_), real(uuid_))[1]
    payload = {"vm_id": vm_id, "job_id": "job-r", "action": "reboot", "args": {"hard": True}}
    actions.run(ctx, payload)
    first = events[-1]
    assert first[0] == c.EV_ACTION_DONE and len(reboots) == 1
    events.clear()
    actions.run(ctx, payload)  # delivered again
    assert events == [first] and len(reboots) == 1
    # another job is another reboot
    actions.run(ctx, {**payload, "job_id": "job-s"})
    assert len(reboots) == 2 and events[-1][1]["job_id"] == "job-s"
    # a failure is kept as well: said again, not tried again
    events.clear()
    bad = {"vm_id": vm_id, "job_id": "job-x", "action": "snapshot_revert",
           "args": {"name": "nope"}}
    actions.run(ctx, bad)
    failed = events[-1]
    assert failed[0] == c.EV_ACTION_FAILED
    events.clear()
    actions.run(ctx, bad)
    assert events == [failed]


def test_resize_needs_the_domain_off_and_changes_its_definition(test_host: Any) -> None:
    ctx, vm_id, events = test_host
    ev, data = act(ctx, vm_id, events, "resize", vcpus=2, memory_mb=256)
    assert ev == c.EV_ACTION_FAILED and data["state"] == "running"
    assert "needs it stopped" in data["reason"]
    act(ctx, vm_id, events, "force_off")
    ev, data = act(ctx, vm_id, events, "resize", vcpus=2, memory_mb=256)
    assert (ev, data["state"], data["vcpus"], data["memory_mb"]) == \
        (c.EV_ACTION_DONE, "stopped", 2, 256)
    root = ET.fromstring(ctx.virt.xml(vm_id))
    assert root.findtext("vcpu") == "2" and root.findtext("memory") == str(256 * 1024)


def test_snapshots_create_revert_delete(test_host: Any) -> None:
    ctx, vm_id, events = test_host
    ev, data = act(ctx, vm_id, events, "snapshot_create", name="s1")
    assert (ev, data["snapshot_state"], data["state"]) == (c.EV_ACTION_DONE, "running",
                                                          "running")
    assert act(ctx, vm_id, events, "snapshot_create", name="s1")[0] == c.EV_ACTION_DONE
    act(ctx, vm_id, events, "force_off")
    assert act(ctx, vm_id, events, "snapshot_create", name="s2")[1]["snapshot_state"] == \
        "shutoff"
    assert ctx.virt.snapshot_names(vm_id) == ["s1", "s2"]
    ev, data = act(ctx, vm_id, events, "snapshot_revert", name="s1")
    assert (ev, data["state"]) == (c.EV_ACTION_DONE, "running")
    assert ctx.virt.snapshot_current(vm_id) == "s1"
    ev, data = act(ctx, vm_id, events, "snapshot_revert", name="nope")
    assert ev == c.EV_ACTION_FAILED and "no snapshot" in data["reason"]
    assert act(ctx, vm_id, events, "snapshot_delete", name="s1")[1]["deleted"] is True
    assert act(ctx, vm_id, events, "snapshot_delete", name="s1")[1]["deleted"] is False
    assert ctx.virt.snapshot_names(vm_id) == ["s2"]


def test_failures_name_the_reason_and_the_state_left(test_host: Any, tmp_path: Path) -> None:
    ctx, vm_id, events = test_host
    other = str(uuid.uuid4())
    ev, data = act(ctx, other, events, "start")
    assert (ev, data["state"]) == (c.EV_ACTION_FAILED, "absent")
    assert "not defined" in data["reason"]
    events.clear()
    actions.run(ctx, {"vm_id": vm_id, "job_id": "j", "action": "explode", "args": {}})
    assert events == [(c.EV_ACTION_FAILED, {"vm_id": vm_id, "job_id": "j", "action": "explode",
                                            "reason": "this host does not know the action "
                                                      "'explode'", "state": "running"})]
    ev, data = act(ctx, vm_id, events, "rebuild", vm={"id": "someone-else"}, image={})
    assert ev == c.EV_ACTION_FAILED and "needs the VM and its image" in data["reason"]
    assert ctx.virt.state(vm_id) == "running"  # nothing was destroyed


def test_a_host_path_in_a_failure_is_scrubbed(test_host: Any) -> None:
    ctx, vm_id, events = test_host

    def broken(*_a: Any) -> None:
        raise VirtError("cannot open /var/lib/virtfleet/storage/instances/x/disk.qcow2")
    ctx.virt.start = broken  # type: ignore[method-assign]
    act(ctx, vm_id, events, "force_off")
    ev, data = act(ctx, vm_id, events, "start")
    assert ev == c.EV_ACTION_FAILED and "/var/lib" not in data["reason"]
    assert "<path>" in data["reason"]


# -- addresses ------------------------------------------------------------------------------


class AddrVirt:
    def __init__(self) -> None:
        self.domains: list[dict[str, Any]] = []
        self.lease: dict[str, list[dict[str, Any]]] = {}
        self.agent: dict[str, list[dict[str, Any]]] = {}
        self.agent_calls = 0

    def list_domains(self) -> list[dict[str, Any]]:
        return self.domains

    def interface_addresses(self, vm_id: str, source: str) -> list[dict[str, Any]]:
        if source == "lease":
            return self.lease.get(vm_id, [])
        self.agent_calls += 1
        if vm_id not in self.agent:
            raise VirtError("Guest agent is not responding", 86)
        return self.agent[vm_id]


def addr(ip: str, prefix: int = 24) -> dict[str, Any]:
    return {"ip": ip, "prefix": prefix, "mac": "52:54:00:00:00:01", "family": "ipv4"}


def test_addresses_are_reported_on_change_only_and_cleared_when_the_vm_stops() -> None:
    clock = FakeClock()
    virt = AddrVirt()
    sent: list[tuple[str, dict[str, Any]]] = []
    rep = AddressReporter(virt, lambda t, **d: sent.append((t, d)), interval=3.0, clock=clock)
    vm = "11111111-1111-1111-1111-111111111111"
    virt.domains = [{"vm_id": vm, "name": "vf-a-11111111", "state": "running"},
                    {"vm_id": None, "name": "someone-elses", "state": "running"}]
    rep.poll()
    assert sent == []  # no lease yet: nothing changed from "none known"
    virt.lease[vm] = [addr("192.168.122.10"), addr("127.0.0.1", 8)]
    rep.poll()
    assert sent == []  # rate-limited
    clock.now += 3
    rep.poll()
    assert sent == [(c.EV_ADDRESSES, {"vm_id": vm, "addresses": [
        {"ip": "192.168.122.10", "prefix": 24, "source": "lease"}]})]
    clock.now += 3
    rep.poll()
    assert len(sent) == 1  # unchanged
    # The guest agent answers later: its addresses join the lease's.
    virt.agent[vm] = [addr("192.168.122.10"), addr("10.0.0.5", 8), addr("fe80::1", 64)]
    clock.now += AGENT_RETRY
    rep.poll()
    assert sent[-1][1]["addresses"] == [
        {"ip": "192.168.122.10", "prefix": 24, "source": "lease"},
        {"ip": "10.0.0.5", "prefix": 8, "source": "agent"},
        {"ip": "192.168.122.10", "prefix": 24, "source": "agent"}]
    virt.domains[0]["state"] = "shutoff"
    clock.now += 3
    rep.poll()
    assert sent[-1] == (c.EV_ADDRESSES, {"vm_id": vm, "addresses": []})
    n = len(sent)
    clock.now += 3
    rep.poll()
    assert len(sent) == n


def test_a_silent_guest_agent_is_not_asked_every_round() -> None:
    clock = FakeClock()
    virt = AddrVirt()
    rep = AddressReporter(virt, lambda t, **d: None, interval=1.0, clock=clock)
    vm = "22222222-2222-2222-2222-222222222222"
    virt.domains = [{"vm_id": vm, "name": "vf-b-22222222", "state": "running"}]
    for _ in range(10):
        rep.poll()
        clock.now += 1
    assert virt.agent_calls == 1
    clock.now += AGENT_RETRY
    rep.poll()
    assert virt.agent_calls == 2



def test_only_this_hosts_vms_are_reported_and_a_pause_is_no_news(tmp_path: Path) -> None:
    clock = FakeClock()
    virt = AddrVirt()
    sent: list[tuple[str, dict[str, Any]]] = []
    rep = AddressReporter(virt, lambda t, **d: sent.append((t, d)), interval=1.0,
                          storage_dir=tmp_path, clock=clock)
    ours, theirs = "33333333-3333-3333-3333-333333333333", "44444444-4444-4444-4444-444444444444"
    (tmp_path / "instances" / ours).mkdir(parents=True)
    virt.domains = [{"vm_id": ours, "name": "vf-a-33333333", "state": "running"},
                    {"vm_id": theirs, "name": "vf-b-44444444", "state": "running"},
                    {"vm_id": "not-a-uuid", "name": "vf-c", "state": "running"}]
    virt.lease = {ours: [addr("192.168.122.7")], theirs: [addr("192.168.122.8")]}
    rep.poll()
    assert [d["vm_id"] for _t, d in sent] == [ours]
    virt.domains[0]["state"] = "paused"  # e.g. while libvirt saves a snapshot's memory
    clock.now += 1
    rep.poll()
    assert len(sent) == 1
