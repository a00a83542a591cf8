"""Capacity claims in the store: compare-and-set on a host's generation.

Owns the only code that changes a host's used capacity. Runs inside the caller's transaction,
so a VM row and its claim are written together or not at all.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from fleet.config import Settings
from fleet.exceptions import NoValidHost
from fleet.store.models import VM, Claim, Host
from scheduler.placement import HostSnapshot, Request, rank

MAX_ALTERNATES = 2
"""Hosts kept beside the chosen one for a rebuild after a failed build."""


def snapshot(host: Host, settings: Settings) -> HostSnapshot:
    return HostSnapshot(
        id=host.id, name=host.name, generation=host.generation, alive=host.alive,
        enabled=host.enabled, maintenance=host.maintenance, arch=host.arch,
        virt_type=host.virt_type, vcpus=host.vcpus, memory_mb=host.memory_mb,
        disk_gb=host.disk_gb, used_vcpus=host.used_vcpus, used_memory_mb=host.used_memory_mb,
        used_disk_gb=host.used_disk_gb,
        cpu_ratio=host.cpu_ratio or settings.cpu_allocation_ratio,
        ram_ratio=host.ram_ratio or settings.ram_allocation_ratio,
        disk_ratio=host.disk_ratio or settings.disk_allocation_ratio,
        labels=dict(host.labels or {}), cached_images=frozenset(host.cached_images or ()))


def try_claim(session: Session, host: HostSnapshot, vm_id: str, req: Request) -> bool:
    """Take `req` on `host` if its generation is still the one we saw. True if taken."""
    result = session.execute(
        update(Host)
        .where(Host.id == host.id, Host.generation == host.generation)
        .values(used_vcpus=Host.used_vcpus + req.vcpus,
                used_memory_mb=Host.used_memory_mb + req.memory_mb,
                used_disk_gb=Host.used_disk_gb + req.disk_gb,
                generation=Host.generation + 1)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return False
    session.add(Claim(vm_id=vm_id, host_id=host.id, vcpus=req.vcpus,
                      memory_mb=req.memory_mb, disk_gb=req.disk_gb))
    session.flush()
    return True


def place_and_claim(session: Session, vm: VM, req: Request, settings: Settings,
                    only: frozenset[str] | None = None) -> Host:
    """Rank the hosts for `req` and claim on the first that is still as we saw it.

    `only` limits the candidates (a reschedule onto alternates). Sets the VM's host and
    alternates. Raises NoValidHost with per-filter counts.
    """
    query = select(Host) if only is None else select(Host).where(Host.name.in_(only))
    hosts = session.scalars(query).all()
    ranking = rank([snapshot(h, settings) for h in hosts], req)
    if not ranking.hosts:
        raise NoValidHost(_no_host_message(len(hosts), ranking.removed),
                          {"filters": ranking.removed, "hosts": len(hosts)})
    for i, cand in enumerate(ranking.hosts):
        if try_claim(session, cand, vm.id, req):
            chosen = session.get(Host, cand.id)
            assert chosen is not None
            session.refresh(chosen)
            vm.host_id = chosen.id
            vm.alternates = [h.name for h in ranking.hosts[i + 1:i + 1 + MAX_ALTERNATES]]
            return chosen
    raise NoValidHost("every candidate host was taken by concurrent requests; try again",
                      {"filters": ranking.removed, "hosts": len(hosts)})


def release(session: Session, vm_id: str) -> bool:
    """Give back a VM's claim (idempotent). True if there was one."""
    claim = session.scalars(select(Claim).where(Claim.vm_id == vm_id)).first()
    if claim is None:
        return False
    session.execute(
        update(Host).where(Host.id == claim.host_id)
        .values(used_vcpus=Host.used_vcpus - claim.vcpus,
                used_memory_mb=Host.used_memory_mb - claim.memory_mb,
                used_disk_gb=Host.used_disk_gb - claim.disk_gb,
                generation=Host.generation + 1)
        .execution_options(synchronize_session=False))
    session.execute(delete(Claim).where(Claim.id == claim.id))
    return True


def _no_host_message(total: int, removed: dict[str, int]) -> str:
    parts = [f"{name} removed {n}" for name, n in removed.items() if n]
    detail = "; ".join(parts) if parts else "no hosts are registered"
    return f"no host can take this VM ({total} hosts: {detail})"
