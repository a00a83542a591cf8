"""Capacity claims in the store: compare-and-set on a host's generation.

Owns the only code that changes a host's used capacity. Runs inside the caller's transaction,
so a VM row and its claim are written together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from fleet.config import Settings
from fleet.exceptions import NoValidHost
from fleet.store.fast import FastStatement, column_default, is_constant
from fleet.store.models import VM, Claim, Host, ServerGroup, utcnow
from scheduler import hostcache
from scheduler.placement import HostSnapshot, Request, Weigher, default_weighers, rank

MAX_ALTERNATES = 2
"""Hosts kept beside the chosen one for a rebuild after a failed build."""

CLAIM_ROUNDS = 10
"""Times placement re-reads the hosts after every candidate was lost to concurrent claims.
Each lost compare-and-set means another claim went through, so a few rounds suffice."""

LOST_LOOKAHEAD = 8
"""After a lost compare-and-set, the candidates ranked next that are read again with the lost
host, in the same statement (hostcache.SessionHosts.lost)."""


def snapshot(host: Host, settings: Settings, vm_count: int = 0, builds: int = 0
             ) -> HostSnapshot:
    return HostSnapshot(
        id=host.id, name=host.name, generation=host.generation, alive=host.alive,
        enabled=host.enabled, maintenance=host.maintenance, arch=host.arch,
        virt_type=host.virt_type, vcpus=host.vcpus, memory_mb=host.memory_mb,
        disk_gb=host.disk_gb, used_vcpus=host.used_vcpus, used_memory_mb=host.used_memory_mb,
        used_disk_gb=host.used_disk_gb,
        cpu_ratio=host.cpu_ratio or settings.cpu_allocation_ratio,
        ram_ratio=host.ram_ratio or settings.ram_allocation_ratio,
        disk_ratio=host.disk_ratio or settings.disk_allocation_ratio,
        labels=dict(host.labels or {}), cached_images=frozenset(host.cached_images or ()),
        max_vms=host.max_vms, vm_count=vm_count, builds=builds)


def load_snapshots(session: Session | Connection, settings: Settings,
                   only: frozenset[str] | None = None) -> list[HostSnapshot]:
    """Every host (or those in `only`) as it is now, with its VM and build counts: one Core
    statement in the caller's transaction (no ORM objects, nothing cached)."""
    return hostcache.read_hosts(session, settings, only)


def group_hosts(session: Session, group_id: str | None,
                exclude_vm: str | None = None) -> dict[str, int]:
    """Hosts holding members of a server group, with how many members each."""
    if group_id is None:
        return {}
    query = (select(Host.name, func.count(VM.id)).join(VM, VM.host_id == Host.id)
             .where(VM.server_group_id == group_id).group_by(Host.name))
    if exclude_vm is not None:
        query = query.where(VM.id != exclude_vm)
    return {name: int(n) for name, n in session.execute(query)}


def request_for(session: Session, vm: VM, image_sha256: str = "") -> Request:
    """The placement request of a VM row: its size, labels and server group. Locks the
    group's row first, so members of one group are placed one at a time."""
    group = None
    if vm.server_group_id is not None:
        group = session.scalars(select(ServerGroup).where(ServerGroup.id == vm.server_group_id)
                                .with_for_update()).one()
    return Request(vcpus=vm.vcpus, memory_mb=vm.memory_mb, disk_gb=vm.disk_gb,
                   image_sha256=image_sha256, constraints=dict(vm.constraints or {}),
                   group_policy=group.policy if group else None,
                   group_hard=group.hard if group else True,
                   group_hosts=group_hosts(session, vm.server_group_id, exclude_vm=vm.id))


_CAS = (update(Host)
        .where(Host.id == bindparam("hid"), Host.generation == bindparam("gen"))
        .values(used_vcpus=Host.used_vcpus + bindparam("v"),
                used_memory_mb=Host.used_memory_mb + bindparam("m"),
                used_disk_gb=Host.used_disk_gb + bindparam("d"),
                generation=Host.generation + 1))
"""The compare-and-set, built once: Core statements on the session's connection (the ORM's
unit of work costs more than the claim itself at a thousand decisions a second)."""

_RECORD = insert(Claim)
"""The claim's row (SQLite: the second statement of a claim)."""

_cas_returning = _CAS.returning(Host.id).cte("cas")
_CAS_AND_RECORD = insert(Claim).from_select(
    ["vm_id", "host_id", "vcpus", "memory_mb", "disk_gb", "created_at"],
    select(bindparam("claim_vm", type_=Claim.vm_id.type), _cas_returning.c.id,
           bindparam("v", type_=Claim.vcpus.type), bindparam("m", type_=Claim.memory_mb.type),
           bindparam("d", type_=Claim.disk_gb.type),
           bindparam("claim_at", type_=Claim.created_at.type))).returning(Claim.id)
"""PostgreSQL: the compare-and-set and the claim's row in one statement (one round trip):
the row is written only when the UPDATE matched. (Parameter names must not be column names
of `hosts`: Core would take them for more values to SET.)"""


_FAST_CAS = FastStatement(_CAS, ("hid", "gen", "v", "m", "d"))
_FAST_RECORD = FastStatement(_RECORD, ("vm_id", "host_id", "vcpus", "memory_mb", "disk_gb",
                                       "created_at"))
_FAST_CAS_AND_RECORD = FastStatement(_CAS_AND_RECORD, ("hid", "gen", "v", "m", "d",
                                                       "claim_vm", "claim_at"), direct=True)
"""The same statements run on the driver's connection (fleet/store/fast.py): SQLAlchemy's
per-statement work was most of a decision's time. The claim statements of PostgreSQL are
`direct`: in a single-statement transaction, libpq runs them (their rows are only counted)."""


@dataclass(frozen=True)
class PlacedRow:
    """A row to write with the claim, naming its host (and alternates): the VM's row when
    the caller writes it only once placed. On PostgreSQL it goes in the claim's statement
    (one round trip for the whole decision), on SQLite right after it."""

    table: Table
    values: dict[str, Any]
    host_key: str = "host_id"
    alternates_key: str | None = "alternates"

    def for_host(self, host: HostSnapshot, alternates: list[str]) -> dict[str, Any]:
        values = dict(self.values)
        values[self.host_key] = host.id
        if self.alternates_key is not None:
            values[self.alternates_key] = alternates
        return values


@dataclass(frozen=True)
class _RowPlan:
    """PostgreSQL: the one statement of a claim with a caller's row, and how the row's
    values become its parameters."""

    statement: FastStatement
    names: tuple[tuple[str, str], ...]
    """(row key, parameter) of each value the caller gives (but the host, from the claim)."""
    made: tuple[tuple[str, Callable[[], Any]], ...]
    """(parameter, default) of each column the caller does not give whose Python-side
    default is made per row (an id, a time)."""


_ROW_PLANS: dict[tuple[str, tuple[str, ...], str], _RowPlan] = {}


def _claim_and_row(table: Table, keys: tuple[str, ...], host_key: str) -> _RowPlan:
    """PostgreSQL: compare-and-set, the claim's row and the caller's row (its host from the
    claim; `keys`: the columns the caller gives) in one statement; nothing is written unless
    the UPDATE matched. An INSERT ... SELECT gets no column defaults of its own, so the
    Python-side ones are added here as Core's INSERT would: constant ones as literal
    parameters of the statement (put through their type once, not at every claim), the
    others made for each row."""
    key = (table.name, keys, host_key)
    done = _ROW_PLANS.get(key)
    if done is None:
        cas = _CAS.returning(Host.id).cte("cas")
        record = insert(Claim).from_select(
            ["vm_id", "host_id", "vcpus", "memory_mb", "disk_gb", "created_at"],
            select(bindparam("claim_vm", type_=Claim.vm_id.type), cas.c.id,
                   bindparam("v", type_=Claim.vcpus.type),
                   bindparam("m", type_=Claim.memory_mb.type),
                   bindparam("d", type_=Claim.disk_gb.type),
                   bindparam("claim_at", type_=Claim.created_at.type))
        ).returning(Claim.host_id).cte("record")
        given = [k for k in keys if k != host_key]
        cols, values = list(given), [bindparam(f"row_{k}", type_=table.c[k].type)
                                     for k in given]
        made: list[tuple[str, Callable[[], Any]]] = []
        for col in table.columns:
            make = None if col.key in keys or col.key == host_key else column_default(col)
            if make is None:
                continue
            cols.append(col.key)
            if is_constant(make):
                values.append(bindparam(f"row_{col.key}", value=make(), type_=col.type))
            else:
                values.append(bindparam(f"row_{col.key}", type_=col.type))
                made.append((f"row_{col.key}", make))
        row = insert(table).from_select(
            [*cols, host_key], select(*values, record.c.host_id)
        ).returning(*table.primary_key.columns)
        statement = FastStatement(row, ("hid", "gen", "v", "m", "d", "claim_vm", "claim_at",
                                        *(f"row_{k}" for k in given),
                                        *(name for name, _ in made)), direct=True)
        done = _ROW_PLANS[key] = _RowPlan(statement, tuple((k, f"row_{k}") for k in given),
                                          tuple(made))
    return done


_ROW_INSERTS: dict[tuple[str, tuple[str, ...]], FastStatement] = {}


def _row_insert(table: Table, keys: tuple[str, ...]) -> FastStatement:
    done = _ROW_INSERTS.get((table.name, keys))
    if done is None:
        done = _ROW_INSERTS[(table.name, keys)] = FastStatement(insert(table), keys)
    return done


def try_claim(session: Session | Connection, host: HostSnapshot, vm_id: str,
              req: Request, row: dict[str, Any] | None = None,
              table: Table | None = None, host_key: str = "host_id") -> bool:
    """Take `req` on `host` if its generation is still the one we saw. True if taken.
    With `row` (and its `table`), that row is written too, naming the host, all or nothing."""
    conn = session if isinstance(session, Connection) else session.connection()
    cas = {"hid": host.id, "gen": host.generation, "v": req.vcpus, "m": req.memory_mb,
           "d": req.disk_gb}
    if conn.dialect.name == "postgresql":
        cas.update(claim_vm=vm_id, claim_at=utcnow())
        if row is None:
            return _FAST_CAS_AND_RECORD.execute(conn, cas).fetchone() is not None
        assert table is not None
        plan = _claim_and_row(table, tuple(row), host_key)
        for k, name in plan.names:
            cas[name] = row[k]
        for name, make in plan.made:
            cas[name] = make()
        return plan.statement.execute(conn, cas).fetchone() is not None
    if _FAST_CAS.execute(conn, cas).rowcount != 1:
        return False
    _FAST_RECORD.execute(conn, {"vm_id": vm_id, "host_id": host.id, "vcpus": req.vcpus,
                                "memory_mb": req.memory_mb, "disk_gb": req.disk_gb,
                                "created_at": utcnow()})
    if row is not None:
        assert table is not None
        _row_insert(table, tuple(sorted(row))).execute(conn, row)
    return True


@dataclass(frozen=True)
class Placement:
    """Where a VM went: the host as its claim left it, and the next best hosts."""

    host: HostSnapshot
    alternates: list[str]


_WEIGHERS: dict[str, tuple[Weigher, ...]] = {}


def _weighers(policy: str) -> tuple[Weigher, ...]:
    weighers = _WEIGHERS.get(policy)
    if weighers is None:
        weighers = _WEIGHERS[policy] = default_weighers(policy)
    return weighers


def claim(session: Session | Connection, vm_id: str, req: Request, settings: Settings,
          only: frozenset[str] | None = None, row: PlacedRow | None = None) -> Placement:
    """Rank the hosts for `req` and claim on the first that is still as we saw it, in the
    session's transaction, for the VM `vm_id` (whose row the caller writes or updates).
    `session` may also be the Connection of a `Store.transaction()` (no ORM at all: the
    placement decision at its cheapest).

    `only` limits the candidates (a reschedule onto alternates). `row` is written with the
    claim, naming the chosen host and alternates (PlacedRow). Raises NoValidHost with
    per-filter counts.

    Hosts come from the process's host cache (hostcache.py) unless `only` is given or the
    cache is off: a stale host loses its compare-and-set, is re-read, and the next candidate
    is tried. A refusal is never made on cached hosts alone: they are read again first.
    """
    weighers = _weighers(settings.placement_policy)
    cached = None if only is not None else hostcache.for_session(session, settings)
    fresh = cached is None
    for _ in range(CLAIM_ROUNDS):
        hosts: Sequence[HostSnapshot] = (load_snapshots(session, settings, only)
                                         if cached is None else cached.hosts())
        ranking = rank(hosts, req, weighers=weighers, top_random=settings.host_subset_size)
        if not len(ranking) and not fresh:
            assert cached is not None
            fresh = True
            hosts = cached.hosts(reload=True)
            ranking = rank(hosts, req, weighers=weighers, top_random=settings.host_subset_size)
        if not len(ranking):
            raise NoValidHost(_no_host_message(len(hosts), ranking.removed),
                              {"filters": ranking.removed, "hosts": len(hosts)})
        # Hosts another decision of this process is claiming on right now are passed over,
        # then tried last, once that claim ended; hosts it claimed since we ranked are
        # skipped (hostcache: claims in flight).
        passed_over: list[int] = []
        nxt = 0
        while True:
            if nxt < len(ranking):
                i, nxt, first_pass = nxt, nxt + 1, True
            elif passed_over:
                i, first_pass = passed_over.pop(0), False
            else:
                break
            best = ranking.top(i + 1 + MAX_ALTERNATES)
            cand = best[i]
            if cached is not None:
                if cached.changed(cand):
                    continue  # re-read after a lost compare-and-set: taken since we ranked
                if first_pass and not cached.reserve(cand):
                    passed_over.append(i)
                    continue
                if not first_pass:
                    cached.wait_and_reserve(cand)
                # Checked once reserved: a claim that ended before our reservation was merged
                # before it ended, so it shows here.
                if cached.outdated(cand):
                    cached.unreserve(cand)
                    continue  # claimed since we ranked: lost for sure (the next round sees it)
            won = (try_claim(session, cand, vm_id, req) if row is None else
                   try_claim(session, cand, vm_id, req,
                             row.for_host(cand, [h.name for h in best[i + 1:]]),
                             row.table, row.host_key))
            if won:
                taken = hostcache.after_claim(cand, req)
                if cached is not None:
                    cached.claimed(taken)
                return Placement(taken, [h.name for h in best[i + 1:]])
            if cached is not None:
                cached.unreserve(cand)
                cached.lost(cand, ranking.top(i + 1 + LOST_LOOKAHEAD)[i + 1:])
    raise NoValidHost("every candidate host was taken by concurrent requests; try again",
                      {"filters": ranking.removed, "hosts": len(hosts)})


def check_room(session: Session, req: Request, settings: Settings) -> None:
    """Raise NoValidHost (with per-filter counts) when no host can take `req` as the store
    last committed its hosts, before any write transaction: the cached hosts first, and when
    they have no room, a fresh read (on the host cache's own connection: it never waits for
    the store's writer). Room found here is not a claim: `claim` decides again under the
    writer lock. Does nothing when the host cache is off."""
    cached = hostcache.for_session(session, settings)
    if cached is None:
        return
    weighers = _weighers(settings.placement_policy)
    ranking = rank(cached.hosts(), req, weighers=weighers, top_random=1)
    if len(ranking):
        return
    hosts = cached.hosts(reload=True)
    ranking = rank(hosts, req, weighers=weighers, top_random=1)
    if not len(ranking):
        raise NoValidHost(_no_host_message(len(hosts), ranking.removed),
                          {"filters": ranking.removed, "hosts": len(hosts)})


def place_and_claim(session: Session, vm: VM, req: Request, settings: Settings,
                    only: frozenset[str] | None = None) -> HostSnapshot:
    """`claim` for a VM row: sets its host and alternates, returns the chosen host as the
    claim left it."""
    placed = claim(session, vm.id, req, settings, only)
    vm.host_id = placed.host.id
    vm.alternates = placed.alternates
    return placed.host


def release(session: Session, vm_id: str) -> bool:
    """Give back a VM's claim (idempotent). True if there was one."""
    claim = session.scalars(select(Claim).where(Claim.vm_id == vm_id)).first()
    if claim is None:
        return False
    # Delete first and count: of two concurrent releases only the one that deleted the row
    # gives the capacity back (the other waits on the row lock, then deletes nothing).
    gone = session.execute(delete(Claim).where(Claim.id == claim.id)
                           .execution_options(synchronize_session=False))
    session.expunge(claim)
    if gone.rowcount != 1:
        return False
    session.execute(
        update(Host).where(Host.id == claim.host_id)
        .values(used_vcpus=Host.used_vcpus - claim.vcpus,
                used_memory_mb=Host.used_memory_mb - claim.memory_mb,
                used_disk_gb=Host.used_disk_gb - claim.disk_gb,
                generation=Host.generation + 1)
        .execution_options(synchronize_session=False))
    return True


def _no_host_message(total: int, removed: dict[str, int]) -> str:
    parts = [f"{name} removed {n}" for name, n in removed.items() if n]
    detail = "; ".join(parts) if parts else "no hosts are registered"
    return f"no host can take this VM ({total} hosts: {detail})"
