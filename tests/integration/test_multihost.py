"""Placement across several hosts: real `virtfleet worker` processes, each on libvirt's
`test:///` driver with its own capacity (node XML), behind a real web and scheduler."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cluster import Cluster

pytestmark = pytest.mark.integration

GIB_KIB = 1024 * 1024


def node_xml(path: Path, cpus: int, memory_gib: int) -> str:
    path.write_text(f"""<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active>
    <nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>
  <memory>{memory_gib * GIB_KIB}</memory>
</node>
""")
    return f"test://{path}"


def sim_hosts(tmp_path: Path, sizes: dict[str, tuple[int, int]],
               extra: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    workers = {}
    for name, (cpus, mem) in sizes.items():
        workers[name] = {"VIRTFLEET_LIBVIRT_URI": node_xml(tmp_path / f"{name}.xml", cpus, mem),
                         "VIRTFLEET_NETWORK": "none:", **(extra or {}).get(name, {})}
    return workers


@pytest.fixture
def three_hosts(tmp_path: Path, demo_image: Path) -> Iterator[Cluster]:
    workers = sim_hosts(tmp_path, {"h1": (8, 16), "h2": (8, 16), "h3": (8, 16)})
    with Cluster(workers=workers, env={"VIRTFLEET_CPU_ALLOCATION_RATIO": "1.0"}) as c:
        c.register_image("demo", demo_image)
        yield c


def create(c: Cluster, name: str, **kw: object) -> dict:
    body = {"name": name, "image": "demo", "vcpus": 1, "memory_mb": 1024, **kw}
    return c.api.post("/vms", json=body)


def hosts_of(c: Cluster, vms: list[dict]) -> list[str]:
    return [c.api.wait_vm(vm["id"], ("running",), timeout=60)["host"] for vm in vms]


def test_spread_then_labels_then_anti_affinity(three_hosts: Cluster) -> None:
    c = three_hosts
    # spread (the default): three VMs on three hosts
    r = create(c, "web", count=3)
    assert r.status_code == 202, r.text
    assert sorted(hosts_of(c, r.json()["vms"])) == ["h1", "h2", "h3"]

    # labels: only h2 carries zone=rack2
    assert c.api.call("PATCH", "/hosts/h2", json={"labels": {"zone": "rack2"}}).ok
    r = create(c, "db", constraints={"zone": "rack2"})
    assert r.status_code == 202, r.text
    assert hosts_of(c, [r.json()["vm"]]) == ["h2"]
    r = create(c, "nowhere", constraints={"zone": "rack9"})
    assert r.status_code == 409 and r.json()["errors"]["filters"]["labels"] == 3

    # hard anti-affinity: three members on three hosts, a fourth is refused with the reason
    g = c.api.post("/server-groups", json={"name": "ha", "policy": "anti-affinity"})
    assert g.status_code == 201, g.text
    r = create(c, "ha", count=3, server_group="ha")
    assert r.status_code == 202, r.text
    assert sorted(hosts_of(c, r.json()["vms"])) == ["h1", "h2", "h3"]
    r = create(c, "ha-4", server_group="ha")
    assert r.status_code == 409, r.text
    assert r.json()["errors"]["filters"]["server_group"] == 3
    assert c.api.get("/vms").json() and len(c.api.get("/vms").json()) == 7

    # the explain endpoint says the same without claiming anything
    ex = c.api.post("/placement/explain", json={"server_group": "ha"}).json()
    assert ex["filters"]["server_group"] == 3
    assert all(not h["passed"] and h["failed_filter"] == "server_group" for h in ex["hosts"])


def test_count_is_all_or_nothing(three_hosts: Cluster) -> None:
    c = three_hosts
    # 3 hosts x 8 vCPUs (ratio 1.0): 5 VMs of 4 vCPUs fit, 7 do not -> nothing is created
    r = create(c, "big", count=7, vcpus=4)
    assert r.status_code == 409, r.text
    assert c.api.get("/vms").json() == []
    assert all(h["used_vcpus"] == 0 for h in c.api.get("/hosts").json())
    r = create(c, "big", count=6, vcpus=4)
    assert r.status_code == 202, r.text
    assert all(h["used_vcpus"] == 8 for h in c.api.get("/hosts").json())


def test_pack_policy_fills_one_host_first(tmp_path: Path, demo_image: Path) -> None:
    workers = sim_hosts(tmp_path, {"p1": (8, 16), "p2": (8, 16), "p3": (8, 16)})
    with Cluster(workers=workers, env={"VIRTFLEET_PLACEMENT_POLICY": "pack"}) as c:
        c.register_image("demo", demo_image)
        r = create(c, "packed", count=3)
        assert r.status_code == 202, r.text
        placed = [vm["host"] for vm in r.json()["vms"]]
        hosts = hosts_of(c, r.json()["vms"])
        events = [(e["type"], e["host"], e["data"]) for vm in r.json()["vms"]
                  for e in c.api.get("/events", params={"vm_id": vm["id"]}).json()]
        assert len(set(placed)) == 1, (placed, events)
        assert len(set(hosts)) == 1, (hosts, events)


def test_dead_host_goes_down_and_failed_build_moves_to_an_alternate(
        tmp_path: Path, demo_image: Path) -> None:
    # "bad" has the most RAM (spread puts the first VM there) but a wrong host credential,
    # so it cannot fetch the base image: its build fails and goes to an alternate.
    workers = sim_hosts(tmp_path, {"bad": (8, 64), "good": (8, 16), "spare": (8, 16)},
                         extra={"bad": {"VIRTFLEET_HOST_TOKEN": "wrong-credential"}})
    with Cluster(workers=workers, env={"VIRTFLEET_HEARTBEAT_INTERVAL": "1",
                                       "VIRTFLEET_MISSED_HEARTBEATS": "3"}) as c:
        c.register_image("demo", demo_image)
        r = create(c, "retry")
        assert r.status_code == 202, r.text
        assert r.json()["vm"]["host"] == "bad"
        vm = c.api.wait_vm(r.json()["vm"]["id"], ("running", "error"), timeout=60)
        assert vm["state"] == "running" and vm["host"] in ("good", "spare"), vm
        events = c.api.get("/events", params={"vm_id": vm["id"]}).json()
        failed = [e for e in events if e["type"] == "vm.build.failed"]
        assert failed and failed[0]["host"] == "bad" and failed[0]["data"]["step"] == "image"
        assert c.api.get("/hosts/bad").json()["used_vcpus"] == 0

        # kill the worker of the host now holding the VM: down within the beats, VM unknown
        holder = vm["host"]
        killed_at = time.monotonic()
        c.stop(f"worker-{holder}", sig=signal.SIGKILL)
        deadline = killed_at + 1 * 3 + 10
        while time.monotonic() < deadline:
            if not c.api.get(f"/hosts/{holder}").json()["alive"]:
                break
            time.sleep(0.2)
        took = time.monotonic() - killed_at
        assert not c.api.get(f"/hosts/{holder}").json()["alive"], "host never marked down"
        assert took <= 1 * 3 + 3, f"marked down after {took:.1f}s"
        assert c.api.get(f"/vms/{vm['id']}").json()["state"] == "unknown"
        # no new VMs there
        for i in range(3):
            r = create(c, f"after-{i}")
            assert r.status_code == 202 and r.json()["vm"]["host"] != holder, r.text


def test_a_fleet_network_is_realised_on_the_host_of_its_vm(three_hosts: Cluster) -> None:
    # A test:///file host keeps its networks inside the worker's own connection, out of
    # this process's sight: the worker's log says when it defined and started one.
    c = three_hosts
    r = c.api.post("/networks", json={"name": "lab", "mode": "nat", "cidr": "10.123.0.0/24"})
    assert r.status_code == 201, r.text
    r = create(c, "on-lab", network="lab")
    assert r.status_code == 202, r.text
    vm = c.api.wait_vm(r.json()["vm"]["id"], ("running", "error"), timeout=60)
    assert vm["state"] == "running" and vm["network"] == "lab", vm
    realised = "libvirt network vf-lab (fleet network lab, nat) is defined and active"
    logs = {h: c.log_path(f"worker-{h}").read_text(errors="replace") for h in ("h1", "h2", "h3")}
    assert [h for h, text in logs.items() if realised in text] == [vm["host"]]

    # a second VM on that host: the network is used as it is, not defined again
    assert c.api.call("PATCH", "/hosts/" + vm["host"], json={"labels": {"lab": "yes"}}).ok
    r = create(c, "on-lab-2", network="lab", constraints={"lab": "yes"})
    assert r.status_code == 202, r.text
    second = c.api.wait_vm(r.json()["vm"]["id"], ("running", "error"), timeout=60)
    assert second["state"] == "running" and second["host"] == vm["host"], second
    assert c.log_path(f"worker-{vm['host']}").read_text(errors="replace").count(realised) == 1
