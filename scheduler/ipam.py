"""Static addresses of fleet networks: which VM holds which address, decided by the store.

Owns the ip_allocations table. An allocation is one INSERT of (network, address, VM): the
table's primary key (network_id, address) lets exactly one transaction hold an address,
whatever the number of API processes, controllers or threads asking at once. Allocation
reads what is taken, picks the lowest free address of the network's static pool
(fleet.networks.static_pool), and inserts it inside a SAVEPOINT; losing to a concurrent
insert (IntegrityError) rolls back only that savepoint, and it reads again and takes the
next one. Runs in the caller's transaction, so an address is held exactly as long as the VM
row written with it: a failed create rolls both back.

Rules: lowest free address first; one static address per VM; the gateway and the DHCP
range are never handed out; an exhausted pool is a 409; an address is released when its
VM is deleted (scheduler.events.on_deleted, web.vmops) and never reused while held.

Must not: talk to hosts, or decide what a guest is told (fleet.networks does).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet import networks
from fleet.exceptions import Conflict
from fleet.store.models import IPAllocation, Network, utcnow

log = logging.getLogger(__name__)

MAX_ROUNDS = 64
"""Times an allocation reads the taken addresses again after losing an insert: each loss
means another request took an address, so a few rounds suffice unless the pool runs out."""


def lowest_free(pool: list[networks.Range], taken: Iterable[str]) -> str | None:
    """The lowest address of `pool` not in `taken`, or None (pure)."""
    used = {int(ipaddress.IPv4Address(a)) for a in taken}
    for lo, hi in pool:
        addr = lo
        while addr <= hi and addr in used:
            addr += 1
        if addr <= hi:
            return str(ipaddress.IPv4Address(addr))
    return None


def taken(session: Session, network_id: str) -> list[str]:
    """Addresses of the network held now."""
    return list(session.scalars(select(IPAllocation.address)
                                .where(IPAllocation.network_id == network_id)))


def pool_of(network: Network) -> list[networks.Range]:
    return networks.static_pool(network.cidr, network.gateway, network.dhcp_start,
                                network.dhcp_end)


def allocate(session: Session, network: Network, vm_id: str) -> str:
    """Hold the lowest free static address of `network` for `vm_id` (whose row is flushed)
    and return it; Conflict (409) when the pool is exhausted."""
    pool = pool_of(network)
    for _ in range(MAX_ROUNDS):
        address = lowest_free(pool, taken(session, network.id))
        if address is None:
            size = networks.pool_size(pool)
            raise Conflict(f"network '{network.name}' has no free static address (all {size} "
                           "of its static pool are held)",
                           {"network": network.name, "pool_size": size})
        try:
            with session.begin_nested():
                session.execute(insert(IPAllocation).values(
                    network_id=network.id, address=address, vm_id=vm_id, created_at=utcnow()))
        except IntegrityError:
            if address not in taken(session, network.id):
                raise  # not a lost race (a missing VM or network row): say so, do not loop
            log.debug("address %s of %s was taken meanwhile; trying the next", address,
                      network.name)
            continue
        return address
    raise Conflict(f"the static addresses of network '{network.name}' kept being taken by "
                   "concurrent requests; try again", {"network": network.name})


def release(session: Session, vm_id: str) -> int:
    """Give back every address the VM holds (idempotent); how many were held."""
    res = session.execute(delete(IPAllocation).where(IPAllocation.vm_id == vm_id)
                          .execution_options(synchronize_session=False))
    return int(res.rowcount or 0)


def held(session: Session, network_id: str) -> int:
    """How many static addresses of the network are held."""
    return int(session.scalar(select(func.count()).select_from(IPAllocation)
                              .where(IPAllocation.network_id == network_id)) or 0)
