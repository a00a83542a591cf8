"""Placement weighers, nova style: each returns one raw number per host; `rank` normalises
them to 0..1 across the candidates and multiplies by the weigher's multiplier.

A negative multiplier inverts a preference: `free_ram` with -1.0 packs instead of spreading.
"""

from __future__ import annotations

from scheduler.snapshot import HostSnapshot, Request


class Weigher:
    name = "weigher"

    def __init__(self, multiplier: float = 1.0) -> None:
        self.multiplier = multiplier

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        raise NotImplementedError


class FreeRamWeigher(Weigher):
    """More free RAM weighs more: spread (positive) or pack (negative multiplier)."""

    name = "free_ram"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return host.free_memory_mb


class FreeVcpuWeigher(Weigher):
    name = "free_vcpus"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return host.free_vcpus


class ImageCachedWeigher(Weigher):
    """A host that already has the base image starts the VM without a download."""

    name = "image_cached"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return 1.0 if req.image_sha256 and req.image_sha256 in host.cached_images else 0.0


class FewestBuildsWeigher(Weigher):
    """Fewer builds in progress weighs more (a busy host builds slower)."""

    name = "fewest_builds"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return -float(host.builds)


class SoftGroupWeigher(Weigher):
    """Soft affinity prefers hosts holding the group's members; soft anti-affinity avoids
    them (the more members on a host, the stronger)."""

    name = "soft_group"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        if req.group_hard or req.group_policy is None:
            return 0.0
        members = float(req.group_hosts.get(host.name, 0))
        return members if req.group_policy == "affinity" else -members


def default_weighers(policy: str = "spread") -> tuple[Weigher, ...]:
    """The weighers for a placement policy: `spread` (default) or `pack`."""
    ram = 1.0 if policy == "spread" else -1.0
    return (FreeRamWeigher(ram), FreeVcpuWeigher(ram * 0.5), ImageCachedWeigher(0.5),
            FewestBuildsWeigher(0.5), SoftGroupWeigher(10.0))
