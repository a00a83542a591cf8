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


def heartbeat_data(virt: Virt, host: HostSettings) -> dict[str, Any]:
    cap = virt.capacity()
    host.storage_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(host.storage_dir)
    domains = {d["vm_id"] or d["uuid"]: d["state"] for d in virt.list_domains()}
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
