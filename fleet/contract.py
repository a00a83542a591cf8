"""The message contract between control plane and hosts: task names, queues, payloads.

Everything a host needs travels in a build/delete message; everything a host learns comes
back as an event on the control queue. Payloads are plain JSON-able dicts, described here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, TypedDict

CONTROL_QUEUE = "control"
"""The queue the scheduler service consumes: events from hosts and control-plane jobs."""

TASK_BUILD_VM = "virtfleet.worker.build_vm"
"""Build a VM on the host that owns the queue; payload: BuildPayload."""

TASK_DELETE_VM = "virtfleet.worker.delete_vm"
"""Destroy and remove a VM; payload: DeletePayload."""

TASK_CONSOLE_LOG = "virtfleet.worker.console_log"
"""RPC: return the tail of a VM's serial console log."""

TASK_CONSOLE_INFO = "virtfleet.worker.console_info"
"""RPC: {"url": the host's console server URL ("" if it has none), "state": the domain's
state or None}; asked before the web signs a console token (see fleet.consoletoken)."""

TASK_VM_ACTION = "virtfleet.worker.vm_action"
"""Act on an existing VM (start, stop, reboot, force_off, resize, snapshot_create,
snapshot_revert, snapshot_delete, rebuild); payload: ActionPayload. Idempotent, acks_late."""

TASK_PREWARM_IMAGE = "virtfleet.worker.prewarm_image"
"""Bring a base image into the host's cache ahead of builds; payload: {"image": ImageRef}."""

TASK_REMOVE_NETWORK = "virtfleet.worker.remove_network"
"""A fleet network was deleted: the host removes its libvirt network `vf-<name>` unless a
domain of the host still uses it; payload: {name}. Idempotent."""
TASK_INSPECT_IMAGE = "virtfleet.scheduler.inspect_image"
"""Control plane: inspect (and convert) an imported image file; payload: {"image_id": id}."""

TASK_EVENT = "virtfleet.scheduler.event"
"""An event from a host (or the control plane) for the scheduler to apply; payload: Event."""

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
"""Allow-list for every name a user gives (VMs, images, hosts, projects). It ends in the
end-of-string anchor, not `$`, which also matches before a trailing newline."""

# Event types. One vocabulary everywhere: API, page, events.
EV_HEARTBEAT = "host.heartbeat"
EV_BUILD_STEP = "vm.build.step"
EV_BUILD_DONE = "vm.build.done"
EV_BUILD_FAILED = "vm.build.failed"
EV_DELETED = "vm.deleted"
EV_DELETE_FAILED = "vm.delete.failed"
EV_LIFECYCLE = "vm.lifecycle"
EV_STATE = "vm.state"
EV_ACTION_DONE = "vm.action.done"
EV_ACTION_FAILED = "vm.action.failed"
EV_ADDRESSES = "vm.addresses"
EV_IMAGE_CACHED = "image.cached"
"""A host has an image's base in its cache (after a prewarm); data: image_id, sha256."""
EV_IMAGE_CACHE_FAILED = "image.cache.failed"
"""A host could not bring an image into its cache; data: image_id, sha256, reason."""
EV_IMAGE_ACTIVE = "image.active"
"""The control plane finished importing an image (inspected, converted): VMs may use it."""
EV_IMAGE_ERROR = "image.error"
"""An image import was refused or failed; data: image_id, reason."""
EV_VM_READY = "vm.ready"
"""cloud-init finished its first boot in the guest without errors (the worker saw
READY_MARKER on the serial console); data: boot_seconds (domain start -> marker), result
(cloud-init's result.json "v1" object as the guest printed it)."""
EV_GUEST_FAILED = "vm.guest.failed"
"""cloud-init finished in the guest with errors; data: reason (the guest's own messages,
joined), result (as for EV_VM_READY)."""
EV_READY_TIMEOUT = "vm.ready.timeout"
"""No ready line came within `ready_timeout` seconds of the domain's start: the host stopped
watching the console. The VM stays `running`; data: seconds (the timeout)."""
READY_MARKER = "virtfleet-ready: "
"""Start of the one line the ready part of the user-data prints on the serial console when
cloud-init has finished, followed by one line of JSON: the contents of cloud-init's
/run/cloud-init/result.json (``{"v1": {"datasource": ..., "errors": [...]}}``)."""
EV_HOST_DOWN = "host.down"
EV_HOST_UP = "host.up"

VM_STATES = ("pending", "building", "running", "ready", "stopping", "stopped", "rebooting",
             "resizing", "snapshotting", "deleting", "error", "unknown")

BUILD_STEPS = ("image", "overlay", "seed", "define", "start")
"""The build steps, in order; a failed build names the step that failed."""


def host_queue(host_name: str) -> str:
    """The queue a host's worker consumes."""
    return f"host.{host_name}"


class ImageRef(TypedDict):
    id: str
    sha256: str
    disk_format: str
    size_bytes: int
    url: str


class NetworkSpec(TypedDict):
    """A fleet network as a host needs it to realise (define and start) it in libvirt."""

    name: str        # the fleet network's name (NAME_RE); libvirt's is network_libvirt_name()
    mode: str        # "nat" | "isolated" | "bridge"
    bridge: str      # mode "bridge": the existing host bridge to attach to; else ""
    cidr: str        # e.g. "10.77.0.0/24"
    gateway: str     # e.g. "10.77.0.1" (the host side for nat/isolated)
    dns: list[str]   # resolvers handed to guests
    dhcp_start: str  # libvirt's DHCP range for nat/isolated ("" for bridge: the LAN's own)
    dhcp_end: str
    uuid: str        # the fleet network's id, its libvirt network's UUID on every host: tells
    #                  it apart from an earlier, deleted fleet network of the same name


def network_libvirt_name(name: str) -> str:
    """The libvirt network that realises fleet network `name` on every host."""
    return f"vf-{name}"


class BuildPayload(TypedDict):
    # vm: id, name, project, vcpus, memory_mb, disk_gb, hostname, mac, and
    #   user_data: the final user-data for the seed (the control plane's MIME multipart of the
    #              user's own content plus virtfleet's parts, see fleet.userdata),
    #   network_config: the seed's network-config (v2 YAML) or "" for DHCP on the VM's MAC,
    #   network: a NetworkSpec to attach to (realised on the host when first needed), or None
    #            for the host's default network.
    vm: dict[str, Any]
    image: ImageRef
    job_id: str
    attempt: int


class ActionPayload(TypedDict):
    vm_id: str
    job_id: str
    action: str
    args: dict[str, Any]  # e.g. {"vcpus": 2, "memory_mb": 512, "disk_gb": 4}, {"name": "s1"}


class DeletePayload(TypedDict):
    vm_id: str
    job_id: str


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def make_event(type_: str, *, host: str = "", vm_id: str = "", job_id: str = "",
               **data: Any) -> dict[str, Any]:
    """An event as it travels: type, timestamp, origin and free-form data."""
    return {"type": type_, "ts": now_iso(), "host": host, "vm_id": vm_id, "job_id": job_id,
            "data": data}
