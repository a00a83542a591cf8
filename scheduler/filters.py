"""Placement filters, nova style: one small class per reason a host cannot take a VM.

Each filter answers `host_passes(host, req)` and, for explanations and logs, `why(host, req)`:
those two define what a filter means. A filter may also offer `mask(table, req)`, the same
answer for every host of a HostTable at once as a numpy bool array; `rank` uses it for speed
and falls back to `host_passes` per host for a filter without one. The two must agree (the
randomized tests in tests/unit/test_filters_weighers.py hold them to it).
Pure: they read the snapshots and the request they are given, nothing else.
"""

from __future__ import annotations

import numpy as np

from scheduler.snapshot import HostSnapshot, HostTable, Request


class Filter:
    """One reason a host may not take a VM.

    Optional: `mask(self, table: HostTable, req: Request) -> np.ndarray` (bool per host).
    """

    name = "filter"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        raise NotImplementedError

    def why(self, host: HostSnapshot, req: Request) -> str:
        return f"{host.name} fails {self.name}"


class AliveFilter(Filter):
    name = "alive"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.alive

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        return table.alive

    def why(self, host: HostSnapshot, req: Request) -> str:
        return "missed its heartbeats"


class EnabledFilter(Filter):
    name = "enabled"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.enabled and not host.maintenance

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        return table.enabled & ~table.maintenance

    def why(self, host: HostSnapshot, req: Request) -> str:
        return "in maintenance" if host.maintenance else "disabled by an admin"


class ArchFilter(Filter):
    """CPU architecture and, when the request names one, virt type (kvm/qemu)."""

    name = "arch"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.arch == req.arch and (not req.virt_type or host.virt_type == req.virt_type)

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        ok = table.code_mask("arch", req.arch)
        return ok & table.code_mask("virt_type", req.virt_type) if req.virt_type else ok

    def why(self, host: HostSnapshot, req: Request) -> str:
        return f"is {host.arch}/{host.virt_type}, wanted {req.arch}/{req.virt_type or 'any'}"


class ResourceFilter(Filter):
    """Free vCPU, RAM and disk after the host's allocation ratios."""

    name = "resources"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return (host.free_vcpus >= req.vcpus and host.free_memory_mb >= req.memory_mb
                and host.free_disk_gb >= req.disk_gb)

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        return ((table.free_vcpus >= req.vcpus) & (table.free_memory_mb >= req.memory_mb)
                & (table.free_disk_gb >= req.disk_gb))

    def why(self, host: HostSnapshot, req: Request) -> str:
        return (f"free vcpus {host.free_vcpus:g}/{req.vcpus}, memory_mb "
                f"{host.free_memory_mb:g}/{req.memory_mb}, disk_gb {host.free_disk_gb:g}/"
                f"{req.disk_gb}")


class LabelFilter(Filter):
    """Labels the request requires (`constraints`, e.g. zone=rack1)."""

    name = "labels"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return all(host.labels.get(k) == v for k, v in req.constraints.items())

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        return table.label_mask(req.constraints)

    def why(self, host: HostSnapshot, req: Request) -> str:
        missing = {k: v for k, v in req.constraints.items() if host.labels.get(k) != v}
        return f"lacks labels {missing}"


class MaxVMsFilter(Filter):
    name = "max_vms"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.max_vms is None or host.vm_count < host.max_vms

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        return table.vm_count < table.max_vms  # max_vms None is +inf in the table

    def why(self, host: HostSnapshot, req: Request) -> str:
        return f"already runs {host.vm_count} of at most {host.max_vms} VMs"


class ServerGroupFilter(Filter):
    """Hard affinity: only hosts already holding the group (any host for the first member).
    Hard anti-affinity: never a host holding a member."""

    name = "server_group"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        if not req.group_hard or req.group_policy is None:
            return True
        if req.group_policy == "anti-affinity":
            return host.name not in req.group_hosts
        return not req.group_hosts or host.name in req.group_hosts

    def mask(self, table: HostTable, req: Request) -> np.ndarray:
        if not req.group_hard or req.group_policy is None:
            return np.ones(len(table), dtype=bool)
        if req.group_policy == "anti-affinity":
            return ~table.name_mask(req.group_hosts)
        if not req.group_hosts:
            return np.ones(len(table), dtype=bool)
        return table.name_mask(req.group_hosts)

    def why(self, host: HostSnapshot, req: Request) -> str:
        if req.group_policy == "anti-affinity":
            return "already holds a member of the anti-affinity group"
        return "does not hold the affinity group's members"


DEFAULT_FILTERS: tuple[Filter, ...] = (AliveFilter(), EnabledFilter(), ArchFilter(),
                                       ResourceFilter(), LabelFilter(), MaxVMsFilter(),
                                       ServerGroupFilter())
"""The filters in the order they run: cheap and decisive first."""
