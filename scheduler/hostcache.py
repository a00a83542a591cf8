"""A per-process cache of host snapshots for placement, kept as one HostTable.

Owns reading hosts for placement (SQLAlchemy Core, one statement) and keeping them between
decisions. Optimistic: a cached host may be stale, and the compare-and-set on
`Host.generation` in claims.try_claim catches it, because every change a filter depends on
bumps the generation (claims, releases, admin edits, heartbeats that change capacity or bring
a host back, hosts marked down). Never claims anything and never writes to the store.

What the cache holds is only ever committed state, and a host's committed states are told
apart by their generation, so "the higher generation wins" when two readings meet:

- a reload when the table is older than `host_cache_ttl` seconds (0 turns the cache off),
  read on the cache's own connection, so it never sees another transaction's uncommitted
  work: one statement reads every host's generation, cached images and VM and build counts,
  a second the full rows of the hosts whose generation moved (and of new hosts); every
  FULL_RELOAD_EVERY reloads, and when much changed, every host is read in full;
- after a lost compare-and-set, that host and the next few candidates of the ranking are
  re-read, in one statement, in the caller's transaction (which sees its own writes, e.g. an
  evacuation that just disabled it) into that transaction's overlay; those found changed are
  skipped for the rest of that ranking (another process's recent claims sit just where our
  stale ranking looks next); after a successful claim the host's new state (generation + 1,
  used + the request, one more VM, one more build) goes into the overlay too. The overlay
  ranks the transaction's next decisions and is merged into the cache when the transaction
  commits, dropped when it rolls back.

Claims in flight: decisions of one process run side by side (the web's request threads; on
PostgreSQL nothing serialises them), rank the same table and, with the same request, pick the
same best host, so all but one would lose their compare-and-set, re-read that host and go
again. So a decision *reserves* the host it is about to claim (`SessionHosts.reserve`) and
the others pass over it to their next candidate while that claim is in flight; the
reservation ends with the transaction, after its claims were merged into the table (so
nobody sees the host free with its old generation), and a decision skips, without trying,
a host that another claimed since it ranked. Only a hint: when every candidate was in
flight, a decision waits briefly for those claims to end and tries the hosts they did not
change, and the compare-and-set stays the arbiter (other processes know nothing of this
process's reservations).
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Text,
    bindparam,
    case,
    cast,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from fleet.config import Settings
from fleet.store.models import VM, Host
from fleet.store.session import transaction_of
from scheduler.snapshot import (
    SNAPSHOT_FIELDS,
    HostSnapshot,
    HostTable,
    Request,
    snapshot_from_values,
)

IN_FLIGHT_WAIT = 0.1
"""Seconds a decision waits for another's claim in flight on a host before trying it anyway
(only when every other candidate was in flight too or lost)."""

MAX_CACHES = 8
"""Databases one process keeps a cache for (the tests make many); the oldest is dropped."""

FULL_RELOAD_EVERY = 60
"""Every so many reloads, read every host in full rather than only the changed ones: a safety
net should something change a host's filtered fields without moving its generation."""

REFETCH_AT_MOST = 0.25
"""A refresh that finds more than this share of hosts changed reads them all instead."""

_SESSION_KEY = "virtfleet.hostcache"
"""Where a session keeps its overlay: {cache url: {host id: snapshot or None (gone)}}."""

_RESERVED_KEY = "virtfleet.hostcache.reserved"
"""Where a session keeps the hosts it reserved: {cache url: {host id}}."""

_COLUMNS = (Host.id, Host.name, Host.generation, Host.alive, Host.enabled, Host.maintenance,
            Host.arch, Host.virt_type, Host.vcpus, Host.memory_mb, Host.disk_gb,
            Host.used_vcpus, Host.used_memory_mb, Host.used_disk_gb, Host.cpu_ratio,
            Host.ram_ratio, Host.disk_ratio,
            # JSON as text: parsed here once per distinct value (hosts share label sets and
            # image lists), three times faster than one json.loads per row and column.
            cast(Host.labels, Text), cast(Host.cached_images, Text), Host.max_vms)

assert SNAPSHOT_FIELDS[:17] == tuple(c.key for c in _COLUMNS[:17])


_HOST_IDS = bindparam("host_ids", expanding=True)


def _counts(only_ids: bool = False) -> Any:
    """VMs and builds per host (of the hosts `host_ids` only)."""
    counts = (select(VM.host_id.label("host_id"), func.count(VM.id).label("n"),
                     func.coalesce(func.sum(case((VM.state == "building", 1), else_=0)), 0)
                     .label("b"))
              .where(VM.host_id.is_not(None)))
    if only_ids:
        counts = counts.where(VM.host_id.in_(_HOST_IDS))
    return counts.group_by(VM.host_id).subquery()


def _query(only_names: frozenset[str] | None = None, only_ids: bool = False) -> Any:
    """Hosts with their VM and build counts, in one statement (one consistent read).
    `only_ids`: the hosts of the list `host_ids` only."""
    sub = _counts(only_ids)
    query = (select(*_COLUMNS, sub.c.n, sub.c.b)
             .outerjoin(sub, sub.c.host_id == Host.id).order_by(Host.id))
    if only_names is not None:
        query = query.where(Host.name.in_(only_names))
    if only_ids:
        query = query.where(Host.id.in_(_HOST_IDS))
    return query


_ALL_HOSTS = _query()
_SOME_HOSTS = _query(only_ids=True)

_sub = _counts()
_VERSIONS = (select(Host.id, Host.generation, cast(Host.cached_images, Text), _sub.c.n,
                    _sub.c.b).outerjoin(_sub, _sub.c.host_id == Host.id))
"""What a refresh compares: each host's generation (which moves with every change a filter
depends on), its cached images and its VM and build counts (which move without it)."""


class _Decoder:
    """Turns rows into snapshots, parsing each distinct JSON text once."""

    def __init__(self, settings: Settings) -> None:
        self.cpu, self.ram, self.disk = _ratios(settings)
        self.labels: dict[str | None, dict[str, Any]] = {}
        self.images: dict[str | None, frozenset[str]] = {}
        self.image_texts: dict[int, str | None] = {}
        """Each host's cached images as read (a refresh compares them)."""

    def image_set(self, text: str | None) -> frozenset[str]:
        img = self.images.get(text)
        if img is None:
            img = self.images[text] = frozenset(json.loads(text) or ()) if text \
                else frozenset()
        return img

    def __call__(self, row: Any) -> HostSnapshot:
        (hid, name, gen, alive, enabled, maint, arch, virt, vcpus, mem, dsk, uv, um, ud, cr, rr,
         dr, labels, images, max_vms, n, b) = row
        lab = self.labels.get(labels)
        if lab is None:
            lab = self.labels[labels] = dict(json.loads(labels) or {}) if labels else {}
        self.image_texts[hid] = images
        return snapshot_from_values((
            hid, name, gen, bool(alive), bool(enabled), bool(maint), arch, virt, vcpus, mem,
            dsk, uv, um, ud, cr or self.cpu, rr or self.ram, dr or self.disk, lab,
            self.image_set(images), max_vms, int(n or 0), int(b or 0)))


def _ratios(settings: Settings) -> tuple[float, float, float]:
    return (settings.cpu_allocation_ratio, settings.ram_allocation_ratio,
            settings.disk_allocation_ratio)


def read_hosts(conn: Connection | Session, settings: Settings,
               only: frozenset[str] | None = None,
               decode: _Decoder | None = None) -> list[HostSnapshot]:
    """Every host (or those named in `only`) as `conn` sees it now, with its counts."""
    decode = decode or _Decoder(settings)
    query = _ALL_HOSTS if only is None else _query(only_names=only)
    return [decode(row) for row in conn.execute(query)]


def read_hosts_by_id(conn: Connection | Session, settings: Settings,
                     host_ids: Iterable[int],
                     decode: _Decoder | None = None) -> dict[int, HostSnapshot]:
    """The hosts of `host_ids` as `conn` sees them now, in one statement (those gone are
    missing)."""
    decode = decode or _Decoder(settings)
    return {snap.id: snap for snap in (decode(row) for row in conn.execute(
        _SOME_HOSTS, {"host_ids": list(host_ids)}))}


def after_claim(host: HostSnapshot, req: Request) -> HostSnapshot:
    """The host as try_claim leaves it: what the store did, done to the snapshot."""
    values = dict(host.__dict__)  # as snapshot_from_values, without replace()'s __init__
    values.update(generation=host.generation + 1, used_vcpus=host.used_vcpus + req.vcpus,
                  used_memory_mb=host.used_memory_mb + req.memory_mb,
                  used_disk_gb=host.used_disk_gb + req.disk_gb, vm_count=host.vm_count + 1,
                  builds=host.builds + 1)
    snap = object.__new__(HostSnapshot)
    snap.__dict__.update(values)
    return snap


class HostCache:
    """The hosts of one database as this process last read them (see the module's notes)."""

    def __init__(self, url: str, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.ttl = ttl
        self.clock = clock
        self.reloads = 0
        """Reloads so far (for tests and benchmarks)."""
        self.full_reloads = 0
        """Of which full reads of every host."""
        self._image_texts: dict[int, str | None] = {}
        self._table: HostTable | None = None
        self._loaded_at = -math.inf
        self._ratios: tuple[float, float, float] | None = None
        self._engine: Engine | None = None
        self._lock = threading.Lock()  # guards swapping in a new table
        self._reloading = threading.Lock()  # one full reload at a time
        self._starts = 0  # full reloads started so far
        self._started_last = 0  # which of them the current table comes from
        self._in_flight: set[int] = set()  # hosts a transaction of ours is claiming on
        self._in_flight_lock = threading.Condition()

    def reserve(self, host_id: int) -> bool:
        """Mark a claim on `host_id` as in flight; False when one already is."""
        with self._in_flight_lock:
            if host_id in self._in_flight:
                return False
            self._in_flight.add(host_id)
            return True

    def release(self, host_ids: Iterable[int]) -> None:
        """The claims on `host_ids` are no longer in flight (committed and merged, or gone)."""
        with self._in_flight_lock:
            self._in_flight.difference_update(host_ids)
            self._in_flight_lock.notify_all()

    def wait_and_reserve(self, host_id: int, timeout: float) -> bool:
        """Wait (at most `timeout` s) until no claim on `host_id` is in flight, then mark
        ours, in one step: of several waiters, the one that gets it is the only one that
        goes on sure of it. False when the time ran out (the host stays another's)."""
        with self._in_flight_lock:
            if not self._in_flight_lock.wait_for(lambda: host_id not in self._in_flight,
                                                 timeout):
                return False
            self._in_flight.add(host_id)
            return True

    def in_flight(self) -> frozenset[int]:
        """Hosts with a claim in flight (for tests)."""
        with self._in_flight_lock:
            return frozenset(self._in_flight)

    @property
    def engine(self) -> Engine:
        """The cache's own small engine: reads outside the callers' transactions."""
        if self._engine is None:
            if self.url.startswith("sqlite"):
                # No BEGIN IMMEDIATE here (unlike the store's engine): a plain SELECT reads the
                # last committed state beside a writer (WAL) and never waits for its lock.
                self._engine = create_engine(self.url, connect_args={
                    "timeout": 30, "check_same_thread": False})
            else:
                self._engine = create_engine(self.url, pool_size=1, max_overflow=2,
                                             pool_pre_ping=True)
        return self._engine

    def table(self, settings: Settings) -> HostTable:
        """The cached hosts, reloaded first when older than the TTL. While one thread
        reloads, the others go on with the table they have."""
        table = self._table
        stale = self.clock() - self._loaded_at >= self.ttl
        if table is None or self._ratios != _ratios(settings):
            return self.reload(settings)
        if stale:
            return self.reload(settings, wait=False) or table
        return table

    def reload(self, settings: Settings, wait: bool = True) -> HostTable | None:
        """Read every host again (None if another thread is at it and `wait` is False).
        A thread that waited for another's reload takes that one."""
        ticket = self._starts
        if not self._reloading.acquire(blocking=wait):
            return None
        try:
            if self._table is not None and self._started_last > ticket \
                    and self._ratios == _ratios(settings):
                return self._table  # a reload that started after we asked just finished
            self._starts += 1
            number = self._starts
            started = self.clock()
            old = self._table
            full = (old is None or self._ratios != _ratios(settings)
                    or self.reloads % FULL_RELOAD_EVERY == 0)
            with self.engine.connect() as conn:
                table = None if full or old is None else self._refresh(conn, old, settings)
                if table is None:
                    decode = _Decoder(settings)
                    table = HostTable(read_hosts(conn, settings, decode=decode))
                    self._image_texts = decode.image_texts
                    self.full_reloads += 1
            with self._lock:
                if self._table is not old and old is not None:
                    # Claims merged while we read: keep those that are newer than our read.
                    # (Also when our read found nothing new and gave `old` back: that read
                    # may predate a claim merged since.)
                    table = overlay(table, {h.id: h for h in self._table or ()
                                            if h.generation > old_generation(old, h.id)})
                self._table = table
                self._loaded_at = started
                self._ratios = _ratios(settings)
                self._started_last = number
                self.reloads += 1
            return table
        finally:
            self._reloading.release()

    def _refresh(self, conn: Connection, table: HostTable,
                 settings: Settings) -> HostTable | None:
        """`table` brought up to date by reading only what changed: every host's generation,
        images and counts in one statement, then the full rows of hosts whose generation
        moved or that are new. None when so much changed that a full read is cheaper."""
        decode = _Decoder(settings)
        texts = self._image_texts
        snaps, by_id = table.snapshots, table.by_id
        changes: dict[int, HostSnapshot] = {}
        refetch: list[int] = []
        seen: set[int] = set()
        for hid, gen, images, n, b in conn.execute(_VERSIONS):
            seen.add(hid)
            pos = by_id.get(hid)
            if pos is None or snaps[pos].generation != gen:
                refetch.append(hid)
                continue
            old = snaps[pos]
            n, b = int(n or 0), int(b or 0)
            if images != texts.get(hid) or n != old.vm_count or b != old.builds:
                # Same generation, so the same filtered fields: only these numbers moved.
                changes[pos] = dataclasses.replace(old, cached_images=decode.image_set(images),
                                                   vm_count=n, builds=b)
                texts[hid] = images
        if len(refetch) > REFETCH_AT_MOST * max(len(seen), 1):
            return None
        added: list[HostSnapshot] = []
        if refetch:
            for snap in read_hosts_by_id(conn, settings, refetch, decode).values():
                pos = by_id.get(snap.id)
                if pos is None:
                    added.append(snap)
                else:
                    changes[pos] = snap
            texts.update(decode.image_texts)
        gone = {pos for hid, pos in by_id.items() if hid not in seen}
        if changes:
            table = table.replaced(changes)
        if gone or added:
            table = HostTable([h for i, h in enumerate(table.snapshots) if i not in gone]
                              + added)
        return table

    def merge(self, hosts: Mapping[int, HostSnapshot | None]) -> None:
        """Take committed states of hosts: a host's higher generation wins; None (the host
        is gone) drops it."""
        with self._lock:
            table = self._table
            if table is None:
                return
            self._table = overlay(table, hosts)

    def current(self) -> HostTable | None:
        """The table as it is now (no reload)."""
        return self._table

    def invalidate(self) -> None:
        """Reload at the next decision."""
        with self._lock:
            self._loaded_at = -math.inf

    def close(self) -> None:
        with self._lock:
            self._table = None
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


def old_generation(table: HostTable, host_id: int) -> int:
    """The generation `table` holds for a host (-1 when it does not hold it)."""
    pos = table.position(host_id)
    return -1 if pos is None else table.snapshots[pos].generation


def overlay(table: HostTable, hosts: Mapping[int, HostSnapshot | None]) -> HostTable:
    """`table` with the given hosts where their generation is higher (None removes one)."""
    changes: dict[int, HostSnapshot] = {}
    gone: list[int] = []
    for host_id, snap in hosts.items():
        pos = table.position(host_id)
        if pos is None:
            continue  # a host the table does not know yet: the next reload brings it
        if snap is None:
            gone.append(pos)
        elif snap.generation > table.snapshots[pos].generation:
            changes[pos] = snap
    if changes:
        table = table.replaced(changes)
    if gone:
        table = table.without(gone)
    return table


class SessionHosts:
    """The cache as one transaction sees it: the shared table plus this transaction's
    overlay (its own claims, hosts it re-read after a lost compare-and-set)."""

    def __init__(self, cache: HostCache, session: Session | Connection,
                 settings: Settings) -> None:
        self.cache = cache
        self.session = session
        self.settings = settings
        self.pending: dict[int, HostSnapshot | None]
        self.reserved: set[int]
        """Hosts this transaction reserved (see the module's notes on claims in flight)."""
        if isinstance(session, Session):
            pending = session.info.setdefault(_SESSION_KEY, {})
            self.pending = pending.setdefault(cache.url, {})
            self.reserved = session.info.setdefault(_RESERVED_KEY, {}).setdefault(
                cache.url, set())
            return
        # A Store.transaction(): the overlay lives in its Transaction and is merged once it
        # has committed (a savepoint's rollback drops it, as after_soft_rollback does); the
        # reservations end with the transaction, after that merge.
        txn = transaction_of(session)
        assert txn is not None
        key = (_SESSION_KEY, cache.url)
        found = txn.data.get(key)
        if found is None:
            found = txn.data[key] = {}
            txn.after_commit(lambda: cache.merge(found) if found else None)
        reserved = txn.data.get((_RESERVED_KEY, cache.url))
        if reserved is None:
            reserved = txn.data[(_RESERVED_KEY, cache.url)] = set()
            txn.after_end(lambda: _release(cache, reserved))
        self.pending = found
        self.reserved = reserved

    def hosts(self, reload: bool = False) -> HostTable:
        """The hosts to rank (`reload`: read them all again first)."""
        table = self.cache.reload(self.settings) if reload else None
        if table is None:
            table = self.cache.table(self.settings)
        return overlay(table, self.pending) if self.pending else table

    def reserve(self, host: HostSnapshot) -> bool:
        """Reserve `host` for a claim of this transaction; False when another transaction
        of this process has a claim in flight on it (pass it over for now)."""
        if host.id in self.reserved:
            return True
        if not self.cache.reserve(host.id):
            return False
        self.reserved.add(host.id)
        return True

    def wait_and_reserve(self, host: HostSnapshot) -> bool:
        """Wait (briefly) for another transaction's claim in flight on `host` to end, then
        reserve it, so that `outdated` can tell whether that claim took the host. Not for
        long: it may be a long transaction (or one waiting for a host we reserved). False
        when the wait ran out: the host is tried anyway, unreserved (the compare-and-set
        decides, as ever)."""
        if host.id in self.reserved:
            return True
        if not self.cache.wait_and_reserve(host.id, IN_FLIGHT_WAIT):
            return False
        self.reserved.add(host.id)
        return True

    def outdated(self, host: HostSnapshot) -> bool:
        """The shared table has moved past `host` (another transaction's claim on it was
        merged after we ranked): its compare-and-set would be lost, so skip it unread."""
        if host.id in self.pending:
            return False  # our own transaction's view of it
        table = self.cache.current()
        return table is not None and old_generation(table, host.id) > host.generation

    def changed(self, host: HostSnapshot) -> bool:
        """Read again since it was ranked (`lost`) and found changed, or gone: its
        compare-and-set would be lost. (The next ranking has it as it is now.)"""
        fresh = self.pending.get(host.id, host)
        return fresh is None or fresh.generation != host.generation

    def unreserve(self, host: HostSnapshot) -> None:
        """Our claim on `host` did not go through: others may try it again."""
        if host.id in self.reserved:
            self.reserved.discard(host.id)
            self.cache.release((host.id,))

    def claimed(self, host: HostSnapshot) -> None:
        """Our claim went through (in our transaction), leaving `host` so (after_claim)."""
        self.pending[host.id] = host

    def lost(self, host: HostSnapshot, ahead: Iterable[HostSnapshot] = ()) -> None:
        """Our compare-and-set on `host` failed: read it again, as our transaction sees it,
        and with it (same statement) the candidates `ahead`, those ranked next. Another
        process's claims are what made `host` stale, and that process ranks as we do: the
        hosts it took lately are the ones our stale ranking offers next. Read in one go,
        they are skipped (`changed`) instead of each costing a lost compare-and-set and a
        read of its own."""
        ids = [host.id, *(h.id for h in ahead if h.id not in self.pending)]
        found = read_hosts_by_id(self.session, self.settings, ids)
        for hid in ids:
            self.pending[hid] = found.get(hid)
        fresh = found.get(host.id)
        if fresh is not None and fresh.generation <= host.generation:
            # Seen through our own transaction it is no newer than what we tried: the rows
            # changed under a generation we cannot see (should not happen); start over.
            self.cache.invalidate()


def _release(cache: HostCache, reserved: set[int]) -> None:
    if reserved:
        cache.release(reserved)
        reserved.clear()


def _release_session(session: Session) -> None:
    for url, hosts in session.info.get(_RESERVED_KEY, {}).items():
        cache = _caches.get(url)
        if cache is not None:
            _release(cache, hosts)
        hosts.clear()


# Every session's commit and rollback pass through these; they do nothing for a session that
# never placed a VM through the cache (its info has no overlay).


@event.listens_for(Session, "after_commit")
def _merge_pending(session: Session) -> None:
    if _SESSION_KEY not in session.info or session.in_nested_transaction():
        return  # a savepoint's release commits nothing yet
    pending: dict[str, dict[int, HostSnapshot | None]] = session.info[_SESSION_KEY]
    for url, hosts in pending.items():
        cache = _caches.get(url)
        if cache is not None and hosts:
            cache.merge(hosts)
        hosts.clear()
    _release_session(session)


@event.listens_for(Session, "after_soft_rollback")
def _drop_pending(session: Session, previous_transaction: Any = None) -> None:
    """Any rollback, even of a savepoint, may have undone a claim: forget the overlay (the
    compare-and-set corrects what the cache then misses)."""
    if _SESSION_KEY in session.info:
        for hosts in session.info[_SESSION_KEY].values():
            hosts.clear()
    _release_session(session)


@event.listens_for(Session, "after_transaction_end")
def _end_pending(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the outermost transaction ended (merged if committed)
        _drop_pending(session)


_caches: OrderedDict[str, HostCache] = OrderedDict()
_caches_lock = threading.Lock()


def cache_for(url: str, ttl: float) -> HostCache:
    """The process's cache for the database at `url` (made on first use)."""
    cache = _caches.get(url)
    if cache is not None and cache.ttl == ttl:
        return cache
    with _caches_lock:
        cache = _caches.get(url)
        if cache is None:
            cache = _caches[url] = HostCache(url, ttl)
            while len(_caches) > MAX_CACHES:
                _caches.popitem(last=False)[1].close()
        else:
            _caches.move_to_end(url)
        cache.ttl = ttl
        return cache


def for_session(session: Session | Connection, settings: Settings) -> SessionHosts | None:
    """The cached hosts for a placement in `session`'s transaction (an ORM Session, or the
    Connection of a Store.transaction()); None when the cache is off (`host_cache_ttl` 0),
    cannot serve this database (SQLite in memory), or the connection is not a
    Store.transaction()'s (nothing would merge its claims, nor drop them on rollback)."""
    if settings.host_cache_ttl <= 0:
        return None
    if isinstance(session, Connection):
        if transaction_of(session) is None:
            return None
        engine = session.engine
    else:
        bind = session.get_bind()
        engine = bind if isinstance(bind, Engine) else bind.engine
    key = _keys.get(engine, False)
    if key is False:
        url = engine.url
        memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
        key = _keys[engine] = None if memory else url.render_as_string(hide_password=False)
    if key is None:
        return None
    return SessionHosts(cache_for(key, settings.host_cache_ttl), session, settings)


_keys: weakref.WeakKeyDictionary[Engine, str | None] = weakref.WeakKeyDictionary()
"""The cache key of each engine seen (its URL; None when it cannot be cached)."""


def reset(url: str | None = None) -> None:
    """Forget the cache of `url` (every cache when None) and close its connections."""
    with _caches_lock:
        urls = list(_caches) if url is None else [
            k for k in _caches if k == url
            or make_url(k).render_as_string(hide_password=True) == url]
        for key in urls:
            _caches.pop(key).close()


def caches() -> Iterable[HostCache]:
    """The caches this process holds (for tests and benchmarks)."""
    return list(_caches.values())
