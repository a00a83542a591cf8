"""Placement filters, nova style: one small class per reason a host cannot take a VM.

Each filter answers `host_passes(host, req)` and, for explanations and logs, `why(host, req)`.
Pure: they read the snapshots and the request they are given, nothing else.
"""

from __future__ import annotations

from scheduler.snapshot import HostSnapshot, Request


class Filter:
    """One reason a host may not take a VM."""

    name = "filter"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        raise NotImplementedError

    def why(self, host: HostSnapshot, req: Request) -> str:
        return f"{host.name} fails {self.name}"


class AliveFilter(Filter):
    name = "alive"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.alive

    def why(self, host: HostSnapshot, req: Request) -> str:
        return "missed its heartbeats"


class EnabledFilter(Filter):
    name = "enabled"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.enabled and not host.maintenance

    def why(self, host: HostSnapshot, req: Request) -> str:
        return "in maintenance" if host.maintenance else "disabled by an admin"


class ArchFilter(Filter):
    """CPU architecture and, when the request names one, virt type (kvm/qemu)."""

    name = "arch"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.arch == req.arch and (not req.virt_type or host.virt_type == req.virt_type)

    def why(self, host: HostSnapshot, req: Request) -> str:
        return f"is {host.arch}/{host.virt_type}, wanted {req.arch}/{req.virt_type or 'any'}"


class ResourceFilter(Filter):
    """Free vCPU, RAM and disk after the host's allocation ratios."""

    name = "resources"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return (host.free_vcpus >= req.vcpus and host.free_memory_mb >= req.memory_mb
                and host.free_disk_gb >= req.disk_gb)

    def why(self, host: HostSnapshot, req: Request) -> str:
        return (f"free vcpus {host.free_vcpus:g}/{req.vcpus}, memory_mb "
                f"{host.free_memory_mb:g}/{req.memory_mb}, disk_gb {host.free_disk_gb:g}/"
                f"{req.disk_gb}")


class LabelFilter(Filter):
    """Labels the request requires (`constraints`, e.g. zone=rack1)."""

    name = "labels"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return all(host.labels.get(k) == v for k, v in req.constraints.items())

    def why(self, host: HostSnapshot, req: Request) -> str:
        missing = {k: v for k, v in req.constraints.items() if host.labels.get(k) != v}
        return f"lacks labels {missing}"


class MaxVMsFilter(Filter):
    name = "max_vms"

    def host_passes(self, host: HostSnapshot, req: Request) -> bool:
        return host.max_vms is None or host.vm_count < host.max_vms

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

    def why(self, host: HostSnapshot, req: Request) -> str:
        if req.group_policy == "anti-affinity":
            return "already holds a member of the anti-affinity group"
        return "does not hold the affinity group's members"


DEFAULT_FILTERS: tuple[Filter, ...] = (AliveFilter(), EnabledFilter(), ArchFilter(),
                                       ResourceFilter(), LabelFilter(), MaxVMsFilter(),
                                       ServerGroupFilter())
"""The filters in the order they run: cheap and decisive first."""
