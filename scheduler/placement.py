"""Pure placement: filter host snapshots, weigh the survivors, rank them.

Owns the decision only. It is given snapshots and a request and returns a ranking plus the
per-filter verdicts; it never touches the store (claims.py does the claiming).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSnapshot:
    """What placement knows of one host at one moment."""

    id: int
    name: str
    generation: int
    alive: bool
    enabled: bool
    maintenance: bool
    arch: str
    virt_type: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    used_vcpus: int
    used_memory_mb: int
    used_disk_gb: int
    cpu_ratio: float
    ram_ratio: float
    disk_ratio: float
    labels: dict[str, str] = field(default_factory=dict)
    cached_images: frozenset[str] = frozenset()

    @property
    def free_vcpus(self) -> float:
        return self.vcpus * self.cpu_ratio - self.used_vcpus

    @property
    def free_memory_mb(self) -> float:
        return self.memory_mb * self.ram_ratio - self.used_memory_mb

    @property
    def free_disk_gb(self) -> float:
        return self.disk_gb * self.disk_ratio - self.used_disk_gb


@dataclass(frozen=True)
class Request:
    """What one VM needs."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    arch: str = "x86_64"
    image_sha256: str = ""
    constraints: dict[str, str] = field(default_factory=dict)


class Filter:
    """One reason a host may not take a VM: host_passes returns False with a log line."""

    name = "filter"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        raise NotImplementedError


class AliveFilter(Filter):
    name = "alive"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.alive


class EnabledFilter(Filter):
    name = "enabled"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.enabled and not host.maintenance


class ResourceFilter(Filter):
    name = "resources"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return (host.free_vcpus >= req.vcpus and host.free_memory_mb >= req.memory_mb
                and host.free_disk_gb >= req.disk_gb)


class ArchFilter(Filter):
    name = "arch"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.arch == req.arch


class LabelFilter(Filter):
    name = "labels"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return all(host.labels.get(k) == v for k, v in req.constraints.items())


DEFAULT_FILTERS: tuple[Filter, ...] = (AliveFilter(), EnabledFilter(), ArchFilter(),
                                       ResourceFilter(), LabelFilter())


class Weigher:
    """One preference: weigh returns a raw number; select normalises and multiplies it."""

    name = "weigher"
    multiplier = 1.0

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        raise NotImplementedError


class FreeRamWeigher(Weigher):
    name = "free_ram"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return host.free_memory_mb


class ImageCachedWeigher(Weigher):
    name = "image_cached"
    multiplier = 0.5

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return 1.0 if req.image_sha256 and req.image_sha256 in host.cached_images else 0.0


DEFAULT_WEIGHERS: tuple[Weigher, ...] = (FreeRamWeigher(), ImageCachedWeigher())


@dataclass
class Ranking:
    """The outcome: hosts best first, and how many hosts each filter removed."""

    hosts: list[HostSnapshot]
    removed: dict[str, int]
    scores: dict[str, float]


def _normalise(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0 for _ in values]
    return [(v - lo) / (hi - lo) for v in values]


def rank(hosts: Sequence[HostSnapshot], req: Request,
         filters: Sequence[Filter] = DEFAULT_FILTERS,
         weighers: Sequence[Weigher] = DEFAULT_WEIGHERS,
         top_random: int = 1, rng: random.Random | None = None) -> Ranking:
    """Filter, weigh and order hosts; shuffle among the best `top_random` to spread contention."""
    removed = {f.name: 0 for f in filters}
    survivors: list[HostSnapshot] = []
    for host in hosts:
        for flt in filters:
            if not flt.host_passes(host, req):
                removed[flt.name] += 1
                log.debug("host %s fails filter %s", host.name, flt.name)
                break
        else:
            survivors.append(host)
    if not survivors:
        return Ranking([], removed, {})
    totals = [0.0] * len(survivors)
    for w in weighers:
        for i, n in enumerate(_normalise([w.weigh(h, req) for h in survivors])):
            totals[i] += w.multiplier * n
    order = sorted(range(len(survivors)), key=lambda i: (-totals[i], survivors[i].name))
    ranked = [survivors[i] for i in order]
    if top_random > 1:
        head = ranked[:top_random]
        (rng or random).shuffle(head)
        ranked[:top_random] = head
    return Ranking(ranked, removed, {survivors[i].name: totals[i] for i in order})
