"""Domain XML: golden files, round trips, kvm vs qemu, and libvirt's test driver."""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.domain import (
    NS,
    DomainConfig,
    HostSettings,
    NetworkAttachment,
    design,
    domain_name,
    from_xml,
    instance_paths,
    to_xml,
)

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("VIRTFLEET_REGEN_GOLDEN") == "1"
VM_ID = "6f1c2a1e-0b7d-4c59-9a55-0d3c7e5b9a10"
STORAGE = Path("/var/lib/virtfleet")


def _host(virt_type: str = "qemu", **kw: object) -> HostSettings:
    settings: dict[str, object] = {
        "virt_type": virt_type,
        "arch": "x86_64",
        "machine": "pc",
        "emulator": None,
        "network_kind": "network",
        "network_source": "default",
        "storage_dir": STORAGE,
    }
    settings.update(kw)
    return HostSettings(**settings)  # type: ignore[arg-type]


def _vm(**kw: object) -> dict[str, object]:
    vm: dict[str, object] = {
        "id": VM_ID,
        "name": "web1",
        "project": "demo",
        "vcpus": 2,
        "memory_mb": 1024,
        "mac": "52:54:00:12:34:56",
    }
    vm.update(kw)
    return vm


CASES: dict[str, DomainConfig] = {
    "qemu_network": design(_vm(), _host("qemu")),
    "kvm_bridge": design(
        _vm(mac=None),
        _host("kvm", network_kind="bridge", network_source="br0",
              emulator="/usr/bin/qemu-system-x86_64", machine="q35"),
    ),
    # A fleet network replaces the host's default (and a host without one).
    "fleet_network": design(
        _vm(network={"name": "lab", "mode": "nat", "bridge": "", "cidr": "10.77.0.0/24",
                     "gateway": "10.77.0.1", "dns": [], "dhcp_start": "10.77.0.10",
                     "dhcp_end": "10.77.0.200"}),
        _host("qemu", network_kind=None, network_source=None),
    ),
    "minimal": DomainConfig(
        name="vf-bare-00000000",
        uuid="00000000-0000-4000-8000-000000000000",
        vcpus=1,
        memory_mib=256,
        disk_path="/srv/vf/disk.qcow2",
        console_log="",
        guest_agent=False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    xml = to_xml(CASES[case])
    golden = GOLDEN / f"{case}.xml"
    if REGEN:
        golden.write_text(xml)
    assert golden.exists(), f"missing {golden}; run with VIRTFLEET_REGEN_GOLDEN=1"
    assert xml == golden.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case: str) -> None:
    cfg = CASES[case]
    assert from_xml(to_xml(cfg)) == cfg


def test_kvm_vs_qemu() -> None:
    kvm = ET.fromstring(to_xml(design(_vm(), _host("kvm"))))
    tcg = ET.fromstring(to_xml(design(_vm(), _host("qemu"))))
    assert kvm.get("type") == "kvm" and tcg.get("type") == "qemu"
    cpu = kvm.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert tcg.find("cpu") is None
    # Everything else is the same.
    for root in (kvm, tcg):
        root.attrib.pop("type")
        if (el := root.find("cpu")) is not None:
            root.remove(el)
    assert ET.tostring(kvm) == ET.tostring(tcg)


def test_designed_content() -> None:
    cfg = design(_vm(), _host())
    root = ET.fromstring(to_xml(cfg))
    paths = instance_paths(STORAGE, VM_ID)
    assert root.findtext("name") == f"vf-web1-{VM_ID[:8]}"
    assert root.findtext("uuid") == VM_ID
    assert root.find("memory").get("unit") == "KiB" and root.findtext("memory") == "1048576"
    assert root.findtext("vcpu") == "2"
    assert root.findtext(f"metadata/{{{NS}}}instance/{{{NS}}}id") == VM_ID
    assert root.findtext(f"metadata/{{{NS}}}instance/{{{NS}}}project") == "demo"
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("source").get("file") == str(paths.disk)
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").get("type") == "qcow2"
    # The seed must be a virtio-scsi cdrom: Debian's cloud kernel has no SATA driver.
    assert cdrom.get("device") == "cdrom" and cdrom.find("readonly") is not None
    assert cdrom.find("source").get("file") == str(paths.seed)
    assert cdrom.find("target").attrib == {"dev": "sda", "bus": "scsi"}
    assert cdrom.find("driver").get("type") == "raw"
    ctrl = root.find("devices/controller[@type='scsi']")
    assert ctrl is not None and ctrl.get("model") == "virtio-scsi"
    assert root.find("devices/serial/log").get("file") == str(paths.console)
    assert root.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"


def test_instance_paths_and_names() -> None:
    paths = instance_paths(STORAGE, VM_ID.upper())
    assert paths.dir == STORAGE / "instances" / VM_ID
    assert (paths.disk.name, paths.seed.name, paths.console.name) == (
        "disk.qcow2", "seed.iso", "console.log")
    assert {p.parent for p in (paths.disk, paths.seed, paths.console)} == {paths.dir}
    with pytest.raises(ValueError):
        instance_paths(STORAGE, "../../etc")
    assert domain_name("my web/01", VM_ID) == f"vf-my-web-01-{VM_ID[:8]}"


@pytest.mark.parametrize("bad", [{"mac": "zz:54:00:12:34:56"}, {"vcpus": 0}, {"id": "nope"}])
def test_design_rejects_bad_payload(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        design(_vm(**bad), _host())


def test_no_network_when_host_has_none() -> None:
    cfg = design(_vm(), _host(network_kind=None, network_source=None))
    assert cfg.network is None
    assert ET.fromstring(to_xml(cfg)).find("devices/interface") is None


def test_fleet_network_attachment() -> None:
    cfg = CASES["fleet_network"]
    assert cfg.network == NetworkAttachment("network", "vf-lab", "52:54:00:12:34:56")
    iface = ET.fromstring(to_xml(cfg)).find("devices/interface")
    assert iface.get("type") == "network" and iface.find("source").get("network") == "vf-lab"
    # over the host's default too
    assert design(_vm(network={"name": "lab"}), _host()).network.source == "vf-lab"


def test_bridge_attachment_xml() -> None:
    cfg = CASES["kvm_bridge"]
    assert cfg.network == NetworkAttachment("bridge", "br0", None, "virtio")
    iface = ET.fromstring(to_xml(cfg)).find("devices/interface")
    assert iface.get("type") == "bridge" and iface.find("source").get("bridge") == "br0"
    assert iface.find("mac") is None


# --------------------------------------------------------------- libvirt test driver

virt = pytest.importorskip("worker.virt")
TEST_URI = "test:///default"


@pytest.fixture
def domain_cfg() -> Iterator[DomainConfig]:
    vm_id = str(uuid.uuid4())
    cfg = design(_vm(id=vm_id, name="rt"), _host())
    yield cfg
    with virt.Virt(TEST_URI) as v:
        v.destroy_and_undefine(cfg.uuid)


def test_libvirt_define_undefine_round_trip(domain_cfg: DomainConfig) -> None:
    with virt.Virt(TEST_URI) as v:
        assert v.state(domain_cfg.uuid) is None
        xml = to_xml(domain_cfg)
        v.define_and_start(xml)
        assert v.state(domain_cfg.uuid) == "running"
        v.define_and_start(xml)  # idempotent while running
        assert v.state(domain_cfg.uuid) == "running"

        listed = {d["uuid"]: d for d in v.list_domains()}
        entry = listed[domain_cfg.uuid]
        assert entry["name"] == domain_cfg.name
        assert entry["state"] == "running"
        assert entry["vm_id"] == domain_cfg.vm_id and entry["project"] == "demo"
        # The test driver's own domain has no virtfleet metadata.
        assert any(d["vm_id"] is None for d in listed.values())

        assert v.destroy_and_undefine(domain_cfg.uuid) is True
        assert v.state(domain_cfg.uuid) is None
        assert v.destroy_and_undefine(domain_cfg.uuid) is False


def test_libvirt_redefines_only_when_not_running(domain_cfg: DomainConfig) -> None:
    bigger = dataclasses.replace(domain_cfg, vcpus=domain_cfg.vcpus + 2)
    with virt.Virt(TEST_URI) as v:
        v.define_and_start(to_xml(domain_cfg))
        dom = v._connection().lookupByUUIDString(domain_cfg.uuid)
        v.define_and_start(to_xml(bigger))  # running: left as it is
        assert from_xml(dom.XMLDesc(0)).vcpus == domain_cfg.vcpus
        dom.destroy()
        assert v.state(domain_cfg.uuid) == "shutoff"
        v.define_and_start(to_xml(bigger))  # stopped: redefined and started
        assert v.state(domain_cfg.uuid) == "running"
        assert from_xml(dom.XMLDesc(0)).vcpus == bigger.vcpus


def test_libvirt_reopens_a_closed_connection(domain_cfg: DomainConfig) -> None:
    v = virt.Virt(TEST_URI)
    assert v.state(domain_cfg.uuid) is None
    v._connection().close()  # dropped under our feet
    v.define_and_start(to_xml(domain_cfg))
    assert v.state(domain_cfg.uuid) == "running"
    v.close()


def test_libvirt_capacity_and_networks() -> None:
    with virt.Virt(TEST_URI) as v:
        cap = v.capacity()
        assert cap["vcpus"] > 0 and cap["memory_mb"] > 0 and cap["arch"] and cap["hostname"]
        v.ensure_network_active("default")  # already active: no-op
        with pytest.raises(virt.VirtError, match="no-such-net"):
            v.ensure_network_active("no-such-net")


def test_libvirt_errors_are_virt_errors() -> None:
    with pytest.raises(virt.VirtError, match="cannot connect"):
        virt.Virt("test:///nonexistent/file.xml").capacity()
    with pytest.raises(ValueError):
        virt.Virt(TEST_URI).define_and_start("<domain type='qemu'><name>x</name></domain>")


def test_lifecycle_events(domain_cfg: DomainConfig) -> None:
    seen: list[tuple[str, str, str, str]] = []
    done = threading.Event()

    def callback(uuid_: str, name: str, event: str, detail: str) -> None:
        if uuid_ == domain_cfg.uuid:
            seen.append((uuid_, name, event, detail))
            if event == "undefined":
                done.set()

    listener = virt.LifecycleListener(TEST_URI, callback).start()
    try:
        assert listener.connected.wait(5)
        with virt.Virt(TEST_URI) as v:
            v.define_and_start(to_xml(domain_cfg))
            v.destroy_and_undefine(domain_cfg.uuid)
        assert done.wait(5), seen
    finally:
        listener.stop()
    assert [(e, d) for _, _, e, d in seen] == [
        ("defined", "added"),
        ("started", "booted"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    assert {n for _, n, _, _ in seen} == {domain_cfg.name}


def test_listener_retries_and_stops_cleanly() -> None:
    listener = virt.LifecycleListener(
        "test:///nonexistent/file.xml", lambda *a: None, backoff_initial=0.01, backoff_max=0.05
    ).start()
    assert not listener.connected.wait(0.3)
    listener.stop(timeout=2)
    assert listener._thread is not None and not listener._thread.is_alive()


def test_event_names() -> None:
    assert virt.event_names(5, 0) == ("stopped", "shutdown")
    assert virt.event_names(6, 1) == ("shutdown", "guest")
    assert virt.event_names(8, 0) == ("crashed", "panicked")
    assert virt.event_names(5, 99) == ("stopped", "unknown")
    assert virt.event_names(99, 0) == ("unknown", "unknown")
