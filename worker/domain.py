"""The libvirt domain XML model and the designer that fills it.

Owns: :class:`DomainConfig` and its XML form (:func:`to_xml` / :func:`from_xml`, built
with ElementTree only — never by string formatting), and the designer
(:func:`design`, :func:`instance_paths`) that turns a build payload and this host's
settings into a config and decides where an instance's files live.

Must not: talk to libvirt or run programs; the XML functions carry no policy (they
render what the config says), and the designer decides everything that goes in.
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.contract import network_libvirt_name

NS = "https://virtfleet.dev/xmlns/domain/1"
"""XML namespace of virtfleet's entry in a domain's ``<metadata>``."""

NS_PREFIX = "virtfleet"
"""The prefix :data:`NS` is written with."""

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
"""virtio-serial port name the QEMU guest agent listens on."""

KIB_PER_MIB = 1024

ET.register_namespace(NS_PREFIX, NS)

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class NetworkAttachment:
    """One NIC: a libvirt network (``kind='network'``) or a host bridge (``'bridge'``)."""

    kind: str
    source: str
    mac: str | None = None
    model: str = "virtio"


@dataclass(frozen=True)
class DomainConfig:
    """Everything a virtfleet domain's XML says, and nothing more."""

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    disk_path: str
    console_log: str
    virt_type: str = "qemu"
    arch: str = "x86_64"
    machine: str = "pc"
    emulator: str | None = None
    disk_format: str = "qcow2"
    seed_path: str | None = None
    network: NetworkAttachment | None = None
    guest_agent: bool = True
    cpu_mode: str | None = None
    description: str | None = None
    vm_id: str | None = None
    project: str | None = None


# --------------------------------------------------------------------------- XML


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _file_disk(
    devices: ET.Element, device: str, fmt: str, path: str, dev: str, bus: str
) -> ET.Element:
    disk = _sub(devices, "disk", type="file", device=device)
    if device == "disk":
        _sub(disk, "driver", name="qemu", type=fmt, discard="unmap")
    else:
        _sub(disk, "driver", name="qemu", type=fmt)
    _sub(disk, "source", file=path)
    _sub(disk, "target", dev=dev, bus=bus)
    return disk


def to_xml(cfg: DomainConfig) -> str:
    """Render ``cfg`` as libvirt domain XML (indented, ending in a newline)."""
    root = ET.Element("domain", type=cfg.virt_type)
    _sub(root, "name", cfg.name)
    _sub(root, "uuid", cfg.uuid)
    if cfg.description is not None:
        _sub(root, "description", cfg.description)
    if cfg.vm_id is not None or cfg.project is not None:
        inst = _sub(_sub(root, "metadata"), f"{{{NS}}}instance")
        if cfg.vm_id is not None:
            _sub(inst, f"{{{NS}}}id", cfg.vm_id)
        if cfg.project is not None:
            _sub(inst, f"{{{NS}}}project", cfg.project)
    kib = str(cfg.memory_mib * KIB_PER_MIB)
    _sub(root, "memory", kib, unit="KiB")
    _sub(root, "currentMemory", kib, unit="KiB")
    _sub(root, "vcpu", str(cfg.vcpus), placement="static")

    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch=cfg.arch, machine=cfg.machine)
    _sub(os_el, "boot", dev="hd")
    features = _sub(root, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if cfg.cpu_mode is not None:
        _sub(root, "cpu", mode=cfg.cpu_mode)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    _sub(root, "on_crash", "destroy")

    devices = _sub(root, "devices")
    if cfg.emulator is not None:
        _sub(devices, "emulator", cfg.emulator)
    _file_disk(devices, "disk", cfg.disk_format, cfg.disk_path, "vda", "virtio")
    if cfg.seed_path is not None:
        cdrom = _file_disk(devices, "cdrom", "raw", cfg.seed_path, "sda", "scsi")
        _sub(cdrom, "readonly")
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    if cfg.network is not None:
        net = cfg.network
        iface = _sub(devices, "interface", type=net.kind)
        if net.mac is not None:
            _sub(iface, "mac", address=net.mac)
        _sub(iface, "source", **{net.kind: net.source})
        _sub(iface, "model", type=net.model)
    serial = _sub(devices, "serial", type="pty")
    if cfg.console_log:
        _sub(serial, "log", file=cfg.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    if cfg.guest_agent:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    _sub(devices, "memballoon", model="virtio")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _text(root: ET.Element, path: str) -> str | None:
    el = root.find(path)
    return el.text.strip() if el is not None and el.text is not None else None


def _required(root: ET.Element, path: str) -> str:
    value = _text(root, path)
    if value is None:
        raise ValueError(f"domain XML lacks <{path}>")
    return value


def _memory_mib(el: ET.Element | None) -> int:
    if el is None or el.text is None:
        raise ValueError("domain XML lacks <memory>")
    units = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2,
             "g": 1024**3, "gib": 1024**3}
    factor = units.get(el.get("unit", "KiB").lower())
    if factor is None:
        raise ValueError(f"unsupported memory unit {el.get('unit')!r}")
    return int(el.text) * factor // 1024**2


def _network(devices: ET.Element) -> NetworkAttachment | None:
    for iface in devices.findall("interface"):
        kind = iface.get("type")
        source = iface.find("source")
        if kind not in ("network", "bridge") or source is None:
            continue
        mac = iface.find("mac")
        model = iface.find("model")
        return NetworkAttachment(
            kind=kind,
            source=source.get(kind, ""),
            mac=mac.get("address") if mac is not None else None,
            model=model.get("type", "virtio") if model is not None else "virtio",
        )
    return None


def from_xml(xml: str) -> DomainConfig:
    """Parse domain XML (ours, or libvirt's dump of it) back into a :class:`DomainConfig`."""
    root = ET.fromstring(xml)
    if root.tag != "domain":
        raise ValueError("not a libvirt domain XML document")
    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    disk_path, disk_format, seed_path = "", "qcow2", None
    for disk in devices.findall("disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        path = source.get("file") if source is not None else None
        if disk.get("device", "disk") == "disk" and not disk_path and path:
            disk_path = path
            disk_format = driver.get("type", "qcow2") if driver is not None else "qcow2"
        elif disk.get("device") == "cdrom" and seed_path is None and path:
            seed_path = path
    log = devices.find("serial/log")
    os_type = root.find("os/type")
    cpu = root.find("cpu")
    agent = any(
        t.get("name") == GUEST_AGENT_CHANNEL for t in devices.findall("channel/target")
    )
    return DomainConfig(
        name=_required(root, "name"),
        uuid=_required(root, "uuid"),
        vcpus=int(_required(root, "vcpu")),
        memory_mib=_memory_mib(root.find("memory")),
        disk_path=disk_path,
        console_log=log.get("file", "") if log is not None else "",
        virt_type=root.get("type", "qemu"),
        arch=os_type.get("arch", "x86_64") if os_type is not None else "x86_64",
        machine=os_type.get("machine", "pc") if os_type is not None else "pc",
        emulator=_text(devices, "emulator"),
        disk_format=disk_format,
        seed_path=seed_path,
        network=_network(devices),
        guest_agent=agent,
        cpu_mode=cpu.get("mode") if cpu is not None else None,
        description=_text(root, "description"),
        vm_id=_text(root, f"metadata/{{{NS}}}instance/{{{NS}}}id"),
        project=_text(root, f"metadata/{{{NS}}}instance/{{{NS}}}project"),
    )


# ---------------------------------------------------------------------- designer


@dataclass(frozen=True)
class HostSettings:
    """What this host contributes to every domain it defines."""

    virt_type: str
    arch: str
    machine: str
    emulator: str | None
    network_kind: str | None
    network_source: str | None
    storage_dir: Path


@dataclass(frozen=True)
class InstancePaths:
    """Where one instance's files live on its host."""

    dir: Path
    disk: Path
    seed: Path
    console: Path
    ready: Path
    """Where the readiness watcher keeps what it knows of the current boot (worker.readiness)."""


def instance_paths(storage_dir: Path, vm_id: str) -> InstancePaths:
    """Return the paths of instance ``vm_id`` under ``storage_dir``.

    ``vm_id`` must be a UUID (it becomes a directory name); it is normalised to the
    canonical lower-case form so one VM never gets two directories.
    """
    canonical = str(uuidlib.UUID(str(vm_id)))
    base = Path(storage_dir) / "instances" / canonical
    return InstancePaths(
        dir=base,
        disk=base / "disk.qcow2",
        seed=base / "seed.iso",
        console=base / "console.log",
        ready=base / "ready.json",
    )


def domain_name(name: str, vm_id: str) -> str:
    """Return the libvirt domain name ``vf-<name>-<first 8 chars of the VM id>``."""
    safe = _NAME_BAD.sub("-", name).strip("-") or "vm"
    return f"vf-{safe}-{str(uuidlib.UUID(str(vm_id)))[:8]}"


def _mac(value: Any) -> str | None:
    if value in (None, ""):
        return None
    mac = str(value).lower()
    if not _MAC_RE.match(mac):
        raise ValueError(f"invalid MAC address {value!r}")
    return mac


def design(vm: Mapping[str, Any], host: HostSettings) -> DomainConfig:
    """Decide the domain for build payload ``vm`` on ``host``.

    ``vm`` carries ``id`` (UUID, also the domain UUID), ``name``, ``project``,
    ``vcpus``, ``memory_mb`` and optionally ``mac`` and ``network`` (a NetworkSpec: the NIC
    joins that fleet network's libvirt network; without one, the host's default).
    """
    vm_id = str(uuidlib.UUID(str(vm["id"])))
    paths = instance_paths(host.storage_dir, vm_id)
    vcpus, memory = int(vm["vcpus"]), int(vm["memory_mb"])
    if vcpus < 1 or memory < 1:
        raise ValueError("vcpus and memory_mb must be positive")
    network = None
    fleet_net = vm.get("network")
    if fleet_net:
        # A fleet network: its libvirt network (realised by worker.networks) instead of
        # the host's default.
        network = NetworkAttachment("network", network_libvirt_name(str(fleet_net["name"])),
                                    _mac(vm.get("mac")))
    elif host.network_kind is not None:
        if host.network_kind not in ("network", "bridge") or not host.network_source:
            raise ValueError("network_kind must be 'network' or 'bridge' with a source")
        network = NetworkAttachment(host.network_kind, host.network_source, _mac(vm.get("mac")))
    project = vm.get("project")
    return DomainConfig(
        name=domain_name(str(vm["name"]), vm_id),
        uuid=vm_id,
        vcpus=vcpus,
        memory_mib=memory,
        disk_path=str(paths.disk),
        console_log=str(paths.console),
        virt_type=host.virt_type,
        arch=host.arch,
        machine=host.machine,
        emulator=host.emulator,
        seed_path=str(paths.seed),
        network=network,
        # host-passthrough needs hardware virtualization; TCG keeps QEMU's default model.
        cpu_mode="host-passthrough" if host.virt_type == "kvm" else None,
        description=f"virtfleet VM {vm['name']}",
        vm_id=vm_id,
        project=str(project) if project is not None else None,
    )
