"""What a host tells the control plane every few seconds: capacity, load, cache, domains.

Owns gathering the heartbeat; sending is the caller's (worker.service) through the contract.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from worker import cache
from worker.domain import HostSettings
from worker.virt import Virt

GIB = 1024**3


def domain_states(virt: Virt) -> dict[str, str]:
    """VM id (or domain UUID) -> state of every domain. Can block for seconds while libvirt
    destroys a domain, so it runs apart from the beat (see worker.service)."""
    return {d["vm_id"] or d["uuid"]: d["state"] for d in virt.list_domains()}


def heartbeat_data(virt: Virt, host: HostSettings,
                   domains: dict[str, str]) -> dict[str, Any]:
    """The beat: capacity (a node call that never waits on a domain), disk, cache, and the
    last known domain states."""
    cap = virt.capacity()
    host.storage_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(host.storage_dir)
    return {
        "arch": host.arch,
        "virt_type": host.virt_type,
        "vcpus": int(cap["vcpus"]),
        "memory_mb": int(cap["memory_mb"]),
        "disk_gb": disk.total // GIB,
        "disk_free_gb": disk.free // GIB,
        "load": os.getloadavg()[0],
        "cached_images": cache.cached(host.storage_dir),
        "domains": domains,
    }
