"""The placement decision's fast path on a real store: `Store.transaction()` (Core, no ORM),
statements run on the driver's connection (fleet/store/fast.py), `claims.claim` on such a
transaction with the host cache, and the ranking's partial order (`Ranking.top`).

Store tests run on a migrated SQLite file and on PostgreSQL (VIRTFLEET_TEST_PG_URL; skipped
only when it is unset), like tests/unit/test_claims.py.
"""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from fleet.config import Settings
from fleet.exceptions import NoValidHost
from fleet.store import session as session_module
from fleet.store.fast import FastStatement
from fleet.store.migrate import upgrade
from fleet.store.models import VM, Claim, Host, Image, Project, new_id, utcnow
from fleet.store.session import Store, transaction_of
from scheduler import claims, hostcache
from scheduler.placement import _best, rank
from scheduler.snapshot import HostSnapshot, HostTable, Request

SETTINGS = Settings(host_name="controller")
REQ = Request(vcpus=1, memory_mb=512, disk_gb=2)


@pytest.fixture
def project_image(store: Store) -> tuple[int, str]:
    with store.session() as s:
        project = Project(name="p")
        s.add(project)
        s.flush()
        image = Image(name="img", project_id=project.id, sha256="ab" * 32)
        s.add(image)
        s.flush()
        return project.id, image.id


def add_host(store: Store, name: str, memory_mb: int) -> int:
    with store.session() as s:
        host = Host(name=name, vcpus=64, memory_mb=memory_mb, disk_gb=1000, cpu_ratio=1.0,
                    ram_ratio=1.0, disk_ratio=1.0, labels={}, cached_images=[])
        s.add(host)
        s.flush()
        return host.id


VM_KEYS = ("id", "name", "project_id", "image_id", "vcpus", "memory_mb", "disk_gb", "state",
           "host_id", "alternates", "constraints")
FAST_VM = FastStatement(insert(VM), VM_KEYS)


def vm_values(project_image: tuple[int, str], name: str, host_id: int | None = None
              ) -> dict[str, object]:
    project_id, image_id = project_image
    return {"id": new_id(), "name": name, "project_id": project_id, "image_id": image_id,
            "vcpus": 1, "memory_mb": 512, "disk_gb": 2, "state": "building", "host_id": host_id,
            "alternates": ["b", "c"], "constraints": {"zone": "a"}}


def row_of(store: Store, vm_id: str) -> dict[str, object]:
    with store.sessions() as s:
        vm = s.get(VM, vm_id)
        assert vm is not None
        return {c.key: getattr(vm, c.key) for c in VM.__table__.columns
                if c.key not in ("id", "name", "created_at", "updated_at")}


def test_a_fast_insert_writes_what_core_writes(store: Store,
                                               project_image: tuple[int, str]) -> None:
    host_id = add_host(store, "h1", 4096)
    fast, core = vm_values(project_image, "fast", host_id), vm_values(project_image, "core",
                                                                      host_id)
    with store.transaction() as conn:
        FAST_VM.execute(conn, fast)
        conn.execute(insert(VM), core)
    assert row_of(store, str(fast["id"])) == row_of(store, str(core["id"]))
    with store.sessions() as s:
        vm = s.get(VM, fast["id"])
        assert vm is not None and vm.alternates == ["b", "c"] and vm.constraints == {"zone": "a"}
        assert isinstance(vm.created_at, datetime) and vm.user_data == "" and vm.attempts == 0


def test_a_fast_statements_own_values_are_written_as_given(
        store: Store, project_image: tuple[int, str]) -> None:
    """Values of the statement itself (on PostgreSQL written into its SQL once) come out
    as given, quotes, percent signs and JSON included."""
    values = vm_values(project_image, "one")
    given = {"state_reason": "it's 100% done; %(x)s %(vid)s %%(attempts)s", "attempts": 3,
             "addresses": [{"ip": "10.0.0.2", "note": "50% 'off'"}], "static_address": ""}
    set_them = FastStatement(update(VM).where(VM.id == bindparam("vid")).values(**given),
                             ("vid",))
    with store.transaction() as conn:
        FAST_VM.execute(conn, values)
        assert set_them.execute(conn, {"vid": values["id"]}).rowcount == 1
    row = row_of(store, str(values["id"]))
    assert {k: row[k] for k in given} == given


def test_a_fast_statement_fails_as_sqlalchemy_does_and_the_transaction_is_undone(
        store: Store, project_image: tuple[int, str]) -> None:
    values = vm_values(project_image, "one")
    with pytest.raises(IntegrityError), store.transaction() as conn:
        FAST_VM.execute(conn, vm_values(project_image, "first"))
        FAST_VM.execute(conn, values)
        FAST_VM.execute(conn, values)  # the same id again
    with store.sessions() as s:
        assert s.scalars(select(VM.name)).all() == []


def test_a_connection_goes_on_after_a_fast_statement_failed_on_it(
        store: Store, project_image: tuple[int, str]) -> None:
    """The failed statement's connection (and on PostgreSQL its cursor, kept for the next
    statements) serves the next transactions as if nothing had happened."""
    first = vm_values(project_image, "first")
    with store.transaction() as conn:
        FAST_VM.execute(conn, first)
    for _ in range(3):
        with pytest.raises(IntegrityError), store.transaction() as conn:
            FAST_VM.execute(conn, first)  # the same id again
        again = vm_values(project_image, f"again-{_}")
        with store.transaction() as conn:
            FAST_VM.execute(conn, again)
        assert row_of(store, str(again["id"])) == row_of(store, str(first["id"]))
    with store.sessions() as s:
        assert sorted(s.scalars(select(VM.name)).all()) == [
            "again-0", "again-1", "again-2", "first"]


def test_after_commit_work_runs_only_once_committed(store: Store) -> None:
    ran: list[str] = []
    with store.transaction() as conn:
        txn = transaction_of(conn)
        assert txn is not None
        txn.after_commit(lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError), store.transaction() as conn:
        txn = transaction_of(conn)
        assert txn is not None
        txn.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("undo")
    assert ran == ["committed"]
    with store.transaction() as conn:
        txn = transaction_of(conn)
        assert txn is not None
        txn.after_commit(lambda: ran.append("before the savepoint"))
        with pytest.raises(RuntimeError), conn.begin_nested():
            raise RuntimeError("undo the savepoint")
    assert ran == ["committed"]  # a savepoint's rollback drops it: its writes may be gone
    with store.engine.connect() as conn:
        assert transaction_of(conn) is None


def test_claim_in_a_transaction_merges_into_the_cache_only_once_committed(
        store: Store, project_image: tuple[int, str]) -> None:
    host_id = add_host(store, "h1", 4 * 512)
    with store.transaction() as conn:
        placed = claims.claim(conn, "vm-1", REQ, SETTINGS)
        FAST_VM.execute(conn, vm_values(project_image, "vm-1", placed.host.id))
    assert placed.host.id == host_id and placed.host.used_memory_mb == 512
    (cache,) = hostcache.caches()
    assert cache.table(SETTINGS)[0].generation == 1
    with pytest.raises(RuntimeError), store.transaction() as conn:
        claims.claim(conn, "vm-2", REQ, SETTINGS)
        raise RuntimeError("the build could not be sent")
    snap = cache.table(SETTINGS)[0]
    assert (snap.generation, snap.used_memory_mb) == (1, 512)  # as committed
    with store.sessions() as s:
        host = s.get(Host, host_id)
        assert host is not None and (host.generation, host.used_memory_mb) == (1, 512)
        assert s.scalars(select(Claim.vm_id)).all() == ["vm-1"]


def test_a_plain_connection_claims_without_the_cache(store: Store) -> None:
    add_host(store, "h1", 4 * 512)
    with store.engine.begin() as conn:
        assert claims.claim(conn, "vm-1", REQ, SETTINGS).host.name == "h1"
    assert hostcache.caches() == []  # nothing would have merged or dropped its overlay


def race_for_the_room(store: Store, host_id: int, threads: int, room: int,
                      decide: Callable[[int], str]) -> None:
    """`threads` decisions at once (`decide(i)` places VM i and returns its id) on one host
    with room for `room`: exactly `room` win, the others are refused (NoValidHost), nothing
    crashes, and the host's usage, generation, claims and placed VMs agree with the winners."""
    barrier = threading.Barrier(threads)
    won: list[str] = []
    refused: list[NoValidHost] = []
    crashed: list[BaseException] = []

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            won.append(decide(i))
        except NoValidHost as exc:
            refused.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            crashed.append(exc)

    workers = [threading.Thread(target=attempt, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not crashed, crashed
    assert len(won) == room and len(refused) == threads - room
    with store.sessions() as s:
        host = s.get(Host, host_id)
        assert host is not None
        assert (host.used_memory_mb, host.generation) == (room * REQ.memory_mb, room)
        assert sorted(s.scalars(select(Claim.vm_id)).all()) == sorted(won)
        assert sorted(s.scalars(select(VM.id).where(VM.host_id == host_id)).all()) == \
            sorted(won)


@pytest.mark.parametrize("threads, room", [(12, 5)])
def test_concurrent_transactions_take_exactly_the_room(store: Store,
                                                       project_image: tuple[int, str],
                                                       threads: int, room: int) -> None:
    host_id = add_host(store, "h1", room * REQ.memory_mb)

    def decide(i: int) -> str:
        with store.transaction() as conn:
            values = vm_values(project_image, f"vm-{i}")
            placed = claims.claim(conn, str(values["id"]), REQ, SETTINGS)
            values["host_id"] = placed.host.id
            FAST_VM.execute(conn, values)
        return str(values["id"])

    race_for_the_room(store, host_id, threads, room, decide)


def test_claim_times_are_stored_as_core_stores_them(store: Store) -> None:
    add_host(store, "h1", 4 * 512)
    before = utcnow()
    with store.transaction() as conn:
        claims.claim(conn, "vm-1", REQ, SETTINGS)
    with store.sessions() as s:
        claim = s.scalars(select(Claim)).one()
        at = claim.created_at
        assert at.replace(tzinfo=None) >= before.replace(tzinfo=None)


# -- the ranking's partial order ---------------------------------------------------------


def test_best_is_the_head_of_a_stable_argsort() -> None:
    rng = np.random.default_rng(5)
    for size in (1, 3, 64, 65, 200, 1000):
        for values in (rng.integers(0, 4, size).astype(np.float64),  # many ties
                       rng.random(size), np.zeros(size)):
            full = np.argsort(-values, kind="stable")
            for n in (1, 2, 3, 8, size // 2, size):
                if 0 < n <= size:
                    assert _best(values, n).tolist() == full[:n].tolist()


def snapshot(i: int, rng: random.Random) -> HostSnapshot:
    return HostSnapshot(
        id=i, name=f"h{i:04d}", generation=0, alive=True, enabled=True, maintenance=False,
        arch="x86_64", virt_type="kvm", vcpus=16, memory_mb=rng.choice((4096, 8192, 16384)),
        disk_gb=100, used_vcpus=0, used_memory_mb=rng.choice((0, 512, 1024)), used_disk_gb=0,
        cpu_ratio=1.0, ram_ratio=1.0, disk_ratio=1.0, builds=rng.choice((0, 1)))


@pytest.mark.parametrize("top_random", [1, 3, 10])
def test_top_is_the_head_of_hosts(top_random: int) -> None:
    rng = random.Random(11)
    table = HostTable([snapshot(i, rng) for i in range(300)])
    for n in (1, 2, 3, 4, 9, 17, 299, 300, 301):
        seed = rng.randrange(1000)
        lazy = rank(table, REQ, top_random=top_random, rng=random.Random(seed))
        full = rank(table, REQ, top_random=top_random, rng=random.Random(seed)).hosts
        assert lazy.top(n) == full[:n]
        assert lazy.top(n + 1) == full[:n + 1]  # asking further on the same ranking
        assert len(lazy) == len(full)
        assert lazy.hosts == full


# -- a decision in one statement (PlacedRow) ---------------------------------------------


def placed_row(project_image: tuple[int, str], name: str) -> claims.PlacedRow:
    values = vm_values(project_image, name)
    del values["host_id"], values["alternates"]
    return claims.PlacedRow(VM.__table__, values)


def test_a_placed_row_is_written_with_its_claim(store: Store,
                                                project_image: tuple[int, str]) -> None:
    add_host(store, "a", 4 * 512)
    add_host(store, "b", 2 * 512)
    row = placed_row(project_image, "vm-1")
    with store.transaction(single_statement=True) as conn:
        placed = claims.claim(conn, str(row.values["id"]), REQ, SETTINGS, row=row)
    assert placed.host.name == "a" and placed.alternates == ["b"]
    # Every column as Core's INSERT of the same values writes it (the defaults the claim's
    # statement fills in itself, some written into its SQL, included).
    core = {**vm_values(project_image, "core", placed.host.id), "alternates": ["b"]}
    with store.transaction() as conn:
        conn.execute(insert(VM), core)
    assert row_of(store, str(row.values["id"])) == row_of(store, str(core["id"]))
    with store.sessions() as s:
        vm = s.get(VM, row.values["id"])
        assert vm is not None and vm.host_id == placed.host.id and vm.alternates == ["b"]
        assert vm.state == "building" and vm.constraints == {"zone": "a"} and vm.addresses == []
        assert s.scalars(select(Claim.vm_id)).all() == [vm.id]
    (cache,) = hostcache.caches()
    snap = next(h for h in cache.table(SETTINGS) if h.name == "a")
    assert (snap.generation, snap.vm_count, snap.builds) == (1, 1, 1)


def test_a_lost_compare_and_set_writes_no_placed_row(store: Store,
                                                    project_image: tuple[int, str]) -> None:
    add_host(store, "a", 4 * 512)
    with store.sessions() as s:
        (seen,) = hostcache.read_hosts(s, SETTINGS)
    with store.session() as s:  # someone else claims on it first
        assert claims.try_claim(s, seen, "other", REQ)
    row = placed_row(project_image, "vm-1")
    with store.transaction(single_statement=True) as conn:
        assert not claims.try_claim(conn, seen, "vm-1", REQ,
                                    row.for_host(seen, []), row.table, row.host_key)
    with store.sessions() as s:
        assert s.scalars(select(VM.id)).all() == []
        assert s.scalars(select(Claim.vm_id)).all() == ["other"]


def direct_statements(conn: object) -> list[str]:
    """The statements the direct path prepared on a connection (PostgreSQL)."""
    return list(conn.execute(text(  # type: ignore[attr-defined]
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'vf_fast_%'")).scalars())


def test_a_single_statement_claim_on_postgresql_runs_prepared_on_libpq(
        store: Store, project_image: tuple[int, str]) -> None:
    """PostgreSQL: the claim's statement is prepared once on the connection under a name of
    its own and run by libpq with its values as text (quotes, percent signs, dollars, JSON
    and times as Core writes them); after DISCARD ALL it is prepared again; an error comes
    out as SQLAlchemy's, nothing is written, and the connection goes on; a transaction of
    several statements keeps psycopg's way."""
    if not store.url.startswith("postgresql"):
        pytest.skip("the direct path is PostgreSQL's")
    host_id = add_host(store, "a", 8 * 512)
    odd = {"user_data": "it's 100% done; %(x)s %s $1 \\ \u00e9t\u00e9", "mac": "$2"}

    def odd_row(name: str) -> claims.PlacedRow:
        row = placed_row(project_image, name)
        row.values.update(odd)
        return row

    def decide(name: str) -> claims.Placement:
        row = odd_row(name)
        with store.transaction(single_statement=True) as conn:
            placed = claims.claim(conn, str(row.values["id"]), REQ, SETTINGS, row=row)
            assert len(direct_statements(conn)) == 1
        core = {**vm_values(project_image, "core-" + name, host_id), **odd,
                "alternates": []}
        with store.transaction() as conn:
            conn.execute(insert(VM), core)
        assert row_of(store, str(row.values["id"])) == row_of(store, str(core["id"]))
        return placed

    first = decide("one")
    with store.transaction(single_statement=True) as conn:
        conn.execute(text("DISCARD ALL"))
        assert direct_statements(conn) == []
    second = decide("two")
    assert (first.host.generation, second.host.generation) == (1, 2)
    with pytest.raises(IntegrityError), store.transaction(single_statement=True) as conn:
        row = odd_row("no-such-image")
        row.values["image_id"] = "no-such-image"
        claims.claim(conn, str(row.values["id"]), REQ, SETTINGS, row=row)
    decide("three")
    # In a transaction of several statements (the create's), psycopg's way: psycopg
    # deallocates a connection's prepared statements at each rollback, and one found gone
    # there could not be prepared again (the transaction is aborted).
    for _ in range(2):
        with pytest.raises(RuntimeError), store.transaction() as conn:
            conn.execute(text("SELECT 1"))
            row = odd_row("rolled-back")
            claims.claim(conn, str(row.values["id"]), REQ, SETTINGS, row=row)
            assert direct_statements(conn) == []
            assert conn.execute(select(VM.name).where(VM.id == row.values["id"])).scalar() \
                == "rolled-back"
            raise RuntimeError("rolled back")
    with store.sessions() as s:
        assert sorted(s.scalars(select(VM.name)).all()) == [
            "core-one", "core-three", "core-two", "one", "three", "two"]
        assert s.scalar(select(Host.generation).where(Host.id == host_id)) == 3
        assert len(s.scalars(select(Claim.id)).all()) == 3


@pytest.mark.parametrize("threads, room", [(12, 5)])
def test_concurrent_single_statement_decisions_take_exactly_the_room(
        store: Store, project_image: tuple[int, str], threads: int, room: int) -> None:
    host_id = add_host(store, "h1", room * REQ.memory_mb)
    rows = [placed_row(project_image, f"vm-{i}") for i in range(threads)]

    def decide(i: int) -> str:
        with store.transaction(single_statement=True) as conn:
            claims.claim(conn, str(rows[i].values["id"]), REQ, SETTINGS, row=rows[i])
        return str(rows[i].values["id"])

    race_for_the_room(store, host_id, threads, room, decide)


def test_single_statement_transactions_keep_their_connection(store: Store) -> None:
    """PostgreSQL: one connection serves transaction after transaction (a pool checkout and
    a new Connection per decision cost a twentieth of it), one autocommit for single
    statements and one for the others; one whose statement failed, or whose transaction was
    rolled back, is still good and kept; dispose closes them."""
    if not store.url.startswith("postgresql"):
        pytest.skip("SQLite writes on its one writer connection under the lock")
    with store.transaction(single_statement=True) as conn:
        first = conn.connection.dbapi_connection
    with store.transaction(single_statement=True) as conn:
        assert conn.connection.dbapi_connection is first
    with pytest.raises(DBAPIError), store.transaction(single_statement=True) as conn:
        conn.execute(text("SELECT 1 / 0"))
    with store.transaction(single_statement=True) as conn:
        assert conn.connection.dbapi_connection is first
        assert conn.execute(text("SELECT 1")).scalar() == 1
    with store.transaction() as conn:  # a transaction of several statements: its own kind
        other = conn.connection.dbapi_connection
        assert other is not first and conn.in_transaction()
    with pytest.raises(RuntimeError), store.transaction() as conn:
        assert conn.connection.dbapi_connection is other
        conn.execute(text("CREATE TEMPORARY TABLE t (x int)"))
        raise RuntimeError("rolled back")
    with store.transaction() as conn:  # rolled back, kept, clean
        assert conn.connection.dbapi_connection is other
        assert conn.execute(text("SELECT to_regclass('pg_temp.t')")).scalar() is None
    store.dispose()
    assert first is not None and first.closed and other is not None and other.closed


# -- the writer lock across processes ----------------------------------------------------


def test_sqlite_writers_of_other_processes_wait_for_the_lock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    child = subprocess.Popen(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c",
         "import sys, time\n"
         "from fleet.store.session import Store\n"
         f"store = Store({url!r})\n"
         "with store.session():\n"
         "    print('held', flush=True)\n"
         "    time.sleep(0.5)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        fd = os.open(tmp_path / "store.db.writelock", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the child holds it while it writes
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        store = Store(url)
        t0 = time.monotonic()
        with store.session() as s:
            s.add(Project(name="after"))
        waited = time.monotonic() - t0
        store.dispose()
    finally:
        child.wait(timeout=30)
    assert waited >= 0.3, waited  # it waited for the child's transaction


def test_the_wal_is_checkpointed_beside_the_writers(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "CHECKPOINT_INTERVAL", 0.05)
    monkeypatch.setattr(session_module, "CHECKPOINT_AT_BYTES", 1)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = Store(url)
    try:
        with store.session() as s:
            s.add(Project(name="p"))
        with store.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        assert pages == session_module.WAL_AUTOCHECKPOINT_PAGES  # commits leave it alone
        checkpointer = store._checkpointer
        assert checkpointer is not None
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.checkpoints > 0
    finally:
        store.dispose()
