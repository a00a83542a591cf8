"""Capacity claims in the store: compare-and-set on a host's generation.

Owns the only code that changes a host's used capacity. Runs inside the caller's transaction,
so a VM row and its claim are written together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from fleet.config import Settings
from fleet.exceptions import NoValidHost
from fleet.store.models import VM, Claim, Host, ServerGroup, utcnow
from scheduler import hostcache
from scheduler.placement import HostSnapshot, Request, default_weighers, rank

MAX_ALTERNATES = 2
"""Hosts kept beside the chosen one for a rebuild after a failed build."""

CLAIM_ROUNDS = 10
"""Times placement re-reads the hosts after every candidate was lost to concurrent claims.
Each lost compare-and-set means another claim went through, so a few rounds suffice."""


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


def load_snapshots(session: Session, settings: Settings,
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


def try_claim(session: Session, host: HostSnapshot, vm_id: str, req: Request) -> bool:
    """Take `req` on `host` if its generation is still the one we saw. True if taken."""
    conn = session.connection()
    taken = conn.execute(_CAS, {"hid": host.id, "gen": host.generation, "v": req.vcpus,
                                "m": req.memory_mb, "d": req.disk_gb}).rowcount == 1
    if taken:
        conn.execute(insert(Claim), {"vm_id": vm_id, "host_id": host.id, "vcpus": req.vcpus,
                                     "memory_mb": req.memory_mb, "disk_gb": req.disk_gb,
                                     "created_at": utcnow()})
    return taken


def place_and_claim(session: Session, vm: VM, req: Request, settings: Settings,
                    only: frozenset[str] | None = None) -> Host:
    """Rank the hosts for `req` and claim on the first that is still as we saw it.

    `only` limits the candidates (a reschedule onto alternates). Sets the VM's host and
    alternates. Raises NoValidHost with per-filter counts.

    Hosts come from the process's host cache (hostcache.py) unless `only` is given or the
    cache is off: a stale host loses its compare-and-set, is re-read, and the next candidate
    is tried. A refusal is never made on cached hosts alone: they are read again first.
    """
    weighers = default_weighers(settings.placement_policy)
    cached = None if only is not None else hostcache.for_session(session, settings)
    fresh = cached is None
    for _ in range(CLAIM_ROUNDS):
        hosts: Sequence[HostSnapshot] = (load_snapshots(session, settings, only)
                                         if cached is None else cached.hosts())
        ranking = rank(hosts, req, weighers=weighers, top_random=settings.host_subset_size)
        if not ranking.hosts and not fresh:
            assert cached is not None
            fresh = True
            hosts = cached.hosts(reload=True)
            ranking = rank(hosts, req, weighers=weighers, top_random=settings.host_subset_size)
        if not ranking.hosts:
            raise NoValidHost(_no_host_message(len(hosts), ranking.removed),
                              {"filters": ranking.removed, "hosts": len(hosts)})
        for i, cand in enumerate(ranking.hosts):
            if try_claim(session, cand, vm.id, req):
                if cached is not None:
                    cached.claimed(cand, req)
                chosen = session.get(Host, cand.id, populate_existing=True)
                assert chosen is not None
                vm.host_id = chosen.id
                vm.alternates = [h.name for h in ranking.hosts[i + 1:i + 1 + MAX_ALTERNATES]]
                return chosen
            if cached is not None:
                cached.lost(cand)
    raise NoValidHost("every candidate host was taken by concurrent requests; try again",
                      {"filters": ranking.removed, "hosts": len(hosts)})


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
