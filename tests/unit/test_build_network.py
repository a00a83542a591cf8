"""A build with a fleet network on libvirt's test:///default driver (image cache and qemu-img
stubbed): the network is realised at the define step, the NIC joins it, the seed carries the
payload's network-config and user-data unchanged, the console is watched from the new boot
on, a mismatching network fails the define step and leaves nothing, and a delete stops the
watch. Every domain and network made is removed."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import contract as c
from fleet.exceptions import BuildError
from worker import build, cache, images
from worker.build import HostContext
from worker.domain import HostSettings, instance_paths
from worker.networks import network_xml
from worker.readiness import ReadyWatcher
from worker.seed import read_seed_iso
from worker.virt import Virt

TEST_URI = "test:///default"
MULTIPART = ('Content-Type: multipart/mixed; boundary="==b=="\nMIME-Version: 1.0\n\n'
             '--==b==\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--==b==--\n')
NETWORK_CONFIG = "version: 2\nethernets:\n  eth0:\n    addresses: [10.88.0.5/24]\n"


def net(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "mode": "isolated", "bridge": "", "cidr": "10.88.0.0/24",
            "gateway": "10.88.0.1", "dns": [], "dhcp_start": "10.88.0.100",
            "dhcp_end": "10.88.0.150", **kw}


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"base")
    monkeypatch.setattr(cache, "ensure_base", lambda *_a: base)
    monkeypatch.setattr(cache, "base_virtual_size", lambda _b: 1)
    monkeypatch.setattr(images, "create_overlay",
                        lambda _b, disk, *_a, **_k: Path(disk).write_bytes(b"overlay"))
    virt = Virt(TEST_URI)
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(type_: str, **data: Any) -> None:
        events.append((type_, data))

    settings = HostSettings(virt_type="test", arch="x86_64", machine="pc", emulator=None,
                            network_kind=None, network_source=None, storage_dir=tmp_path)
    ready = ReadyWatcher(emit, tmp_path, parse=lambda _l: (True, "", {"v1": {"errors": []}}))
    ctx = HostContext(virt=virt, host=settings, host_token="t", emit=emit, ready=ready)
    name = f"b{uuid.uuid4().hex[:10]}"
    vm_ids: list[str] = []
    try:
        yield {"ctx": ctx, "events": events, "net": name, "vm_ids": vm_ids,
               "storage": tmp_path}
    finally:
        for vm_id in vm_ids:
            virt.destroy_and_undefine(vm_id)
        virt.remove_network(c.network_libvirt_name(name))
        virt.close()


def payload(vm_ids: list[str], **vm: Any) -> dict[str, Any]:
    vm_id = str(uuid.uuid4())
    vm_ids.append(vm_id)
    return {"vm": {"id": vm_id, "name": "netvm", "project": "p", "vcpus": 1, "memory_mb": 128,
                   "disk_gb": 1, "hostname": "netvm", "mac": "52:54:00:aa:bb:cc", **vm},
            "image": {"id": "i", "sha256": "0" * 64, "disk_format": "qcow2", "size_bytes": 4,
                      "url": "http://127.0.0.1:1/x"},
            "job_id": "job-1", "attempt": 0}


def test_a_build_on_a_fleet_network(host: dict[str, Any]) -> None:
    ctx: HostContext = host["ctx"]
    p = payload(host["vm_ids"], network=net(host["net"]), network_config=NETWORK_CONFIG,
                user_data=MULTIPART)
    vm_id = p["vm"]["id"]
    build.build_vm(ctx, p)

    lv = c.network_libvirt_name(host["net"])
    assert ctx.virt.network_state(lv) == {"active": True, "autostart": True,
                                          "persistent": True}
    iface = ET.fromstring(ctx.virt.xml(vm_id)).find("devices/interface")
    assert iface is not None and iface.get("type") == "network"
    assert iface.find("source").get("network") == lv
    assert iface.find("mac").get("address") == "52:54:00:aa:bb:cc"

    seed = read_seed_iso(instance_paths(host["storage"], vm_id).seed)
    assert seed["user-data"] == MULTIPART.encode()
    assert seed["network-config"] == NETWORK_CONFIG.encode()
    steps = [d["step"] for t, d in host["events"] if t == c.EV_BUILD_STEP]
    assert steps == ["image", "overlay", "seed", "define"]
    assert ctx.ready is not None and ctx.ready.watching() == {vm_id}

    # a second VM on the same network: nothing redefined
    before = ctx.virt.network_xml(lv)
    build.build_vm(ctx, payload(host["vm_ids"], network=net(host["net"])))
    assert ctx.virt.network_xml(lv) == before

    build.delete_vm(ctx, vm_id)
    assert vm_id not in ctx.ready.watching()
    assert ctx.virt.network_state(lv)["active"] is True  # other VMs may use it


def test_without_network_config_the_seed_asks_for_dhcp(host: dict[str, Any]) -> None:
    ctx: HostContext = host["ctx"]
    p = payload(host["vm_ids"], network=net(host["net"]), network_config="")
    build.build_vm(ctx, p)
    seed = read_seed_iso(instance_paths(host["storage"], p["vm"]["id"]).seed)
    assert seed["network-config"] == build.network_config("52:54:00:aa:bb:cc").encode()
    assert b"dhcp4: true" in seed["network-config"]


def test_a_mismatching_network_fails_the_define_step(host: dict[str, Any]) -> None:
    ctx: HostContext = host["ctx"]
    lv = c.network_libvirt_name(host["net"])
    assert ctx.virt.define_network(network_xml(net(host["net"], mode="nat")))
    p = payload(host["vm_ids"], network=net(host["net"]))
    with pytest.raises(BuildError) as err:
        build.build_vm(ctx, p)
    assert err.value.step == "define" and "mode is nat, not isolated" in str(err.value)
    vm_id = p["vm"]["id"]
    assert ctx.virt.state(vm_id) is None
    assert not instance_paths(host["storage"], vm_id).dir.exists()  # undone
    assert ctx.virt.network_state(lv)["active"] is False  # left as it was
    assert ctx.ready is not None and ctx.ready.watching() == set()


def test_the_host_default_is_used_without_a_fleet_network(host: dict[str, Any]) -> None:
    ctx: HostContext = host["ctx"]
    ctx.host = HostSettings(**{**ctx.host.__dict__, "network_kind": "network",
                               "network_source": "default"})
    p = payload(host["vm_ids"], network=None)
    build.build_vm(ctx, p)
    iface = ET.fromstring(ctx.virt.xml(p["vm"]["id"])).find("devices/interface")
    assert iface.find("source").get("network") == "default"
