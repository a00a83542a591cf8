"""Fleet networks on a host: the libvirt network XML of each mode (golden files and parsed
checks), and ensure_network against libvirt's test:///default driver — first use,
idempotence, two builds racing (in this process and across connections), and a mismatching
network that is refused, not redefined; remove_fleet_network once the fleet network is
deleted (kept while a domain uses it). Every network and domain a test makes is removed."""

from __future__ import annotations

import os
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.contract import NetworkSpec, network_libvirt_name
from fleet.exceptions import BuildError
from worker import networks
from worker.networks import bridge_name, describe, ensure_network, mismatch, network_xml
from worker.virt import Virt

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("VIRTFLEET_REGEN_GOLDEN") == "1"
TEST_URI = "test:///default"


def spec(name: str = "lab", mode: str = "nat", **kw: Any) -> NetworkSpec:
    out: dict[str, Any] = {"name": name, "mode": mode, "bridge": "", "cidr": "10.77.0.0/24",
                           "gateway": "10.77.0.1", "dns": ["192.0.2.53", "192.0.2.54"],
                           "dhcp_start": "10.77.0.10", "dhcp_end": "10.77.0.200"}
    if mode == "bridge":
        out.update(bridge="br0", dhcp_start="", dhcp_end="")
    out.update(kw)
    return out  # type: ignore[return-value]


# -- XML ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nat", "isolated", "bridge"])
def test_golden(mode: str) -> None:
    xml = network_xml(spec(mode=mode))
    golden = GOLDEN / f"network_{mode}.xml"
    if REGEN:
        golden.write_text(xml)
    assert golden.exists(), f"missing {golden}; run with VIRTFLEET_REGEN_GOLDEN=1"
    assert xml == golden.read_text()


def test_nat_and_isolated_content() -> None:
    nat = ET.fromstring(network_xml(spec()))
    assert nat.findtext("name") == "vf-lab"
    assert nat.find("forward").attrib == {"mode": "nat"}
    assert nat.find("bridge").get("name") == bridge_name("lab")
    assert nat.find("ip").attrib == {"address": "10.77.0.1", "netmask": "255.255.255.0"}
    assert nat.find("ip/dhcp/range").attrib == {"start": "10.77.0.10", "end": "10.77.0.200"}
    assert [f.get("addr") for f in nat.findall("dns/forwarder")] == ["192.0.2.53",
                                                                   "192.0.2.54"]
    iso = ET.fromstring(network_xml(spec(mode="isolated", dns=[], cidr="172.16.0.0/16",
                                         gateway="172.16.0.1", dhcp_start="172.16.1.1",
                                         dhcp_end="172.16.1.99")))
    assert iso.find("forward") is None and iso.find("dns") is None
    # the gateway is dnsmasq itself, never its own forwarder (the API's default dns)
    own = ET.fromstring(network_xml(spec(dns=["10.77.0.1"])))
    assert own.find("dns") is None
    mixed = ET.fromstring(network_xml(spec(dns=["10.77.0.1", "192.0.2.53"])))
    assert [f.get("addr") for f in mixed.findall("dns/forwarder")] == ["192.0.2.53"]
    assert iso.find("ip").get("netmask") == "255.255.0.0"
    # no range: no DHCP
    assert ET.fromstring(network_xml(spec(dhcp_start="", dhcp_end=""))).find("ip/dhcp") is None


def test_bridge_content() -> None:
    root = ET.fromstring(network_xml(spec(mode="bridge", bridge="br-lan")))
    assert root.find("forward").attrib == {"mode": "bridge"}
    assert root.find("bridge").attrib == {"name": "br-lan"}
    assert root.find("ip") is None and root.find("dns") is None


def test_bridge_names_fit_linux_and_differ() -> None:
    names = {bridge_name(n) for n in ("lab", "lab2", "a" * 63, "prod-db")}
    assert len(names) == 4
    assert all(len(n) <= 15 and n.startswith("vfbr") for n in names)
    assert bridge_name("lab") == bridge_name("lab")


@pytest.mark.parametrize("bad", [
    {"mode": "route"},
    {"gateway": "10.78.0.1"},
    {"cidr": "not-a-cidr"},
    {"dhcp_start": "10.77.0.10", "dhcp_end": ""},
    {"dhcp_start": "10.77.0.200", "dhcp_end": "10.77.0.10"},
    {"dhcp_end": "10.77.1.5"},
    {"dns": ["resolver.example"]},
    {"mode": "bridge", "bridge": ""},
    {"mode": "bridge", "bridge": "br0'/><evil"},
])
def test_bad_specs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        network_xml({**spec(), **bad})


def test_describe_and_mismatch() -> None:
    assert describe(network_xml(spec())) == {"mode": "nat", "bridge": bridge_name("lab"),
                                             "cidr": "10.77.0.0/24", "gateway": "10.77.0.1",
                                             "uuid": ""}
    xml = network_xml(spec())
    assert mismatch(spec(), xml) == ""
    assert mismatch(spec(dns=[], dhcp_start="10.77.0.50"), xml) == ""  # not compared
    assert "cidr" in mismatch(spec(cidr="10.77.0.0/16"), xml)
    assert "gateway" in mismatch(spec(gateway="10.77.0.254"), xml)
    assert "mode is nat, not isolated" in mismatch(spec(mode="isolated"), xml)
    bridged = network_xml(spec(mode="bridge"))
    assert mismatch(spec(mode="bridge"), bridged) == ""
    assert "br1" in mismatch(spec(mode="bridge", bridge="br1"), bridged)


# -- ensure_network on libvirt's test driver --------------------------------------------------


@pytest.fixture
def virt() -> Iterator[Virt]:
    v = Virt(TEST_URI)
    # Connected for the whole test: test:///default forgets everything when its last
    # connection of the process closes.
    assert v.network_state("default") is not None
    yield v
    v.close()


@pytest.fixture
def net_name(virt: Virt) -> Iterator[str]:
    """A fleet network name unique to the test; its libvirt network is removed after it."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    # test:///default is shared by every connection of this process: clean it on a fresh one
    with Virt(TEST_URI) as cleaner:
        cleaner.remove_network(network_libvirt_name(name))


def test_first_use_defines_starts_and_autostarts(virt: Virt, net_name: str) -> None:
    lv = network_libvirt_name(net_name)
    assert virt.network_state(lv) is None
    assert ensure_network(virt, spec(net_name)) == lv
    assert virt.network_state(lv) == {"active": True, "autostart": True, "persistent": True}
    have = virt.network_xml(lv)
    assert have is not None and mismatch(spec(net_name), have) == ""
    uuid_before = ET.fromstring(have).findtext("uuid")

    # again, and after it was stopped: same definition, running again
    assert ensure_network(virt, spec(net_name)) == lv
    _stop(virt, lv)
    assert virt.network_state(lv)["active"] is False
    ensure_network(virt, spec(net_name))
    assert virt.network_state(lv)["active"] is True
    assert ET.fromstring(virt.network_xml(lv) or "").findtext("uuid") == uuid_before


def test_state_of_a_network_removed_after_its_lookup_is_absent(virt: Virt,
                                                               net_name: str) -> None:
    """A host's removal can land between the lookup by name and the state query (the
    Debian e2e test polled into exactly that): absent, not an error."""
    lv = ensure_network(virt, spec(net_name))
    lookup = virt._network

    def lookup_then_removed(name: str) -> Any:
        handle = lookup(name)
        with Virt(TEST_URI) as other:
            assert other.remove_network(name)
        return handle

    virt._network = lookup_then_removed  # type: ignore[method-assign]
    assert virt.network_state(lv) is None


def _stop(virt: Virt, name: str) -> None:
    """Leave the network defined but stopped (its XML keeps its UUID)."""
    xml = virt.network_xml(name)
    assert xml is not None
    virt.remove_network(name)
    assert virt.define_network(xml)


def test_bridge_mode_on_the_test_driver(virt: Virt, net_name: str) -> None:
    lv = ensure_network(virt, spec(net_name, mode="bridge", bridge="br0"))
    assert virt.network_state(lv)["active"] is True
    assert describe(virt.network_xml(lv) or "")["bridge"] == "br0"


def test_two_builds_racing_in_one_worker(net_name: str) -> None:
    conns = [Virt(TEST_URI) for _ in range(4)]
    barrier = threading.Barrier(len(conns))
    errors: list[BaseException] = []

    def build(v: Virt) -> None:
        try:
            barrier.wait()
            ensure_network(v, spec(net_name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(v,)) for v in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for v in conns:
        v.close()
    assert errors == []
    with Virt(TEST_URI) as v:
        assert v.network_state(network_libvirt_name(net_name))["active"] is True


def test_another_process_defining_it_first_is_not_an_error(
        virt: Virt, net_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another worker process (its own connection, not our lock) defines the network between
    # our look-up and our define: libvirt says "already exists" and we use theirs.
    lv = network_libvirt_name(net_name)
    real_lookup = virt.network_xml
    calls = {"n": 0}

    def lookup_then_lose_the_race(name: str) -> str | None:
        calls["n"] += 1
        if calls["n"] == 1:
            with Virt(TEST_URI) as rival:
                assert rival.define_network(network_xml(spec(net_name)))
            return None
        return real_lookup(name)

    monkeypatch.setattr(virt, "network_xml", lookup_then_lose_the_race)
    assert ensure_network(virt, spec(net_name)) == lv
    assert calls["n"] == 2
    assert virt.network_state(lv)["active"] is True
    assert virt.define_network(network_xml(spec(net_name))) is False  # what libvirt said


def test_a_mismatching_network_is_refused_and_left_alone(virt: Virt, net_name: str) -> None:
    lv = network_libvirt_name(net_name)
    assert virt.define_network(network_xml(spec(net_name, cidr="10.99.0.0/24",
                                                gateway="10.99.0.1", dhcp_start="",
                                                dhcp_end="")))
    before = virt.network_xml(lv)
    with pytest.raises(BuildError) as err:
        ensure_network(virt, spec(net_name))
    assert err.value.step == "define"
    assert "cidr is 10.99.0.0/24, not 10.77.0.0/24" in str(err.value)
    assert "not redefined" in str(err.value)
    assert virt.network_xml(lv) == before
    assert virt.network_state(lv)["active"] is False  # not started either

    with pytest.raises(BuildError, match="mode is nat, not isolated"):
        ensure_network(virt, spec(net_name, mode="isolated", cidr="10.99.0.0/24",
                                  gateway="10.99.0.1", dhcp_start="", dhcp_end=""))


def test_a_bad_spec_fails_the_define_step(virt: Virt, net_name: str) -> None:
    with pytest.raises(BuildError) as err:
        ensure_network(virt, spec(net_name, mode="route"))
    assert err.value.step == "define" and "unknown network mode" in str(err.value)
    assert virt.network_state(network_libvirt_name(net_name)) is None


def test_a_libvirt_failure_is_a_define_step_failure(virt: Virt, net_name: str) -> None:
    # e.g. libvirtd cannot create the bridge; its message names a host path
    def refuse(_name: str) -> None:
        from worker.virt import VirtError
        raise VirtError("network vf-x: cannot create bridge /sys/class/net/vfbr")

    virt.ensure_network_active = refuse  # type: ignore[method-assign]
    with pytest.raises(BuildError) as err:
        ensure_network(virt, spec(net_name))
    assert err.value.step == "define" and "<path>" in str(err.value)
    assert "/sys" not in str(err.value)


def test_module_lock_is_per_network() -> None:
    assert networks._lock("vf-a") is networks._lock("vf-a")
    assert networks._lock("vf-a") is not networks._lock("vf-b")


# -- remove_fleet_network on libvirt's test driver -----------------------------------------


def _domain_on(network: str, name: str) -> str:
    """A minimal domain with one interface on libvirt network `network`."""
    root = ET.Element("domain", type="test")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="KiB").text = "65536"
    os_ = ET.SubElement(root, "os")
    ET.SubElement(os_, "type").text = "hvm"
    devices = ET.SubElement(root, "devices")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network=network)
    return ET.tostring(root, encoding="unicode")


def test_remove_after_the_fleet_network_is_deleted(virt: Virt, net_name: str) -> None:
    import libvirt
    lv = ensure_network(virt, spec(net_name))
    conn = libvirt.open(TEST_URI)
    dom = conn.defineXML(_domain_on(lv, f"{net_name}-vm"))
    try:
        assert virt.domains_on_network(lv) == [f"{net_name}-vm"]
        # a domain of this host still uses it: kept, and said so
        assert networks.remove_fleet_network(virt, net_name) == f"kept: used by {net_name}-vm"
        assert virt.network_state(lv) is not None
    finally:
        dom.undefine()
        conn.close()
    assert virt.domains_on_network(lv) == []
    assert networks.remove_fleet_network(virt, net_name) == "removed"
    assert virt.network_state(lv) is None and lv not in virt.network_names()
    assert networks.remove_fleet_network(virt, net_name) == "absent"  # said twice: nothing
    assert virt.network_state("default") is not None  # other networks untouched


EARLIER = "11111111-2222-4333-8444-555555555555"
LATER = "66666666-7777-4888-8999-aaaaaaaaaaaa"


def test_the_fleet_networks_id_is_the_libvirt_networks_uuid(virt: Virt, net_name: str) -> None:
    root = ET.fromstring(network_xml(spec(net_name, uuid=LATER)))
    assert root.findtext("uuid") == LATER
    lv = ensure_network(virt, spec(net_name, uuid=LATER))
    assert networks.describe(virt.network_xml(lv) or "")["uuid"] == LATER


def test_a_late_removal_of_an_earlier_network_leaves_the_later_one(virt: Virt,
                                                                   net_name: str) -> None:
    """Deleted, made again under the same name, and the first removal reaches the host after
    a build realised the new one: the new one stays."""
    lv = ensure_network(virt, spec(net_name, uuid=LATER))
    assert networks.remove_fleet_network(virt, net_name, EARLIER) == \
        "kept: a later fleet network"
    assert virt.network_state(lv)["active"] is True
    assert networks.remove_fleet_network(virt, net_name, LATER) == "removed"
    assert virt.network_state(lv) is None


def test_a_build_replaces_an_earlier_networks_unused_definition(virt: Virt,
                                                                net_name: str) -> None:
    """The earlier network's removal has not come yet: the build defines its own (same name
    and addresses, its own UUID), so that removal, when it comes, leaves it alone."""
    import libvirt
    lv = ensure_network(virt, spec(net_name, uuid=EARLIER))
    assert ensure_network(virt, spec(net_name, uuid=LATER)) == lv
    assert networks.describe(virt.network_xml(lv) or "")["uuid"] == LATER
    assert virt.network_state(lv) == {"active": True, "autostart": True, "persistent": True}
    assert networks.remove_fleet_network(virt, net_name, EARLIER) == \
        "kept: a later fleet network"
    # ... but one a domain still uses is kept as it is (and used)
    conn = libvirt.open(TEST_URI)
    dom = conn.defineXML(_domain_on(lv, f"{net_name}-vm"))
    try:
        assert ensure_network(virt, spec(net_name, uuid=EARLIER)) == lv
        assert networks.describe(virt.network_xml(lv) or "")["uuid"] == LATER
    finally:
        dom.undefine()
        conn.close()
