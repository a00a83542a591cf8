"""Fleet networks on a real host (qemu:///system): a VM on a nat network gets that libvirt
network realised (active, autostart), a DHCP lease from its range, and reaches `ready`; a
libvirt network of the same name that says something else is refused at the define step and
left as it was. Every libvirt network a test makes is removed, even when it fails."""

from __future__ import annotations

import ipaddress
import time

import pytest

from bench.cluster import Cluster, free_cidr
from fleet.contract import network_libvirt_name
from worker.networks import network_xml
from worker.virt import Virt

pytestmark = pytest.mark.e2e


def test_a_vm_on_a_nat_fleet_network(cluster: Cluster, net_name: str) -> None:
    with Virt("qemu:///system") as virt:
        cidr = free_cidr(virt)
        r = cluster.api.post("/networks", json={"name": net_name, "mode": "nat", "cidr": cidr})
        assert r.status_code == 201, r.text
        net = r.json()
        r = cluster.api.post("/vms", json={"name": "on-net", "image": "demo", "memory_mb": 192,
                                           "disk_gb": 1, "network": net_name})
        assert r.status_code == 202, r.text
        vm = r.json()["vm"]
        ready = cluster.api.wait_vm(vm["id"], ("ready", "error"), timeout=180)
        assert ready["state"] == "ready", ready

        lv = network_libvirt_name(net_name)
        assert virt.network_state(lv) == {"active": True, "autostart": True,
                                          "persistent": True}
        dom_xml = virt.xml(vm["id"])
        assert f"network='{lv}'" in dom_xml

        lo, hi = (ipaddress.ip_address(net[k]) for k in ("dhcp_start", "dhcp_end"))
        deadline = time.monotonic() + 60
        addresses: list[dict] = []
        while time.monotonic() < deadline and not addresses:
            addresses = cluster.api.get(f"/vms/{vm['id']}").json()["addresses"]
            time.sleep(1)
        assert [a["source"] for a in addresses] == ["lease"], addresses
        assert lo <= ipaddress.ip_address(addresses[0]["ip"]) <= hi

        r = cluster.api.delete(f"/vms/{vm['id']}")
        assert r.status_code == 202, r.text
        cluster.api.wait_vm(vm["id"], ("gone",), timeout=60)
        assert virt.network_state(lv)["active"] is True  # the network stays for later VMs


def test_a_mismatching_libvirt_network_is_refused(cluster: Cluster, net_name: str) -> None:
    with Virt("qemu:///system") as virt:
        cidr = free_cidr(virt)
        r = cluster.api.post("/networks", json={"name": net_name, "mode": "isolated",
                                                "cidr": cidr})
        assert r.status_code == 201, r.text
        net = r.json()
        lv = network_libvirt_name(net_name)
        # someone made a nat network of that name on the host by hand
        assert virt.define_network(network_xml({**net, "mode": "nat"}))
        before = virt.network_xml(lv)

        r = cluster.api.post("/vms", json={"name": "refused", "image": "demo",
                                           "memory_mb": 192, "disk_gb": 1,
                                           "network": net_name})
        assert r.status_code == 202, r.text
        vm = cluster.api.wait_vm(r.json()["vm"]["id"], ("error", "running", "ready"),
                                 timeout=120)
        assert vm["state"] == "error", vm
        events = cluster.api.get("/events", params={"vm_id": vm["id"]}).json()
        failed = [e for e in events if e["type"] == "vm.build.failed"]
        assert failed and failed[0]["data"]["step"] == "define", failed
        assert "mode is nat, not isolated" in failed[0]["data"]["reason"]
        assert virt.network_xml(lv) == before
        assert virt.network_state(lv)["active"] is False
        assert virt.state(vm["id"]) is None
