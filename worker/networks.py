"""Fleet networks on a host: a :class:`~fleet.contract.NetworkSpec` turned into a libvirt
network and realised (defined, started, autostarted) the first time a build needs it.

Owns: the libvirt network XML of a fleet network (:func:`network_xml`, ElementTree only,
never string formatting), the bridge name a nat/isolated network gets on every host
(:func:`bridge_name`), reading an existing definition back (:func:`describe`), and
:func:`ensure_network`, which is idempotent, safe when two builds (in this worker or in
another process on the same libvirtd) race to create the same network, and refuses to use
an existing libvirt network of that name that says something else; and
:func:`remove_fleet_network`, which removes it once its fleet network is deleted, unless a
domain of the host still uses it.

The three modes:

- ``nat``: ``<forward mode='nat'/>``, a bridge of its own (``vfbr`` + a hash of the name),
  the gateway as the host's address with the cidr's netmask, libvirt's DHCP (dnsmasq) for
  ``dhcp_start``..``dhcp_end``, and ``spec.dns`` (but the gateway, dnsmasq itself) as
  dnsmasq's upstream forwarders (none: the host's own resolvers);
- ``isolated``: the same without ``<forward>`` (guests reach each other and the host only);
- ``bridge``: ``<forward mode='bridge'/>`` onto the existing host bridge ``spec.bridge``
  (addressing is the LAN's own).

Each fleet network's libvirt network has the fleet network's id as its UUID: a fleet network
deleted and made again under the same name is told apart from the earlier one, so a late
removal of the earlier one leaves the new one alone, and a build finding the earlier one's
definition (same name and addresses, unused) replaces it with its own.

Must not: talk to libvirt directly (only through :class:`worker.virt.Virt`), redefine or
remove a network that exists (a mismatch is an error for the operator to resolve; an earlier
fleet network's, unused, aside), or decide which network a VM uses (that is the build
payload's).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from fleet.contract import NetworkSpec, network_libvirt_name
from fleet.exceptions import BuildError
from fleet.scrub import scrub
from worker.virt import Virt, VirtError

log = logging.getLogger(__name__)

MODES = ("nat", "isolated", "bridge")
"""The fleet network modes a host can realise."""

BRIDGE_PREFIX = "vfbr"
"""Start of the Linux bridge name of a nat/isolated fleet network."""

IFNAMSIZ = 15
"""Longest Linux interface name (IFNAMSIZ - 1)."""

_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}\Z")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(name: str) -> threading.Lock:
    """One realisation of a given network at a time in this process."""
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def bridge_name(name: str) -> str:
    """The Linux bridge of fleet network ``name`` (nat/isolated): ``vfbr`` and 10 hex digits
    of the name's SHA-256 — 14 characters, the same on every host."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    return (BRIDGE_PREFIX + digest)[:IFNAMSIZ - 1]


def _check(spec: Mapping[str, Any]) -> None:
    """Raise ValueError when ``spec`` cannot be realised."""
    mode = spec.get("mode")
    if mode not in MODES:
        raise ValueError(f"unknown network mode {mode!r} (expected one of {', '.join(MODES)})")
    if not spec.get("name"):
        raise ValueError("a network needs a name")
    if mode == "bridge":
        if not _BRIDGE_RE.match(str(spec.get("bridge") or "")):
            raise ValueError(f"network mode bridge needs a host bridge name, "
                             f"got {spec.get('bridge')!r}")
        return
    net = ipaddress.ip_network(str(spec["cidr"]), strict=False)
    gateway = ipaddress.ip_address(str(spec["gateway"]))
    if gateway not in net:
        raise ValueError(f"gateway {gateway} is outside {net}")
    start, end = spec.get("dhcp_start") or "", spec.get("dhcp_end") or ""
    if bool(start) != bool(end):
        raise ValueError("a DHCP range needs both dhcp_start and dhcp_end")
    if start:
        first, last = ipaddress.ip_address(str(start)), ipaddress.ip_address(str(end))
        if first not in net or last not in net or first > last:
            raise ValueError(f"DHCP range {first}..{last} is not a range inside {net}")
    for server in spec.get("dns") or []:
        ipaddress.ip_address(str(server))


def network_xml(spec: NetworkSpec | Mapping[str, Any]) -> str:
    """The libvirt network XML that realises ``spec`` (raises ValueError for a bad spec)."""
    _check(spec)
    mode = str(spec["mode"])
    root = ET.Element("network")
    ET.SubElement(root, "name").text = network_libvirt_name(str(spec["name"]))
    if spec.get("uuid"):
        ET.SubElement(root, "uuid").text = str(uuid.UUID(str(spec["uuid"])))
    if mode == "bridge":
        ET.SubElement(root, "forward", mode="bridge")
        ET.SubElement(root, "bridge", name=str(spec["bridge"]))
    else:
        if mode == "nat":
            ET.SubElement(root, "forward", mode="nat")
        ET.SubElement(root, "bridge", name=bridge_name(str(spec["name"])), stp="on",
                      delay="0")
        # The gateway is this network's own dnsmasq (the default resolver of its guests): as a
        # forwarder dnsmasq would ignore it and, told not to read resolv.conf, have no upstream.
        gateway = ipaddress.ip_address(str(spec["gateway"]))
        servers = [str(s) for s in spec.get("dns") or []
                   if ipaddress.ip_address(str(s)) != gateway]
        if servers:
            dns = ET.SubElement(root, "dns")
            for server in servers:
                ET.SubElement(dns, "forwarder", addr=server)
        net = ipaddress.ip_network(str(spec["cidr"]), strict=False)
        if net.version == 4:
            ip = ET.SubElement(root, "ip", address=str(spec["gateway"]),
                               netmask=str(net.netmask))
        else:
            ip = ET.SubElement(root, "ip", family="ipv6", address=str(spec["gateway"]),
                               prefix=str(net.prefixlen))
        if spec.get("dhcp_start"):
            dhcp = ET.SubElement(ip, "dhcp")
            ET.SubElement(dhcp, "range", start=str(spec["dhcp_start"]),
                          end=str(spec["dhcp_end"]))
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def describe(xml: str) -> dict[str, Any]:
    """What an existing libvirt network definition says, in NetworkSpec terms:
    ``{mode, bridge, cidr, gateway, uuid}`` (mode is libvirt's forward mode when it is not
    one of ours, e.g. ``route``; cidr and gateway are those of its first address, or "")."""
    root = ET.fromstring(xml)
    forward = root.find("forward")
    mode = "isolated" if forward is None else (forward.get("mode") or "nat")
    bridge = root.find("bridge")
    out: dict[str, Any] = {"mode": mode,
                           "bridge": bridge.get("name", "") if bridge is not None else "",
                           "cidr": "", "gateway": "", "uuid": root.findtext("uuid") or ""}
    ip = root.find("ip")
    if ip is not None and ip.get("address"):
        mask = ip.get("netmask") or ip.get("prefix") or ("128" if ip.get("family") == "ipv6"
                                                         else "32")
        iface = ipaddress.ip_interface(f"{ip.get('address')}/{mask}")
        out["cidr"], out["gateway"] = str(iface.network), str(iface.ip)
    return out


def mismatch(spec: NetworkSpec | Mapping[str, Any], xml: str) -> str:
    """Why the existing libvirt network ``xml`` does not realise ``spec`` ("" if it does).
    Compared: the mode; for bridge the host bridge, else the cidr and the gateway."""
    have = describe(xml)
    mode = str(spec["mode"])
    if have["mode"] != mode:
        return f"its mode is {have['mode']}, not {mode}"
    if mode == "bridge":
        if have["bridge"] != spec["bridge"]:
            return f"it bridges to {have['bridge'] or 'nothing'}, not {spec['bridge']}"
        return ""
    want = str(ipaddress.ip_network(str(spec["cidr"]), strict=False))
    if have["cidr"] != want:
        return f"its cidr is {have['cidr'] or 'unset'}, not {want}"
    if have["gateway"] != str(ipaddress.ip_address(str(spec["gateway"]))):
        return f"its gateway is {have['gateway']}, not {spec['gateway']}"
    return ""


def ensure_network(virt: Virt, spec: NetworkSpec | Mapping[str, Any]) -> str:
    """Make fleet network ``spec`` exist and run on this host; return its libvirt name.

    Defines it (persistent), starts it and marks it autostart the first time; afterwards
    only checks it. When another build defines it first, its definition is used. An
    existing network of that name that says something else (another mode, cidr, gateway or
    bridge) is never redefined: that raises BuildError at step ``define``.
    """
    name = network_libvirt_name(str(spec.get("name") or ""))
    try:
        want = network_xml(spec)
    except (KeyError, ValueError) as exc:
        raise BuildError("define", f"define failed: network {spec.get('name')!r} "
                                   f"cannot be realised: {exc}") from None
    try:
        with _lock(name):
            have = virt.network_xml(name)
            if have is None and not virt.define_network(want):
                have = virt.network_xml(name)  # another process defined it first
                if have is None:
                    raise BuildError("define", f"define failed: libvirt network {name} "
                                               "was removed while it was being defined")
            if have is not None:
                why = mismatch(spec, have)
                if why:
                    raise BuildError(
                        "define", f"define failed: libvirt network {name} on this host does "
                                  f"not match fleet network {spec['name']}: {why} (it is not "
                                  "redefined; remove or rename it on the host)")
                if _earlier(spec, have) and not virt.domains_on_network(name):
                    # An earlier fleet network of this name, deleted, its removal not here
                    # yet: ours replaces it, so that removal, when it comes, finds another
                    # UUID and leaves ours alone.
                    log.info("libvirt network %s of an earlier fleet network %s is replaced",
                             name, spec["name"])
                    virt.remove_network(name)
                    if not virt.define_network(want):
                        raise BuildError("define", f"define failed: libvirt network {name} "
                                                   "was defined again while it was replaced")
            if virt.ensure_network_active(name):
                log.info("libvirt network %s (fleet network %s, %s) is defined and active",
                         name, spec["name"], spec["mode"])
    except VirtError as exc:
        raise BuildError("define", f"define failed: {scrub(str(exc))}") from exc
    return name


def _earlier(spec: NetworkSpec | Mapping[str, Any], xml: str) -> bool:
    """`xml` defines the libvirt network of another fleet network of that name (its UUID is
    not the spec's). Unknown (no UUID in the spec) counts as the same."""
    want = str(spec.get("uuid") or "")
    return bool(want) and describe(xml)["uuid"] != str(uuid.UUID(want))


def remove_fleet_network(virt: Virt, fleet_name: str, network_id: str = "") -> str:
    """Remove this host's libvirt network of a deleted fleet network, unless one of the
    host's domains still has an interface on it (then it is kept and said so), or it is
    another fleet network's: `network_id` (the deleted one's id, its UUID) given and the
    libvirt network's UUID another (a fleet network of the same name made since). Returns
    what happened: ``removed``, ``absent``, ``kept: used by <domains>`` or ``kept: a later
    fleet network``."""
    name = network_libvirt_name(fleet_name)
    try:
        with _lock(name):
            have = virt.network_xml(name)
            if have is None:
                return "absent"
            if network_id and _earlier({"uuid": network_id}, have):
                log.info("libvirt network %s is kept: it realises a later fleet network %s",
                         name, fleet_name)
                return "kept: a later fleet network"
            users = virt.domains_on_network(name)
            if users:
                log.warning("libvirt network %s (deleted fleet network %s) is kept: domains "
                            "%s still use it", name, fleet_name, ", ".join(users))
                return "kept: used by " + ", ".join(users)
            virt.remove_network(name)
    except VirtError as exc:
        log.warning("libvirt network %s could not be removed: %s", name, exc)
        return f"failed: {scrub(str(exc))}"
    log.info("libvirt network %s (deleted fleet network %s) removed", name, fleet_name)
    return "removed"
