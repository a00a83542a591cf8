"""A host's view of its VMs' IP addresses, reported to the control plane when it changes.

Owns polling libvirt for the addresses of running virtfleet domains (the libvirt network's
DHCP leases, and the guest agent when one answers), at most every ``interval`` seconds, and
sending ``vm.addresses`` only when a VM's list differs from the last one sent (an empty
list once when a VM stops). Never connects to a guest address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet import contract as c
from worker.domain import instance_paths
from worker.virt import Virt, VirtError

log = logging.getLogger(__name__)

AGENT_RETRY = 60.0
"""Seconds before asking again a guest agent that did not answer."""


def _entries(found: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    out = []
    for a in found:
        ip = a.get("ip")
        if not ip or ip.startswith(("127.", "fe80:")) or ip == "::1":
            continue  # loopback and link-local say nothing about where the VM is
        out.append({"ip": ip, "prefix": a.get("prefix"), "source": source})
    return out


class AddressReporter:
    """Call :meth:`poll` often (the worker's inventory loop); it does the work at most every
    ``interval`` seconds."""

    def __init__(self, virt: Virt, emit: Callable[..., None], interval: float = 3.0,
                 storage_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.virt = virt
        self.storage_dir = storage_dir
        """When given, only VMs with an instance directory there are this host's (another
        worker may share the libvirt daemon, as test clusters do)."""
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self._last_poll: float | None = None
        self._sent: dict[str, list[dict[str, Any]]] = {}
        self._agent_quiet_until: dict[str, float] = {}

    def poll(self) -> None:
        now = self.clock()
        if self._last_poll is not None and now - self._last_poll < self.interval:
            return
        self._last_poll = now
        seen: set[str] = set()
        for dom in self.virt.list_domains():
            vm_id = dom.get("vm_id")
            if not vm_id or not str(dom.get("name", "")).startswith("vf-"):
                continue  # not a virtfleet VM
            if self.storage_dir is not None and not self._ours(vm_id):
                continue
            seen.add(vm_id)
            state = dom.get("state")
            if state in ("running", "blocked"):
                addresses = self._read(vm_id, now)
                if addresses is None:
                    continue
            elif state in ("shutoff", "crashed"):
                addresses = []
            else:
                continue  # paused for a snapshot, shutting down...: no news yet
            if addresses != self._sent.get(vm_id, []):
                self._sent[vm_id] = addresses
                self.emit(c.EV_ADDRESSES, vm_id=vm_id, addresses=addresses)
        for gone in set(self._sent) - seen:
            self._sent.pop(gone, None)
            self._agent_quiet_until.pop(gone, None)

    def _ours(self, vm_id: str) -> bool:
        try:
            return instance_paths(self.storage_dir or Path("."), vm_id).dir.is_dir()
        except ValueError:
            return False  # not a UUID

    def _read(self, vm_id: str, now: float) -> list[dict[str, Any]] | None:
        """The VM's addresses, leases first; None if libvirt could not say."""
        try:
            found = _entries(self.virt.interface_addresses(vm_id, "lease"), "lease")
        except VirtError as exc:
            log.debug("no leases for %s: %s", vm_id, exc)
            return None
        if now >= self._agent_quiet_until.get(vm_id, 0.0):
            try:
                for entry in _entries(self.virt.interface_addresses(vm_id, "agent"), "agent"):
                    if entry not in found:
                        found.append(entry)
            except VirtError:
                self._agent_quiet_until[vm_id] = now + AGENT_RETRY
            else:
                self._agent_quiet_until.pop(vm_id, None)
        return sorted(found, key=lambda a: (a["source"] != "lease", a["ip"]))
