"""A VM submitted through the API boots and reaches `ready`: web, scheduler and worker as
separate processes over real Redis and libvirtd, the demo guest under QEMU TCG, its ready line
seen on the serial console, each step's time shown, the same VM through `virtfleet vm`
(list, console, delete), and nothing left after delete."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from bench.cluster import Cluster
from fleet import contract as c
from fleet.cli import main
from fleet.config import load_settings
from fleet.store.models import Claim
from fleet.store.session import Store
from worker.virt import Virt

pytestmark = pytest.mark.e2e

USER_DATA = '#!/bin/sh\necho "user-data-says-$((20 + 22))"\n'


def console(cluster: Cluster, vm_id: str) -> str:
    r = cluster.api.get(f"/vms/{vm_id}/console")
    assert r.status_code == 200, r.text
    return r.json()["output"]


def wait_console(cluster: Cluster, vm_id: str, needle: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = console(cluster, vm_id)
        if needle in text:
            return text
        time.sleep(1)
    raise AssertionError(f"{needle!r} never appeared on the console:\n{text[-2000:]}")


def test_vm_boots_through_the_whole_system_and_delete_leaves_nothing(cluster: Cluster) -> None:
    r = cluster.api.post("/vms", json={"name": "e2e-one", "image": "demo", "vcpus": 1,
                                       "memory_mb": 192, "disk_gb": 1, "user_data": USER_DATA})
    assert r.status_code == 202, r.text
    vm, job = r.json()["vm"], r.json()["job"]
    assert vm["state"] == "building" and vm["host"] == "local"

    running = cluster.api.wait_vm(vm["id"], ("running", "ready", "error"), timeout=120)
    assert running["state"] in ("running", "ready"), running
    assert [s["state"] for s in running["steps"]][:2] == ["building", "running"]
    assert cluster.api.get(f"/jobs/{job['id']}").json()["state"] == "done"

    virt = Virt("qemu:///system")
    try:
        assert virt.state(vm["id"]) == "running"
        text = wait_console(cluster, vm["id"], "virtfleet-demo: ready")
        assert f"virtfleet-demo: instance-id={vm['id']}" in text
        assert "virtfleet-demo: hostname=e2e-one" in text
        assert "user-data-says-42" in text

        # ready: the host saw the ready line of the user-data's ready part on the console
        ready = cluster.api.wait_vm(vm["id"], ("ready", "error"), timeout=120)
        assert ready["state"] == "ready", ready
        assert c.READY_MARKER in console(cluster, vm["id"])
        assert 0 < ready["boot_seconds"] < 120 and ready["ready_at"]
        assert [s["state"] for s in ready["steps"]][:3] == ["building", "running", "ready"]
        timings = {t["step"]: t for t in ready["timings"]}
        for step in ("placement", "queued", "image", "overlay", "seed", "define", "boot"):
            assert step in timings and timings[step]["seconds"] is not None, ready["timings"]
            assert not timings[step]["failed"]
        assert timings["boot"]["seconds"] == round(ready["boot_seconds"], 3)
        events = cluster.api.get("/events", params={"vm_id": vm["id"]}).json()
        assert [e["host"] for e in events if e["type"] == c.EV_VM_READY] == ["local"]

        host = cluster.api.get("/hosts/local").json()
        assert host["used_vcpus"] == 1 and host["used_memory_mb"] == 192

        instance_dir = cluster.root / "storage-local" / "instances" / vm["id"]
        assert (instance_dir / "disk.qcow2").exists() and (instance_dir / "seed.iso").exists()

        # The CLI sees what the API sees, and deletes through it.
        cli = ["--url", cluster.api.base, "--token", cluster.api.token]
        res = CliRunner().invoke(main, ["vm", "list", *cli])
        assert res.exit_code == 0, res.output
        assert res.output.splitlines()[1].split()[:4] == [vm["id"], "e2e-one", "ready", "local"]
        res = CliRunner().invoke(main, ["vm", "console", "e2e-one", *cli])
        assert res.exit_code == 0 and "virtfleet-demo: ready" in res.output
        res = CliRunner().invoke(main, ["vm", "delete", "e2e-one", "--wait", "--timeout", "60",
                                        *cli])
        assert res.exit_code == 0, res.output
        assert res.output.splitlines() == ["e2e-one: deleting", "e2e-one: gone"]
        assert virt.state(vm["id"]) is None
        assert not instance_dir.exists()
        host = cluster.api.get("/hosts/local").json()
        assert (host["used_vcpus"], host["used_memory_mb"], host["used_disk_gb"]) == (0, 0, 0)
        assert cluster.api.get("/vms").json() == []
        store = Store(load_settings(env=cluster.settings_env).db_url)
        with store.sessions() as s:
            assert s.scalars(select(Claim)).all() == []
        store.dispose()
    finally:
        virt.close()
