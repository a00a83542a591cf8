"""The per-process host cache on a real store (SQLite and PostgreSQL, as in test_claims):
stale hosts are caught by the compare-and-set, the TTL brings new hosts in, hosts marked down
are not chosen, rolled-back claims never reach the cache; deciders side by side pass over
the hosts each other is claiming on and lose no compare-and-set."""

from __future__ import annotations

import dataclasses
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from fleet import contract as c
from fleet.config import Settings, load_settings
from fleet.exceptions import ConfigError, NoValidHost
from fleet.store.models import VM, Claim, Host, utcnow
from fleet.store.session import Store
from scheduler import claims, hostcache
from scheduler.events import apply_event, mark_silent_hosts_down
from scheduler.snapshot import Request
from tests.unit import test_claims

project_image = test_claims.project_image
add_host = test_claims.add_host
new_vm = test_claims.new_vm
host_row = test_claims.host_row

SETTINGS = Settings(host_name="controller", heartbeat_interval=5.0, missed_heartbeats=3)
REQ = Request(vcpus=1, memory_mb=512, disk_gb=2)
TRY_CLAIM = claims.try_claim
"""The real compare-and-set (the `cas` fixture counts place_and_claim's own)."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    hostcache.reset()
    yield
    hostcache.reset()


@pytest.fixture
def cas(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Every compare-and-set place_and_claim makes: (host name, won)."""
    seen: list[tuple[str, bool]] = []
    def counting(session, host, vm_id, req):  # type: ignore[no-untyped-def]
        won = TRY_CLAIM(session, host, vm_id, req)
        seen.append((host.name, won))
        return won

    monkeypatch.setattr(claims, "try_claim", counting)
    return seen


def place(store: Store, project_image: tuple[int, str], name: str,
          settings: Settings = SETTINGS, req: Request = REQ) -> str:
    with store.session() as s:
        vm = new_vm(s, project_image, name)
        return claims.place_and_claim(s, vm, req, settings).name


def the_cache(store: Store) -> hostcache.HostCache:
    (cache,) = hostcache.caches()  # the fixture reset the others
    return cache


def frozen_clock(store: Store) -> Clock:
    """Make the store's cache before its first use, on a clock that moves only when told."""
    clock = Clock()
    url = store.engine.url.render_as_string(hide_password=False)
    hostcache.cache_for(url, SETTINGS.host_cache_ttl).clock = clock
    return clock


def claim_elsewhere(store: Store, name: str, vm_id: str) -> None:
    """Another process claims on `name` with a fresh read (not through our cache)."""
    with store.session() as s:
        snap = claims.snapshot(s.scalars(select(Host).where(Host.name == name)).one(), SETTINGS)
        assert TRY_CLAIM(s, snap, vm_id, REQ)


def assert_consistent(store: Store) -> None:
    """No host above capacity; each host's used capacity is the sum of its claims."""
    with store.sessions() as s:
        for h in s.scalars(select(Host)):
            assert h.used_memory_mb <= h.memory_mb * (h.ram_ratio or 1.0), h.name
            total = s.scalar(select(func.coalesce(func.sum(Claim.memory_mb), 0))
                             .where(Claim.host_id == h.id))
            assert h.used_memory_mb == total, h.name


def test_a_claim_elsewhere_makes_our_copy_stale_and_the_cas_catches_it(
        store: Store, project_image: tuple[int, str], cas: list[tuple[str, bool]]) -> None:
    add_host(store, "h1", memory_mb=3 * 512)
    frozen_clock(store)
    assert place(store, project_image, "vm-1") == "h1"  # loads the cache: h1 has room for 2
    cache = the_cache(store)
    assert cache.reloads == 1
    claim_elsewhere(store, "h1", "vm-other")  # now room for 1; our copy says 2

    assert place(store, project_image, "vm-2") == "h1"  # lost once, re-read, won
    assert cas == [("h1", True), ("h1", False), ("h1", True)]
    assert host_row(store, "h1").used_memory_mb == 3 * 512

    with pytest.raises(NoValidHost) as err:
        place(store, project_image, "vm-3")
    assert err.value.errors["filters"]["resources"] == 1
    assert cache.reloads == 2  # only to check before refusing
    assert_consistent(store)


def test_after_a_lost_compare_and_set_the_next_candidates_are_read_with_it_and_the_taken_skipped(
        store: Store, project_image: tuple[int, str], cas: list[tuple[str, bool]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process took h2, h3 and h4, the hosts our stale copy ranks first: the lost
    compare-and-set on h2 re-reads h2 and the candidates after it in one statement, h3 and h4
    are skipped unclaimed, and h5 is taken: one lost compare-and-set, not three."""
    for i in range(1, 7):
        add_host(store, f"h{i}", memory_mb=8 * 512)
    frozen_clock(store)
    assert place(store, project_image, "vm-1") == "h1"  # loads the cache; h2..h6 now tie
    for name in ("h2", "h3", "h4"):
        claim_elsewhere(store, name, f"vm-other-{name}")
    reads: list[list[int]] = []
    real = hostcache.read_hosts_by_id

    def counting(conn, settings, host_ids):  # type: ignore[no-untyped-def]
        reads.append(list(host_ids))
        return real(conn, settings, host_ids)

    monkeypatch.setattr(hostcache, "read_hosts_by_id", counting)
    assert place(store, project_image, "vm-2") == "h5"
    assert cas == [("h1", True), ("h2", False), ("h5", True)]
    ids = {h.name: h.id for h in the_cache(store).current() or ()}
    assert len(reads) == 1 and reads[0][0] == ids["h2"]  # the lost host first, in one read
    assert {ids["h3"], ids["h4"], ids["h5"]} <= set(reads[0])
    # The re-read states reached the shared copy with the commit: nothing is lost next time.
    cas.clear()
    assert place(store, project_image, "vm-3") == "h6"
    assert cas == [("h6", True)]
    assert_consistent(store)


def test_a_stale_copy_never_overfills_a_host(store: Store, project_image: tuple[int, str],
                                              cas: list[tuple[str, bool]]) -> None:
    add_host(store, "h1", memory_mb=2 * 512)
    assert place(store, project_image, "vm-1") == "h1"  # our copy: room for 1 more
    claim_elsewhere(store, "h1", "vm-other")  # the store: full
    with pytest.raises(NoValidHost) as err:
        place(store, project_image, "vm-2")
    assert err.value.errors == {"hosts": 1, "filters": {
        "alive": 0, "enabled": 0, "arch": 0, "resources": 1, "labels": 0, "max_vms": 0,
        "server_group": 0}}
    assert cas == [("h1", True), ("h1", False)]
    assert host_row(store, "h1").used_memory_mb == 2 * 512
    assert_consistent(store)


def test_the_ttl_reload_brings_in_a_new_host(store: Store,
                                             project_image: tuple[int, str]) -> None:
    add_host(store, "small", memory_mb=4096)
    clock = frozen_clock(store)
    assert place(store, project_image, "vm-1") == "small"
    assert place(store, project_image, "vm-2") == "small"
    cache = the_cache(store)
    add_host(store, "big", memory_mb=65536)
    clock.now += SETTINGS.host_cache_ttl / 2
    assert place(store, project_image, "vm-3") == "small"  # still the cached hosts
    clock.now += SETTINGS.host_cache_ttl / 2
    assert place(store, project_image, "vm-4") == "big"  # the TTL ran out: reloaded
    assert cache.reloads == 2
    assert_consistent(store)


def test_a_refusal_is_never_made_on_cached_hosts_alone(store: Store,
                                                       project_image: tuple[int, str]) -> None:
    add_host(store, "small", memory_mb=512)
    frozen_clock(store)
    assert place(store, project_image, "vm-1") == "small"  # now full
    add_host(store, "new", memory_mb=4096)
    assert place(store, project_image, "vm-2") == "new"  # nothing fits in the copy: re-read
    assert_consistent(store)


def test_a_host_marked_down_is_not_chosen(store: Store, project_image: tuple[int, str],
                                          cas: list[tuple[str, bool]]) -> None:
    add_host(store, "big", memory_mb=65536, last_heartbeat=utcnow())
    add_host(store, "small", memory_mb=4096, last_heartbeat=utcnow())
    clock = frozen_clock(store)
    assert place(store, project_image, "vm-1") == "big"
    later = utcnow() + timedelta(seconds=16)
    with store.session() as s:  # "small" keeps beating, "big" falls silent
        s.execute(update(Host).where(Host.name == "small").values(last_heartbeat=later))
    before = host_row(store, "big").generation
    with store.session() as s:
        assert mark_silent_hosts_down(s, SETTINGS, now=later) == ["big"]
    assert host_row(store, "big").generation == before + 1

    assert place(store, project_image, "vm-2") == "small"  # our copy still had big alive
    assert cas[-2:] == [("big", False), ("small", True)]
    assert place(store, project_image, "vm-3") == "small"  # and now it knows
    assert cas[-1] == ("small", True)

    # A heartbeat brings it back (and moves its generation); the next reload sees it.
    with store.session() as s:
        apply_event(s, c.make_event(c.EV_HEARTBEAT, host="big", vcpus=64, memory_mb=65536,
                                    disk_gb=1000, arch="x86_64", virt_type="qemu"), SETTINGS)
    assert host_row(store, "big").alive
    assert host_row(store, "big").generation == before + 2
    clock.now += SETTINGS.host_cache_ttl
    assert place(store, project_image, "vm-4") == "big"
    assert_consistent(store)


def test_a_host_disabled_in_our_own_transaction_is_skipped(
        store: Store, project_image: tuple[int, str], cas: list[tuple[str, bool]]) -> None:
    add_host(store, "big", memory_mb=65536)
    add_host(store, "small", memory_mb=4096)
    assert place(store, project_image, "vm-1") == "big"
    with store.session() as s:  # as an evacuation does: disable, then place in one go
        host = s.scalars(select(Host).where(Host.name == "big")).one()
        host.enabled = False
        host.generation = host.generation + 1
        s.flush()
        vm = new_vm(s, project_image, "vm-2")
        assert claims.place_and_claim(s, vm, REQ, SETTINGS).name == "small"
        vm = new_vm(s, project_image, "vm-3")  # the transaction's overlay knows it now
        assert claims.place_and_claim(s, vm, REQ, SETTINGS).name == "small"
    assert cas[1:] == [("big", False), ("small", True), ("small", True)]
    assert_consistent(store)


def test_several_vms_in_one_transaction_see_each_others_claims(
        store: Store, project_image: tuple[int, str], cas: list[tuple[str, bool]]) -> None:
    add_host(store, "h1", memory_mb=3 * 512)
    add_host(store, "h2", memory_mb=2 * 512)
    with store.session() as s:
        chosen = [claims.place_and_claim(s, new_vm(s, project_image, f"vm-{i}"), REQ,
                                         SETTINGS).name for i in range(5)]
    assert sorted(chosen) == ["h1", "h1", "h1", "h2", "h2"]
    assert all(won for _, won in cas)  # never raced with itself
    with pytest.raises(NoValidHost):
        place(store, project_image, "vm-5")
    assert_consistent(store)


def test_a_rolled_back_claim_never_reaches_the_cache(
        store: Store, project_image: tuple[int, str], cas: list[tuple[str, bool]]) -> None:
    add_host(store, "h1", memory_mb=2 * 512)
    assert place(store, project_image, "vm-1") == "h1"
    with pytest.raises(RuntimeError), store.session() as s:
        claims.place_and_claim(s, new_vm(s, project_image, "vm-2"), REQ, SETTINGS)
        raise RuntimeError("the build could not be sent")
    # The cache must still hold h1 as the store does (one VM), or a later claim could be
    # checked against numbers that were never committed.
    cache = the_cache(store)
    snap = cache.table(SETTINGS)[0]
    assert (snap.generation, snap.used_memory_mb, snap.vm_count) == (1, 512, 1)
    assert place(store, project_image, "vm-3") == "h1"
    assert all(won for _, won in cas)
    assert host_row(store, "h1").used_memory_mb == 1024
    assert_consistent(store)


def test_a_commit_merges_the_claim_into_the_shared_copy(
        store: Store, project_image: tuple[int, str]) -> None:
    add_host(store, "h1", memory_mb=4096)
    place(store, project_image, "vm-1")
    snap = the_cache(store).table(SETTINGS)[0]
    assert (snap.generation, snap.used_memory_mb, snap.used_vcpus, snap.used_disk_gb,
            snap.vm_count, snap.builds) == (1, 512, 1, 2, 1, 1)
    fresh = host_row(store, "h1")
    assert (fresh.generation, fresh.used_memory_mb) == (1, 512)


def test_a_claim_merged_during_a_reload_that_found_nothing_new_is_kept(
        store: Store, project_image: tuple[int, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload reads the hosts, finds nothing changed, and is about to hand back the table
    it had; meanwhile a claim commits and is merged. The reload must not put the older
    table back: the next decider would try the claimed host at its old generation."""
    add_host(store, "h1", memory_mb=4096)
    place(store, project_image, "vm-1")
    cache = the_cache(store)
    cache.reload(SETTINGS)  # a table as read, so the next refresh finds nothing new
    refresh = cache._refresh

    def claim_after_the_read(conn, table, settings):  # type: ignore[no-untyped-def]
        found = refresh(conn, table, settings)
        assert found is table  # nothing new when it read
        place(store, project_image, "vm-2")  # commits and merges, the reload still running
        return found

    monkeypatch.setattr(cache, "_refresh", claim_after_the_read)
    cache.reload(SETTINGS)
    assert host_row(store, "h1").generation == 2
    assert cache.current()[0].generation == 2


def test_ttl_zero_turns_the_cache_off(store: Store, project_image: tuple[int, str]) -> None:
    off = dataclasses.replace(SETTINGS, host_cache_ttl=0.0)
    add_host(store, "small", memory_mb=4096)
    assert place(store, project_image, "vm-1", off) == "small"
    add_host(store, "big", memory_mb=65536)
    assert place(store, project_image, "vm-2", off) == "big"
    assert list(hostcache.caches()) == []


def test_reset_forgets_every_cache(store: Store, project_image: tuple[int, str]) -> None:
    add_host(store, "h1", memory_mb=4096)
    place(store, project_image, "vm-1")
    assert len(list(hostcache.caches())) == 1
    hostcache.reset()
    assert list(hostcache.caches()) == []
    assert place(store, project_image, "vm-2") == "h1"


def test_host_cache_ttl_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    env = {"VIRTFLEET_CONFIG": "", "VIRTFLEET_HOST_NAME": "node1"}
    assert load_settings(env=env).host_cache_ttl == 1.0
    assert load_settings(env={**env, "VIRTFLEET_HOST_CACHE_TTL": "0"}).host_cache_ttl == 0.0
    assert load_settings(env={**env, "VIRTFLEET_HOST_CACHE_TTL": "2.5"}).host_cache_ttl == 2.5
    with pytest.raises(ConfigError, match="host_cache_ttl"):
        load_settings(env={**env, "VIRTFLEET_HOST_CACHE_TTL": "-1"})


def test_a_refresh_reads_only_what_changed_and_matches_a_full_read(
        store: Store, project_image: tuple[int, str]) -> None:
    """Between two reloads, change hosts in every way the store allows (claims elsewhere,
    heartbeats with new images, builds finishing, hosts coming and going, admin edits); the
    refresh must give exactly what reading every host gives."""
    rng = random.Random(11)
    for i in range(30):
        add_host(store, f"h{i:02d}", memory_mb=65536, cached_images=[])
    clock = frozen_clock(store)
    place(store, project_image, "vm-first")
    cache = the_cache(store)
    names = [f"h{i:02d}" for i in range(30)]
    deleted: list[str] = []
    for step in range(12):
        for _ in range(6):
            op = rng.choice(["claim", "image", "done", "new", "gone", "admin", "place"])
            name = rng.choice(names)
            if op == "claim":
                claim_elsewhere(store, name, f"vm-x{step}-{rng.random()}")
            elif op == "image":
                with store.session() as s:
                    s.execute(update(Host).where(Host.name == name)
                              .values(cached_images=[f"{rng.randrange(4):064x}"]))
            elif op == "done":
                with store.session() as s:
                    s.execute(update(VM).where(VM.state == "building")
                              .values(state="running"))
            elif op == "new":
                fresh = f"n{step}-{rng.randrange(1000)}"
                if fresh not in names:
                    add_host(store, fresh, memory_mb=4096, labels={"zone": "z"})
                    names.append(fresh)
            elif op == "gone":
                name = rng.choice([n for n in names if n.startswith("n")] or names)
                with store.session() as s:
                    h = s.scalars(select(Host).where(Host.name == name)).one()
                    if not s.scalars(select(VM).where(VM.host_id == h.id)).first() and \
                            not s.scalars(select(Claim).where(Claim.host_id == h.id)).first():
                        s.delete(h)
                        names.remove(name)
                        deleted.append(name)
            elif op == "admin":
                with store.session() as s:
                    h = s.scalars(select(Host).where(Host.name == name)).one()
                    h.labels = {"zone": rng.choice("ab")}
                    h.max_vms = rng.choice([None, 5])
                    h.generation = h.generation + 1
            else:
                place(store, project_image, f"vm-{step}-{rng.randrange(10**6)}")
        clock.now += SETTINGS.host_cache_ttl
        refreshed = cache.reload(SETTINGS)
        assert refreshed is not None
        with cache.engine.connect() as conn:
            full = hostcache.read_hosts(conn, SETTINGS)
        assert sorted(refreshed, key=lambda h: h.id) == full
    assert deleted and len(names) > 30  # hosts did come and go
    assert cache.reloads > cache.full_reloads == 1  # only the first read was in full
    assert_consistent(store)


def test_every_so_often_a_reload_reads_every_host(store: Store,
                                                  project_image: tuple[int, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcache, "FULL_RELOAD_EVERY", 3)
    add_host(store, "h1", memory_mb=65536)
    frozen_clock(store)
    place(store, project_image, "vm-1")
    cache = the_cache(store)
    for _ in range(6):
        cache.reload(SETTINGS)
    assert (cache.reloads, cache.full_reloads) == (7, 3)  # the 1st, 4th and 7th


def test_a_claim_in_a_released_savepoint_waits_for_the_real_commit(
        store: Store, project_image: tuple[int, str]) -> None:
    add_host(store, "h1", memory_mb=4096)
    frozen_clock(store)
    place(store, project_image, "vm-1")
    cache = the_cache(store)
    with pytest.raises(RuntimeError), store.session() as s:
        with s.begin_nested():
            claims.place_and_claim(s, new_vm(s, project_image, "vm-2"), REQ, SETTINGS)
        assert cache.table(SETTINGS)[0].generation == 1  # released, not committed
        raise RuntimeError("rolled back after all")
    snap = cache.table(SETTINGS)[0]
    assert (snap.generation, snap.used_memory_mb) == (1, 512)
    assert host_row(store, "h1").generation == 1


# -- claims in flight: deciders of one process side by side ----------------------------------


def place_in_transaction(store: Store, project_image: tuple[int, str], name: str,
                         fail: bool = False) -> tuple[str, frozenset[int]]:
    """The web's cheapest path (a Store.transaction() and a PlacedRow, as vmops does): the
    host chosen and the hosts in flight just before the transaction ended."""
    vm_id = str(uuid.uuid4())
    row = claims.PlacedRow(VM.__table__, {
        "id": vm_id, "name": name, "project_id": project_image[0],
        "image_id": project_image[1], "vcpus": REQ.vcpus, "memory_mb": REQ.memory_mb,
        "disk_gb": REQ.disk_gb, "user_data": "", "state": "building",
        "mac": "52:54:00:00:00:01", "constraints": {}, "created_at": utcnow(),
        "updated_at": utcnow()})
    with store.transaction() as conn:
        placed = claims.claim(conn, vm_id, REQ, SETTINGS, row=row)
        in_flight = the_cache(store).in_flight()
        if fail:
            raise RuntimeError("the build could not be sent")
    return placed.host.name, in_flight


def test_a_claim_is_in_flight_until_its_transaction_ends(
        store: Store, project_image: tuple[int, str]) -> None:
    h1 = add_host(store, "h1", memory_mb=4096)
    name, during = place_in_transaction(store, project_image, "vm-1")
    assert (name, during) == ("h1", frozenset({h1}))
    cache = the_cache(store)
    assert cache.in_flight() == frozenset()  # committed: merged, then released
    assert cache.table(SETTINGS)[0].generation == 1
    with pytest.raises(RuntimeError):
        place_in_transaction(store, project_image, "vm-2", fail=True)
    assert cache.in_flight() == frozenset()  # rolled back: released too
    with store.session() as s:  # the ORM path
        claims.place_and_claim(s, new_vm(s, project_image, "vm-3"), REQ, SETTINGS)
        assert cache.in_flight() == frozenset({h1})
    assert cache.in_flight() == frozenset()
    with pytest.raises(RuntimeError), store.session() as s:
        claims.place_and_claim(s, new_vm(s, project_image, "vm-4"), REQ, SETTINGS)
        raise RuntimeError("rolled back")
    assert cache.in_flight() == frozenset()
    assert_consistent(store)


def test_a_host_with_a_claim_in_flight_is_passed_over_then_tried_last(
        store: Store, project_image: tuple[int, str], cas: list[tuple[str, bool]]) -> None:
    big = add_host(store, "big", memory_mb=8192)  # the best for spread
    add_host(store, "small", memory_mb=512)  # room for one
    place(store, project_image, "vm-0")  # loads the cache
    cache = the_cache(store)
    assert cache.reserve(big)  # another request thread is claiming on it
    assert place(store, project_image, "vm-1") == "small"
    assert place(store, project_image, "vm-2") == "big"  # small is full: big, though in flight
    assert cache.in_flight() == frozenset({big})  # the other thread's reservation stays
    cache.release((big,))
    assert place(store, project_image, "vm-3") == "big"
    assert cas == [("big", True), ("small", True), ("big", True), ("big", True)]  # none lost
    assert_consistent(store)


def test_concurrent_deciders_of_one_process_never_lose_a_compare_and_set(
        store: Store, project_image: tuple[int, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight threads placing at once, all wanting the same best host (host_subset_size 1):
    each passes over the hosts the others are claiming on, and skips those they claimed
    since it ranked, so no compare-and-set is lost; every host ends as its claims say."""
    for i in range(6):
        add_host(store, f"h{i}", memory_mb=16 * 512 + i * 512)
    lost: list[str] = []

    def counting(session, host, *args, **kwargs):  # type: ignore[no-untyped-def]
        won = TRY_CLAIM(session, host, *args, **kwargs)
        if not won:
            lost.append(host.name)
        return won

    monkeypatch.setattr(claims, "try_claim", counting)
    # Waits for a claim in flight are cut short (0.1 s) in service, where a loaded machine
    # may well take longer; here the mechanism is under test, not this machine's speed.
    monkeypatch.setattr(hostcache, "IN_FLIGHT_WAIT", 60.0)
    placed: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def decider(k: int) -> None:
        try:
            start.wait()
            for j in range(8):
                placed.append(place_in_transaction(store, project_image, f"vm-{k}-{j}")[0])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=decider, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(placed) == 64 and lost == []
    assert len(set(placed)) == 6  # spread over every host
    assert the_cache(store).in_flight() == frozenset()
    assert_consistent(store)
