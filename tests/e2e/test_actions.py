"""Every action on one demo guest through the whole system (web, scheduler and a worker as
separate processes over real Redis and libvirtd, QEMU TCG), each checked in libvirt's own
view (domain state, domain XML, qemu-img, libvirt's snapshot list) and not only the store's:
addresses, stop, start, reboot, snapshots (running and stopped; revert proven by the disk),
force off, resize (and the refusals), rebuild, delete.

The guest's user-data keeps a boot counter in a raw sector of its disk (512 MiB in, far past
the demo image's partition) and prints `boot-count=N` at every boot: what the console shows
after a revert or a rebuild says what the disk held.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest

from bench.cluster import Cluster
from fleet import contract as c
from worker import images
from worker.virt import Virt

pytestmark = pytest.mark.e2e

GIB = 1024**3
COUNTER_SECTOR = 1048576  # 512 MiB into the disk

USER_DATA = f"""#!/bin/sh
n=$(dd if=/dev/vda bs=512 skip={COUNTER_SECTOR} count=1 2>/dev/null | tr -dc 0-9)
n=$((${{n:-0}} + 1))
printf '%s\\n' "$n" | dd of=/dev/vda bs=512 seek={COUNTER_SECTOR} count=1 conv=sync,notrunc \\
    2>/dev/null
sync
echo "boot-count=$n"
"""

READY = "virtfleet-demo: ready"


class Guest:
    """The one VM of this test, seen through the API, its console and libvirt."""

    def __init__(self, cluster: Cluster, vm: dict[str, Any]) -> None:
        self.cluster, self.api, self.id = cluster, cluster.api, vm["id"]
        self.vm = vm
        self.virt = Virt("qemu:///system")
        self.disk = cluster.root / "storage-local" / "instances" / self.id / "disk.qcow2"
        self.timings: list[tuple[str, float, float]] = []

    # -- views --------------------------------------------------------------------------

    def console(self) -> str:
        r = self.api.get(f"/vms/{self.id}/console", params={"max_bytes": 1024 * 1024})
        assert r.status_code == 200, r.text
        return str(r.json()["output"])

    def count(self, needle: str) -> int:
        return self.console().count(needle)

    def wait_console(self, needle: str, times: int = 1, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.console()
            if text.count(needle) >= times:
                return text
            time.sleep(0.5)
        raise AssertionError(f"{needle!r} not {times}x on the console:\n{text[-3000:]}")

    def boot_counts(self) -> list[int]:
        return [int(n) for n in re.findall(r"^boot-count=(\d+)\r?$", self.console(), re.M)]

    def state(self) -> str | None:
        return self.virt.state(self.id)

    def xml(self) -> ET.Element:
        return ET.fromstring(self.virt.xml(self.id))

    def snapshots(self) -> list[str]:
        return self.virt.snapshot_names(self.id)

    def show(self) -> dict[str, Any]:
        r = self.api.get(f"/vms/{self.id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    # -- acting -------------------------------------------------------------------------

    def act(self, action: str, final: tuple[str, ...], *, path: str = "", method: str = "POST",
            until: Callable[[], bool] | None = None, timeout: float = 120,
            **body: Any) -> dict[str, Any]:
        """Ask for an action, wait for the VM's final state and its job; record the time."""
        t0 = time.monotonic()
        if path:
            r = self.api.call(method, f"/vms/{self.id}{path}", json=body or None)
        else:
            r = self.api.post(f"/vms/{self.id}/actions", json={"action": action, **body})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["kind"] == action
        deadline = t0 + timeout
        while True:
            job = self.api.get(f"/jobs/{job['id']}").json()
            if job["state"] in ("done", "failed"):
                break
            assert time.monotonic() < deadline, f"{action} job never ended: {job}"
            time.sleep(0.05)
        assert job["state"] == "done", job
        vm = self.api.wait_vm(self.id, final, timeout=30)
        if until is not None:
            while not until():
                assert time.monotonic() < deadline, f"{action}: condition never met"
                time.sleep(0.25)
        self.timings.append((action, time.monotonic() - t0,
                             _seconds(job["created_at"], job["updated_at"])))
        return vm

    def refused(self, status: int, action: str = "", **body: Any) -> dict[str, Any]:
        r = self.api.post(f"/vms/{self.id}/actions", json={"action": action, **body})
        assert r.status_code == status, r.text
        return dict(r.json())


def _seconds(a: str, b: str) -> float:
    from datetime import datetime
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_every_action_on_one_guest(cluster: Cluster) -> None:
    t0 = time.monotonic()
    r = cluster.api.post("/vms", json={"name": "acts", "image": "demo", "vcpus": 1,
                                       "memory_mb": 192, "disk_gb": 1, "user_data": USER_DATA})
    assert r.status_code == 202, r.text
    g = Guest(cluster, r.json()["vm"])
    try:
        assert cluster.api.wait_vm(g.id, ("running", "ready", "error"))["state"] != "error"
        text = g.wait_console("boot-count=1")
        # ready: its host saw the ready line on the console (cloud-init's first boot done)
        ready = cluster.api.wait_vm(g.id, ("ready", "error"), timeout=120)
        assert ready["state"] == "ready" and ready["boot_seconds"] > 0, ready
        markers = g.count(c.READY_MARKER)
        assert markers == 1
        g.timings.append(("create (to boot-count=1)", time.monotonic() - t0, 0.0))
        mac = g.xml().find("devices/interface/mac").get("address")  # type: ignore[union-attr]
        assert mac == g.vm["mac"]

        # -- addresses: the API shows the lease libvirt reports, the IP the guest printed
        text = g.wait_console("virtfleet-demo: eth0 address=", timeout=60)
        ip = re.search(r"virtfleet-demo: eth0 address=([0-9.]+)", text).group(1)  # type: ignore[union-attr]
        assert ip in [a["ip"] for a in g.virt.interface_addresses(g.id, "lease")]
        deadline = time.monotonic() + 30
        while g.show()["addresses"] != [{"ip": ip, "prefix": 24, "source": "lease"}]:
            assert time.monotonic() < deadline, g.show()["addresses"]
            time.sleep(0.25)

        # -- refusals while running (and ready)
        body = g.refused(409, "resize", vcpus=2)
        assert "needs `stopped`" in body["message"] and "`ready`" in body["message"]
        assert g.refused(409, "start")["errors"]["allowed"] == ["stopped", "error"]
        assert g.refused(422, "stop", timeout=5, please=True)["errors"]

        # -- stop: the guest powers off on the ACPI button, not forced
        g.act("stop", ("stopped",))
        assert g.state() == "shutoff"
        assert "virtfleet-demo: power button, powering off" in g.console()
        assert g.show()["addresses"] == []

        # -- start: a guest whose first boot is done is `ready` again at once
        g.act("start", ("ready",), until=lambda: 2 in g.boot_counts() and g.count(READY) == 2)
        assert g.state() == "running"

        # -- reboot: a second (here third) boot on the console
        g.act("reboot", ("ready",), until=lambda: 3 in g.boot_counts() and g.count(READY) == 3)
        assert g.state() == "running" and g.count(READY) == 3

        # -- snapshot of the running guest: memory and disk, internal to the qcow2
        g.act("snapshot_create", ("ready",), path="/snapshots", name="s1")
        assert g.snapshots() == ["s1"] and g.virt.snapshot_current(g.id) == "s1"
        info = images.info(g.disk, "qcow2")
        [snap] = info["snapshots"]
        assert snap["name"] == "s1" and snap["vm-state-size"] > 0
        assert [(s["name"], s["state"]) for s in
                cluster.api.get(f"/vms/{g.id}/snapshots").json()] == [("s1", "ready")]

        g.act("reboot", ("ready",), until=lambda: 4 in g.boot_counts() and g.count(READY) == 4)

        # -- force off
        g.act("force_off", ("stopped",))
        assert g.state() == "shutoff"
        readies = g.count(READY)

        # -- revert: the guest runs again from the snapshot's memory (no boot), and its disk
        #    is the snapshot's: the next boot counts 4 again, not 5
        g.act("snapshot_revert", ("ready",), path="/snapshots/s1/revert")
        assert g.state() == "running" and g.virt.snapshot_current(g.id) == "s1"
        time.sleep(2)
        assert g.count(READY) == readies
        g.act("reboot", ("ready",), until=lambda: g.boot_counts().count(4) == 2)
        assert g.boot_counts() == [1, 2, 3, 4, 4]

        # -- a snapshot of the stopped guest (disk only), refusals, deletes
        g.act("stop", ("stopped",))
        g.act("snapshot_create", ("stopped",), name="s2")
        assert g.snapshots() == ["s1", "s2"]
        assert [s["vm-state-size"] for s in images.info(g.disk, "qcow2")["snapshots"]][1] == 0
        body = g.refused(409, "resize", vcpus=2)
        assert "without snapshots" in body["message"]
        g.act("snapshot_delete", ("stopped",), path="/snapshots/s1", method="DELETE")
        g.act("snapshot_delete", ("stopped",), name="s2")
        assert g.snapshots() == [] and "snapshots" not in images.info(g.disk, "qcow2")
        assert cluster.api.get(f"/vms/{g.id}/snapshots").json() == []

        # -- resize while stopped: vCPUs, memory, disk grown; the claim follows
        vm = g.act("resize", ("stopped",), vcpus=2, memory_mb=256, disk_gb=2)
        assert (vm["vcpus"], vm["memory_mb"], vm["disk_gb"]) == (2, 256, 2)
        root = g.xml()
        assert root.findtext("vcpu") == "2"
        assert root.findtext("memory") == str(256 * 1024)
        assert root.find("memory").get("unit") == "KiB"  # type: ignore[union-attr]
        assert images.info(g.disk, "qcow2")["virtual-size"] == 2 * GIB
        host = cluster.api.get("/hosts/local").json()
        assert (host["used_vcpus"], host["used_memory_mb"], host["used_disk_gb"]) == (2, 256, 2)
        body = g.refused(409, "resize", disk_gb=1)
        assert "can only grow" in body["message"]
        assert images.info(g.disk, "qcow2")["virtual-size"] == 2 * GIB

        # -- rebuild: same id, name and MAC, a fresh disk (the counter starts again) at the
        #    new size, a fresh boot with the same instance-id; `running` until the new boot
        #    prints its own ready line (the log keeps the earlier boots' lines)
        before = g.count(f"virtfleet-demo: instance-id={g.id}")
        markers = g.count(c.READY_MARKER)
        vm = g.act("rebuild", ("running",),
                   until=lambda: g.boot_counts()[-1:] == [1] and len(g.boot_counts()) == 6)
        ready = cluster.api.wait_vm(g.id, ("ready", "error"), timeout=120)
        assert ready["state"] == "ready", ready
        assert g.count(c.READY_MARKER) == markers + 1
        assert ready["boot_seconds"] > 2, ready  # this boot's line, not an old one at once
        assert (vm["id"], vm["name"], vm["mac"]) == (g.id, "acts", g.vm["mac"])
        root = g.xml()
        assert root.findtext("uuid") == g.id and root.findtext("vcpu") == "2"
        assert root.find("devices/interface/mac").get("address") == g.vm["mac"]  # type: ignore[union-attr]
        assert g.count(f"virtfleet-demo: instance-id={g.id}") == before + 1
        assert images.info(g.disk, "qcow2")["virtual-size"] == 2 * GIB
        assert g.state() == "running"

        # -- delete stays as it was
        t1 = time.monotonic()
        assert cluster.api.delete(f"/vms/{g.id}").status_code == 202
        cluster.api.wait_vm(g.id, ("gone",), timeout=60)
        g.timings.append(("delete", time.monotonic() - t1, 0.0))
        assert g.state() is None and not g.disk.exists()
    finally:
        print("\naction timings (wall clock from the request to the final state; job):")
        for name, wall, job in g.timings:
            print(f"  {name:28s} {wall:7.2f} s   job {job:6.2f} s")
        g.virt.close()
