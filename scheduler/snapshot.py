"""What placement reasons about: a host as it was at one moment, and what one VM asks for.

Plain frozen dataclasses, no store access; claims.py builds them from rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class HostSnapshot:
    """What placement knows of one host at one moment (`generation` guards the claim)."""

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
    labels: Mapping[str, str] = field(default_factory=dict)
    cached_images: frozenset[str] = frozenset()
    max_vms: int | None = None
    vm_count: int = 0
    builds: int = 0

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
    """What one VM needs, and the rules it brings (labels, server group)."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    arch: str = "x86_64"
    virt_type: str = ""
    image_sha256: str = ""
    constraints: Mapping[str, str] = field(default_factory=dict)
    group_policy: str | None = None
    group_hard: bool = True
    group_hosts: Mapping[str, int] = field(default_factory=dict)
    """Hosts already holding members of the VM's server group, with how many."""
