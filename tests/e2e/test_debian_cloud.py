"""Issue 5's acceptance through the whole system: a real Debian 12 cloud image (built once
with debootstrap from Debian's packages, cached between runs) registered over the API, a VM
with a keypair, a ``#cloud-config`` (a user, ``write_files``, ``runcmd``) and a static address
on a NAT fleet network. Everything is asserted from the guest's serial console (never by
connecting to the guest): cloud-init used the NoCloud seed, applied each part, the static
address is on eth0, and the VM reached ``ready``. Every VM, network and file is removed."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cluster import Cluster, free_cidr
from bench.ready import openssh_ed25519
from fleet.contract import network_libvirt_name
from worker.virt import Virt

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 900.0
"""Debian + cloud-init under QEMU TCG on a busy 2-core machine."""

USER_DATA = """\
#cloud-config
users:
  - default
  - name: alice
    shell: /bin/bash
    gecos: Alice from cloud-config
write_files:
  - path: /etc/virtfleet-e2e.txt
    content: "written-by-write-files\\n"
    permissions: "0640"
runcmd:
  - |
    f=/etc/virtfleet-e2e.txt
    echo "e2e-file: $(cat $f) $(stat -c %a $f)" > /dev/ttyS0
    echo "e2e-user: $(getent passwd alice | cut -d: -f5,7)" > /dev/ttyS0
    keys=/home/debian/.ssh/authorized_keys
    echo "e2e-keys: $(ssh-keygen -lf $keys | cut -d' ' -f2)" > /dev/ttyS0
    echo "e2e-addr: $(ip -4 -o addr show dev eth0 | tr -s ' ' | cut -d' ' -f4)" > /dev/ttyS0
    echo "e2e-host: $(hostname)" > /dev/ttyS0
"""


@pytest.fixture(scope="session")
def debian_image() -> Path:
    from demo.debian import ensure_debian_image
    return ensure_debian_image()


@pytest.fixture
def debian_cluster(debian_image: Path) -> Iterator[Cluster]:
    with Cluster(workers={"local": {"VIRTFLEET_VIRT_TYPE": "qemu"}}) as c:
        c.register_image("debian12", debian_image, timeout=900)
        yield c


def wait_console(cluster: Cluster, vm_id: str, needles: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        r = cluster.api.get(f"/vms/{vm_id}/console", params={"max_bytes": 1 << 20})
        assert r.status_code == 200, r.text
        text = r.json()["output"]
        if all(n in text for n in needles):
            return text
        time.sleep(2)
    missing = [n for n in needles if n not in text]
    raise AssertionError(f"{missing} never appeared on the console:\n{text[-4000:]}")


def test_debian_cloud_vm_with_keypair_cloud_config_and_static_address(
        debian_cluster: Cluster, net_name: str) -> None:
    api = debian_cluster.api
    r = api.post("/keypairs", json={"name": "e2e-key", "public_key": openssh_ed25519()})
    assert r.status_code == 201, r.text
    key = r.json()
    with Virt("qemu:///system") as virt:
        cidr = free_cidr(virt)
    r = api.post("/networks", json={"name": net_name, "mode": "nat", "cidr": cidr})
    assert r.status_code == 201, r.text

    r = api.post("/vms", json={"name": "deb-e2e", "image": "debian12", "vcpus": 1,
                               "memory_mb": 512, "disk_gb": 3, "keypairs": ["e2e-key"],
                               "network": net_name, "address": "static",
                               "user_data": USER_DATA})
    assert r.status_code == 202, r.text
    vm = r.json()["vm"]
    static = [a for a in vm["addresses"] if a["source"] == "static"]
    assert len(static) == 1, vm["addresses"]
    address, prefix = static[0]["ip"], ipaddress.ip_network(cidr).prefixlen
    assert ipaddress.ip_address(address) in ipaddress.ip_network(cidr)

    ready = api.wait_vm(vm["id"], ("ready", "error"), timeout=BOOT_TIMEOUT, poll=2)
    text = wait_console(debian_cluster, vm["id"], ["virtfleet-ready: ", "e2e-host: "], 60)
    assert ready["state"] == "ready", (ready, text[-4000:])

    # cloud-init found its NoCloud seed (the virtio-scsi cdrom) and finished.
    assert "DataSourceNoCloud" in text, text[-4000:]
    assert "Cloud-init v. " in text and " finished at " in text
    # Each part applied: write_files (content and mode), the user, our SSH key for the default
    # user, the static address from network-config v2, the hostname from our part.
    assert "e2e-file: written-by-write-files 640" in text
    assert "e2e-user: Alice from cloud-config:/bin/bash" in text
    assert f"e2e-keys: {key['fingerprint']}" in text
    assert f"e2e-addr: {address}/{prefix}" in text
    assert "e2e-host: deb-e2e" in text
    # The ready line carries cloud-init's own result: no errors.
    marker = [ln for ln in text.splitlines() if "virtfleet-ready: " in ln][-1]
    assert '"errors": []' in marker and "DataSourceNoCloud" in marker, marker

    assert ready["ready_at"] and ready["boot_seconds"] and ready["boot_seconds"] > 0
    assert [s["state"] for s in ready["steps"]][-2:] == ["running", "ready"]

    r = api.delete(f"/vms/{vm['id']}")
    assert r.status_code == 202, r.text
    api.wait_vm(vm["id"], ("gone",), timeout=120)
    # The address went back to the pool: the network can be deleted, nothing holds it.
    net = api.get(f"/networks/{net_name}").json()
    assert net["static_held"] == 0 and net["vms"] == 0, net
    assert api.delete(f"/networks/{net_name}").status_code in (200, 204)
    # ... and the host removes its libvirt network (no domain uses it any more).
    lv = network_libvirt_name(net_name)
    deadline = time.monotonic() + 60
    with Virt("qemu:///system") as virt:
        while virt.network_state(lv) is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert virt.network_state(lv) is None, "the host kept the deleted fleet network"
