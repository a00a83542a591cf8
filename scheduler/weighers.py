"""Placement weighers, nova style: each returns one raw number per host; `rank` normalises
them to 0..1 across the candidates and multiplies by the weigher's multiplier.

A negative multiplier inverts a preference: `free_ram` with -1.0 packs instead of spreading.
`weigh(host, req)` defines a weigher; it may also offer `weigh_all(table, req)`, the raw number
of every host of a HostTable as a float64 array, which `rank` uses for speed (falling back to
`weigh` per host for a weigher without one). The two must agree exactly.
"""

from __future__ import annotations

import numpy as np

from scheduler.snapshot import HostSnapshot, HostTable, Request


class Weigher:
    """One preference among hosts that can all take the VM.

    Optional: `weigh_all(self, table: HostTable, req: Request) -> np.ndarray` (float64 per host).
    """

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

    def weigh_all(self, table: HostTable, req: Request) -> np.ndarray:
        return table.free_memory_mb


class FreeVcpuWeigher(Weigher):
    name = "free_vcpus"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return host.free_vcpus

    def weigh_all(self, table: HostTable, req: Request) -> np.ndarray:
        return table.free_vcpus


class ImageCachedWeigher(Weigher):
    """A host that already has the base image starts the VM without a download."""

    name = "image_cached"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return 1.0 if req.image_sha256 and req.image_sha256 in host.cached_images else 0.0

    def weigh_all(self, table: HostTable, req: Request) -> np.ndarray:
        if not req.image_sha256:
            return np.zeros(len(table), dtype=np.float64)
        return table.image_mask(req.image_sha256).astype(np.float64)


class FewestBuildsWeigher(Weigher):
    """Fewer builds in progress weighs more (a busy host builds slower)."""

    name = "fewest_builds"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        return -float(host.builds)

    def weigh_all(self, table: HostTable, req: Request) -> np.ndarray:
        return -table.builds


class SoftGroupWeigher(Weigher):
    """Soft affinity prefers hosts holding the group's members; soft anti-affinity avoids
    them (the more members on a host, the stronger)."""

    name = "soft_group"

    def weigh(self, host: HostSnapshot, req: Request) -> float:
        if req.group_hard or req.group_policy is None:
            return 0.0
        members = float(req.group_hosts.get(host.name, 0))
        return members if req.group_policy == "affinity" else -members

    def weigh_all(self, table: HostTable, req: Request) -> np.ndarray:
        if req.group_hard or req.group_policy is None:
            return np.zeros(len(table), dtype=np.float64)
        members = table.name_values(req.group_hosts)
        return members if req.group_policy == "affinity" else -members


def default_weighers(policy: str = "spread") -> tuple[Weigher, ...]:
    """The weighers for a placement policy: `spread` (default) or `pack`."""
    ram = 1.0 if policy == "spread" else -1.0
    return (FreeRamWeigher(ram), FreeVcpuWeigher(ram * 0.5), ImageCachedWeigher(0.5),
            FewestBuildsWeigher(0.5), SoftGroupWeigher(10.0))
