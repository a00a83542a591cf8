"""Static address allocation (scheduler.ipam) on a real store, SQLite and PostgreSQL: lowest
free first, never the gateway or the DHCP range, one holder per address even when many
threads on several engines (connections) ask at once, a lost insert retried, 409 when the
pool is exhausted, addresses back on release."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from fleet import networks
from fleet.exceptions import Conflict
from fleet.store.models import VM, Image, IPAllocation, Network, Project
from fleet.store.session import Store
from scheduler import ipam


def add_network(store: Store, name: str = "lab", cidr: str = "10.9.0.0/28",
                **kw: Any) -> str:
    d = networks.define(kw.pop("mode", "nat"), cidr, **kw)
    with store.session() as s:
        net = Network(name=name, mode=d.mode, bridge=d.bridge, cidr=d.cidr, gateway=d.gateway,
                      dns=d.dns, dhcp_start=d.dhcp_start, dhcp_end=d.dhcp_end)
        s.add(net)
        s.flush()
        return net.id


def add_vms(store: Store, n: int) -> list[str]:
    with store.session() as s:
        project = Project(name="p1")
        s.add(project)
        s.flush()
        image = Image(name="img", project_id=project.id, sha256="ab" * 32)
        s.add(image)
        s.flush()
        vms = [VM(name=f"vm{i}", project_id=project.id, image_id=image.id, vcpus=1,
                  memory_mb=64, disk_gb=1) for i in range(n)]
        s.add_all(vms)
        s.flush()
        return [vm.id for vm in vms]


def allocate(store: Store, network_id: str, vm_id: str) -> str:
    with store.session() as s:
        return ipam.allocate(s, s.get(Network, network_id), vm_id)


def held(store: Store) -> dict[str, str]:
    with store.sessions() as s:
        return {a.address: a.vm_id for a in s.scalars(select(IPAllocation))}


# -- pure ---------------------------------------------------------------------------------


def test_lowest_free_skips_what_is_taken() -> None:
    pool = networks.static_pool("10.9.0.0/28", "10.9.0.1", "10.9.0.8", "10.9.0.14")
    assert ipam.lowest_free(pool, []) == "10.9.0.2"
    assert ipam.lowest_free(pool, ["10.9.0.2", "10.9.0.4"]) == "10.9.0.3"
    taken = [f"10.9.0.{i}" for i in range(2, 8)]
    assert ipam.lowest_free(pool, taken) is None
    # Several ranges: the gateway in the middle of the pool.
    pool = networks.static_pool("10.9.0.0/28", "10.9.0.3", "10.9.0.8", "10.9.0.14")
    assert pool == [(int(networks.ipaddress.IPv4Address("10.9.0.1")),
                     int(networks.ipaddress.IPv4Address("10.9.0.2"))),
                    (int(networks.ipaddress.IPv4Address("10.9.0.4")),
                     int(networks.ipaddress.IPv4Address("10.9.0.7")))]
    assert ipam.lowest_free(pool, ["10.9.0.1", "10.9.0.2"]) == "10.9.0.4"


# -- on the store ---------------------------------------------------------------------------


def test_lowest_first_and_released_addresses_come_back(store: Store) -> None:
    net = add_network(store)  # /28: gateway .1, DHCP .8-.14, static .2-.7
    vms = add_vms(store, 3)
    assert [allocate(store, net, v) for v in vms] == ["10.9.0.2", "10.9.0.3", "10.9.0.4"]
    with store.session() as s:
        assert ipam.release(s, vms[0]) == 1
        assert ipam.release(s, vms[0]) == 0  # idempotent
    assert allocate(store, net, vms[0]) == "10.9.0.2"
    assert held(store) == {"10.9.0.2": vms[0], "10.9.0.3": vms[1], "10.9.0.4": vms[2]}


def test_exhausted_pool_is_409_and_holds_nothing_more(store: Store) -> None:
    net = add_network(store, cidr="10.9.0.0/29")  # gateway .1, DHCP .4-.6, static .2-.3
    vms = add_vms(store, 3)
    assert allocate(store, net, vms[0]) == "10.9.0.2"
    assert allocate(store, net, vms[1]) == "10.9.0.3"
    with pytest.raises(Conflict) as err:
        allocate(store, net, vms[2])
    assert err.value.http_status == 409
    assert "no free static address" in str(err.value) and "2" in str(err.value)
    assert err.value.errors == {"network": "lab", "pool_size": 2}
    assert len(held(store)) == 2


def test_the_unique_key_decides_a_lost_race(store: Store,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale read (as if another controller took .2 just after we looked) makes the insert
    collide: the savepoint is rolled back, the allocation reads again and takes .3, and the
    VM row written before it in the same transaction survives."""
    net = add_network(store)
    vms = add_vms(store, 2)
    assert allocate(store, net, vms[0]) == "10.9.0.2"
    real, calls = ipam.taken, []

    def stale_once(session: Any, network_id: str) -> list[str]:
        calls.append(network_id)
        return [] if len(calls) == 1 else real(session, network_id)

    monkeypatch.setattr(ipam, "taken", stale_once)
    with store.session() as s:
        s.get(VM, vms[1]).state = "building"  # something else in the same transaction
        assert ipam.allocate(s, s.get(Network, net), vms[1]) == "10.9.0.3"
    assert len(calls) >= 3  # the stale read, the check that it was a lost race, the re-read
    assert held(store) == {"10.9.0.2": vms[0], "10.9.0.3": vms[1]}
    with store.sessions() as s:
        assert s.get(VM, vms[1]).state == "building"


def test_an_insert_that_fails_for_another_reason_is_not_retried(store: Store) -> None:
    net = add_network(store)
    with pytest.raises(Exception) as err, store.session() as s:
        ipam.allocate(s, s.get(Network, net), "no-such-vm")  # the VM foreign key fails
    assert not isinstance(err.value, Conflict)
    assert held(store) == {}


@pytest.mark.parametrize("threads, engines", [(12, 3)])
def test_concurrent_allocations_never_share_an_address(store: Store, threads: int,
                                                       engines: int,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """12 requests at once from 3 engines (as many connection pools as API processes) for a
    pool of 6: exactly 6 get an address, all different; the other 6 get the 409. On
    PostgreSQL the inserts really collide (SQLite has one writer at a time)."""
    caplog.set_level("DEBUG", logger="scheduler.ipam")
    net = add_network(store)  # static .2-.7
    vms = add_vms(store, threads)
    stores = [store] + [Store(store.url) for _ in range(engines - 1)]
    barrier = threading.Barrier(threads)
    got: dict[str, str] = {}
    refused: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        st = stores[i % engines]
        try:
            barrier.wait(timeout=30)
            with st.session() as s:
                address = ipam.allocate(s, s.get(Network, net), vms[i])
                time.sleep(0.05)  # hold the uncommitted insert: others collide with it
            with lock:
                got[vms[i]] = address
        except Conflict:
            with lock:
                refused.append(vms[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=120)
    finally:
        for st in stores[1:]:
            st.dispose()
    assert errors == []
    assert len(got) == 6 and len(refused) == threads - 6
    assert sorted(got.values(), key=lambda a: int(a.rsplit(".", 1)[1])) == \
        [f"10.9.0.{i}" for i in range(2, 8)]
    assert held(store) == {a: v for v, a in got.items()}
    with store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(IPAllocation)) == 6
    if store.url.startswith("postgresql"):
        assert any("taken meanwhile" in r.getMessage() for r in caplog.records)


def test_allocating_under_the_network_lock_the_create_takes(store: Store) -> None:
    """As web.vmops does: the network read FOR KEY SHARE (a delete waits), then allocate."""
    from web.api.networks import find_network
    net = add_network(store)
    vms = add_vms(store, 2)
    for vm_id, want in zip(vms, ("10.9.0.2", "10.9.0.3"), strict=True):
        with store.session() as s:
            assert ipam.allocate(s, find_network(s, "lab", lock=True), vm_id) == want
            assert ipam.held(s, net) == int(want.rsplit(".", 1)[1]) - 1
