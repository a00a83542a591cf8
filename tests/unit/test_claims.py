"""Capacity claims on a real store: compare-and-set under concurrency, release, lost races.

Every test runs on a migrated SQLite file and on PostgreSQL. PostgreSQL comes from
VIRTFLEET_TEST_PG_URL (quickstart.sh test sets it): when set and unreachable the tests fail;
only when it is unset (a local run without PostgreSQL) are they skipped. Each PostgreSQL test
gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, inspect, select

from fleet.config import Settings
from fleet.exceptions import NoValidHost
from fleet.store.models import VM, Claim, Host, Image, Project
from fleet.store.session import Store
from scheduler import claims
from scheduler.placement import Request

PG_ENV = "VIRTFLEET_TEST_PG_URL"
SETTINGS = Settings(host_name="controller")
REQ = Request(vcpus=1, memory_mb=512, disk_gb=2)


def add_host(store: Store, name: str, memory_mb: int, **kw: object) -> int:
    """A host whose memory is the only tight resource (ratios 1.0, plenty of CPU and disk)."""
    with store.session() as s:
        values = dict(name=name, vcpus=64, memory_mb=memory_mb, disk_gb=1000, cpu_ratio=1.0,
                      ram_ratio=1.0, disk_ratio=1.0, labels={}, cached_images=[])
        values.update(kw)
        host = Host(**values)
        s.add(host)
        s.flush()
        return host.id


@pytest.fixture
def project_image(store: Store) -> tuple[int, str]:
    with store.session() as s:
        project = Project(name="p1")
        s.add(project)
        s.flush()
        image = Image(name="img", project_id=project.id, sha256="ab" * 32)
        s.add(image)
        s.flush()
        return project.id, image.id


def new_vm(s, project_image: tuple[int, str], name: str) -> VM:  # type: ignore[no-untyped-def]
    vm = VM(name=name, project_id=project_image[0], image_id=project_image[1],
            vcpus=REQ.vcpus, memory_mb=REQ.memory_mb, disk_gb=REQ.disk_gb)
    s.add(vm)
    s.flush()
    return vm


def host_row(store: Store, name: str) -> Host:
    with store.sessions() as s:
        host = s.scalars(select(Host).where(Host.name == name)).one()
        s.expunge(host)
        return host


def claim_sums(store: Store, host_id: int) -> tuple[int, int, int, int]:
    with store.sessions() as s:
        row = s.execute(select(func.count(Claim.id), func.coalesce(func.sum(Claim.vcpus), 0),
                               func.coalesce(func.sum(Claim.memory_mb), 0),
                               func.coalesce(func.sum(Claim.disk_gb), 0))
                        .where(Claim.host_id == host_id)).one()
        return tuple(int(v) for v in row)  # type: ignore[return-value]


@pytest.mark.parametrize("threads, room", [(12, 5), (8, 1)])
def test_concurrent_claims_take_exactly_the_room(store: Store, project_image: tuple[int, str],
                                                 threads: int, room: int) -> None:
    host_id = add_host(store, "h1", memory_mb=room * REQ.memory_mb)
    barrier = threading.Barrier(threads + 1)
    won: list[str] = []
    refused: list[NoValidHost] = []
    crashed: list[BaseException] = []
    done = threading.Event()
    over: list[int] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            with store.session() as s:
                vm = new_vm(s, project_image, f"vm-{i}")
                chosen = claims.place_and_claim(s, vm, REQ, SETTINGS)
                assert chosen.name == "h1" and vm.host_id == host_id
                vm.state = "building"
                vm_id = vm.id
            won.append(vm_id)
        except NoValidHost as exc:
            refused.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            crashed.append(exc)

    def watch() -> None:
        barrier.wait()
        while not done.is_set():
            used = host_row(store, "h1").used_memory_mb
            if used > room * REQ.memory_mb:
                over.append(used)

    workers = [threading.Thread(target=attempt, args=(i,)) for i in range(threads)]
    watcher = threading.Thread(target=watch)
    for t in workers:
        t.start()
    watcher.start()
    for t in workers:
        t.join(timeout=120)
    done.set()
    watcher.join(timeout=30)

    assert not crashed, crashed
    assert len(won) == room
    assert len(refused) == threads - room
    # Every refusal says why: the host was full (not a spurious "lost the race, try again").
    for exc in refused:
        assert exc.errors["filters"]["resources"] == 1, str(exc)
    assert not over, f"host went above capacity: {over}"
    host = host_row(store, "h1")
    count, vcpus, memory, disk = claim_sums(store, host_id)
    assert count == room
    assert (host.used_vcpus, host.used_memory_mb, host.used_disk_gb) == (vcpus, memory, disk)
    assert host.used_memory_mb == room * REQ.memory_mb
    assert host.generation == room
    with store.sessions() as s:
        vms = s.scalars(select(VM)).all()
        assert sorted(v.id for v in vms) == sorted(won)  # losers left no VM row behind
        assert all(v.host_id == host_id and v.state == "building" for v in vms)
        assert sorted(s.scalars(select(Claim.vm_id))) == sorted(won)


def test_release_gives_back_once(store: Store, project_image: tuple[int, str]) -> None:
    host_id = add_host(store, "h1", memory_mb=2048)
    with store.session() as s:
        vm = new_vm(s, project_image, "vm-1")
        claims.place_and_claim(s, vm, REQ, SETTINGS)
        vm_id = vm.id
    taken = host_row(store, "h1")
    assert (taken.used_vcpus, taken.used_memory_mb, taken.used_disk_gb) == (1, 512, 2)

    with store.session() as s:
        assert claims.release(s, vm_id) is True
    after = host_row(store, "h1")
    assert (after.used_vcpus, after.used_memory_mb, after.used_disk_gb) == (0, 0, 0)
    assert after.generation == taken.generation + 1
    assert claim_sums(store, host_id)[0] == 0

    with store.session() as s:
        assert claims.release(s, vm_id) is False
        assert claims.release(s, "no-such-vm") is False
    again = host_row(store, "h1")
    assert (again.used_vcpus, again.used_memory_mb, again.used_disk_gb) == (0, 0, 0)
    assert again.generation == after.generation


def test_concurrent_releases_give_back_once(store: Store,
                                            project_image: tuple[int, str]) -> None:
    add_host(store, "h1", memory_mb=2048)
    vm_ids = []
    for i in range(2):
        with store.session() as s:
            vm = new_vm(s, project_image, f"vm-{i}")
            claims.place_and_claim(s, vm, REQ, SETTINGS)
            vm_ids.append(vm.id)
    n = 8
    barrier = threading.Barrier(n)
    results: list[bool] = []
    crashed: list[BaseException] = []

    def release() -> None:
        barrier.wait()
        try:
            with store.session() as s:
                results.append(claims.release(s, vm_ids[0]))
        except BaseException as exc:  # noqa: BLE001
            crashed.append(exc)

    workers = [threading.Thread(target=release) for _ in range(n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not crashed, crashed
    assert sorted(results) == [False] * (n - 1) + [True]
    host = host_row(store, "h1")
    # The other VM's claim is still counted, exactly once.
    assert (host.used_vcpus, host.used_memory_mb, host.used_disk_gb) == (1, 512, 2)


def test_stale_snapshot_loses_the_cas(store: Store) -> None:
    host_id = add_host(store, "h1", memory_mb=2048)
    with store.sessions() as s:
        seen = claims.snapshot(s.get(Host, host_id), SETTINGS)
    with store.session() as s:  # someone else's claim moves the generation on
        assert claims.try_claim(s, seen, "vm-a", REQ) is True
    with store.session() as s:
        assert claims.try_claim(s, seen, "vm-b", REQ) is False
    host = host_row(store, "h1")
    assert host.used_memory_mb == 512 and host.generation == 1
    with store.sessions() as s:
        assert list(s.scalars(select(Claim.vm_id))) == ["vm-a"]


def test_lost_cas_moves_on_to_the_next_candidate(store: Store, project_image: tuple[int, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    big = add_host(store, "big", memory_mb=4096)
    small = add_host(store, "small", memory_mb=2048)
    real_rank = claims.rank
    interlopers: list[str] = []
    current: dict[str, object] = {}

    def rank_then_lose(hosts, req, *a, **kw):  # type: ignore[no-untyped-def]
        ranking = real_rank(hosts, req, *a, **kw)
        if not interlopers:
            # Between our read and our CAS, another request claims on the best host.
            assert ranking.hosts[0].name == "big"
            if store.url.startswith("sqlite"):
                # SQLite: our transaction holds the write lock since its first statement,
                # so the other request's claim is made in it, just before our CAS.
                assert claims.try_claim(current["session"], ranking.hosts[0], "vm-other", REQ)
            else:
                # PostgreSQL: a real concurrent transaction claims and commits in between.
                with store.session() as other:
                    assert claims.try_claim(other, ranking.hosts[0], "vm-other", REQ)
            interlopers.append("vm-other")
        return ranking

    monkeypatch.setattr(claims, "rank", rank_then_lose)
    with store.session() as s:
        current["session"] = s
        vm = new_vm(s, project_image, "vm-1")
        chosen = claims.place_and_claim(s, vm, REQ, SETTINGS)
        assert chosen.name == "small"
        assert vm.host_id == small
        assert vm.alternates == []
        vm_id = vm.id
    assert interlopers == ["vm-other"]
    assert host_row(store, "big").used_memory_mb == 512  # only the interloper
    assert host_row(store, "small").used_memory_mb == 512
    with store.sessions() as s:
        placed = {c.vm_id: c.host_id for c in s.scalars(select(Claim))}
    assert placed == {vm_id: small, "vm-other": big}


def test_chosen_host_keeps_alternates(store: Store, project_image: tuple[int, str]) -> None:
    for name, mem in (("a", 8192), ("b", 6144), ("c", 4096), ("d", 2048)):
        add_host(store, name, memory_mb=mem)
    with store.session() as s:
        vm = new_vm(s, project_image, "vm-1")
        chosen = claims.place_and_claim(s, vm, REQ, SETTINGS)
        assert chosen.name == "a"
        assert vm.alternates == ["b", "c"]  # best first, at most MAX_ALTERNATES
    with store.session() as s:
        vm = new_vm(s, project_image, "vm-2")
        chosen = claims.place_and_claim(s, vm, REQ, SETTINGS, only=frozenset({"c", "d"}))
        assert chosen.name == "c" and vm.alternates == ["d"]


def test_no_room_raises_with_per_filter_counts(store: Store,
                                               project_image: tuple[int, str]) -> None:
    add_host(store, "full", memory_mb=256)
    add_host(store, "dead", memory_mb=8192, alive=False)
    add_host(store, "off", memory_mb=8192, maintenance=True)
    with pytest.raises(NoValidHost) as err, store.session() as s:
        vm = new_vm(s, project_image, "vm-1")
        claims.place_and_claim(s, vm, REQ, SETTINGS)
    assert err.value.http_status == 409
    assert err.value.errors == {"hosts": 3, "filters": {
        "alive": 1, "enabled": 1, "arch": 0, "resources": 1, "labels": 0, "max_vms": 0,
        "server_group": 0}}
    assert "3 hosts" in str(err.value)
    with store.sessions() as s:  # the failed transaction left nothing behind
        assert s.scalars(select(VM)).all() == []
        assert s.scalars(select(Claim)).all() == []
    assert {h: host_row(store, h).used_memory_mb for h in ("full", "dead", "off")} == \
        {"full": 0, "dead": 0, "off": 0}


def test_check_room_refuses_from_committed_hosts_without_the_writer(
        store: Store, project_image: tuple[int, str]) -> None:
    """The early refusal reads only committed state (a read session: no write transaction),
    re-reads before refusing when the cache says no room, and passes when a host has room."""
    from scheduler import hostcache
    hostcache.reset()
    host = add_host(store, "small", memory_mb=512)
    with store.sessions() as r:
        claims.check_room(r, REQ, SETTINGS)  # 512 MiB free: room for one
    with store.session() as s:  # another API process takes the last room
        claims.place_and_claim(s, new_vm(s, project_image, "vm-1"), REQ, SETTINGS)
    with pytest.raises(NoValidHost) as err, store.sessions() as r:
        claims.check_room(r, REQ, SETTINGS)
    assert err.value.errors["filters"]["resources"] == 1
    with store.session() as s:  # room given back: the cached "full" host is read again
        assert claims.release(s, s.scalars(select(VM.id)).one())
    with store.sessions() as r:
        claims.check_room(r, REQ, SETTINGS)
    assert host_row(store, "small").id == host
    hostcache.reset()


def test_settings_ratios_apply_when_the_host_has_none(store: Store,
                                                      project_image: tuple[int, str]) -> None:
    # 2 vCPUs and no per-host ratio: the default cpu_allocation_ratio (4.0) allows 8.
    add_host(store, "h1", memory_mb=1 << 20, vcpus=2, cpu_ratio=None)
    req = Request(vcpus=8, memory_mb=64, disk_gb=1)
    with store.session() as s:
        vm = new_vm(s, project_image, "vm-1")
        assert claims.place_and_claim(s, vm, req, SETTINGS).used_vcpus == 8
    with pytest.raises(NoValidHost), store.session() as s:
        vm = new_vm(s, project_image, "vm-2")
        claims.place_and_claim(s, vm, Request(vcpus=1, memory_mb=64, disk_gb=1), SETTINGS)


def test_migrations_make_every_table(store: Store) -> None:
    names = set(inspect(store.engine).get_table_names())
    assert {"hosts", "vms", "claims", "jobs", "images", "events", "projects", "users",
            "api_tokens", "alembic_version"} <= names
