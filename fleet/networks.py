"""Fleet networks as plain values: what a definition may say, its address pools, and what a
guest is told about them.

Owns the rules of a network definition (mode, IPv4 cidr of prefix MIN_PREFIX..MAX_PREFIX,
gateway inside it, DNS servers, host bridge name for mode `bridge`, DHCP range), the split
of its usable addresses into the DHCP range and the static pool, the NetworkSpec a host
realises, and the cloud-init network-config (v2) of a VM's NIC.

Layout of a network's usable addresses (network and broadcast addresses excluded):
the gateway; the DHCP range (by default the upper half of the cidr for `nat`/`isolated`,
served by libvirt's dnsmasq on each host; for `bridge` the LAN's own DHCP range when given,
else none); the static pool: every other usable address, handed out by scheduler.ipam.

Pure: no store, no I/O. Must not: decide which VM gets which address (scheduler.ipam does).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from fleet.contract import NetworkSpec
from fleet.exceptions import BadRequest

MODES = ("nat", "isolated", "bridge")
"""nat: libvirt NAT network per host; isolated: a libvirt network without a way out;
bridge: an existing host bridge onto the LAN."""

MIN_PREFIX = 16
MAX_PREFIX = 29
"""Prefix lengths accepted: from a /16 (65,534 addresses) down to a /29 (6)."""

MAX_DNS = 3
"""Resolvers a guest can use (resolv.conf reads three)."""

BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
"""Allow-list for a host bridge's name: a Linux interface name (at most 15 characters)."""

Range = tuple[int, int]
"""An inclusive range of IPv4 addresses as integers."""


@dataclass(frozen=True)
class Definition:
    """A network definition, checked and completed with its defaults."""

    mode: str
    cidr: str
    gateway: str
    dns: list[str] = field(default_factory=list)
    bridge: str = ""
    dhcp_start: str = ""
    dhcp_end: str = ""


def _bad(where: str, message: str) -> BadRequest:
    return BadRequest(f"{where}: {message}", {where: [message]})


def _address(where: str, value: Any) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise _bad(where, "must be an IPv4 address")
    try:
        return ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise _bad(where, f"'{value[:64]}' is not an IPv4 address") from None


def parse_cidr(value: Any) -> ipaddress.IPv4Network:
    """An IPv4 network of prefix MIN_PREFIX..MAX_PREFIX without host bits set."""
    if not isinstance(value, str) or "/" not in value:
        raise _bad("cidr", "must be an IPv4 network such as 10.77.0.0/24")
    try:
        net = ipaddress.IPv4Network(value.strip(), strict=False)
    except ValueError:
        raise _bad("cidr", f"'{value[:64]}' is not an IPv4 network such as 10.77.0.0/24") \
            from None
    if str(net) != value.strip():
        raise _bad("cidr", f"'{value[:64]}' has host bits set: did you mean {net}?")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise _bad("cidr", f"the prefix must be between /{MIN_PREFIX} and /{MAX_PREFIX} "
                           f"(this is /{net.prefixlen})")
    return net


def usable(net: ipaddress.IPv4Network) -> Range:
    """The first and last host address (network and broadcast addresses excluded)."""
    return int(net.network_address) + 1, int(net.broadcast_address) - 1


def _inside(net: ipaddress.IPv4Network, where: str, addr: ipaddress.IPv4Address) -> int:
    first, last = usable(net)
    if addr == net.network_address:
        raise _bad(where, f"{addr} is the network address of {net}")
    if addr == net.broadcast_address:
        raise _bad(where, f"{addr} is the broadcast address of {net}")
    if not first <= int(addr) <= last:
        raise _bad(where, f"{addr} is not inside {net}")
    return int(addr)


def default_dhcp_range(net: ipaddress.IPv4Network, gateway: int) -> Range:
    """The upper half of the usable addresses; if the gateway falls inside, the larger side
    of it."""
    first, last = usable(net)
    start = int(net.network_address) + net.num_addresses // 2
    end = last
    if start <= gateway <= end:
        below, above = (start, gateway - 1), (gateway + 1, end)
        start, end = max((below, above), key=lambda r: r[1] - r[0])
    return start, end


def define(mode: str, cidr: Any, gateway: Any = None, dns: Any = None, bridge: Any = None,
           dhcp_start: Any = None, dhcp_end: Any = None) -> Definition:
    """Check a network definition and fill in its defaults; BadRequest (400) names the
    field. Defaults: gateway the first usable address; dns the gateway (nat, isolated: the
    host's dnsmasq answers there) or none (bridge); DHCP range the upper half (nat,
    isolated) or none (bridge). A bridge needs its gateway (the LAN's router)."""
    if mode not in MODES:
        raise _bad("mode", f"must be one of {', '.join(MODES)}")
    net = parse_cidr(cidr)
    first, _last = usable(net)
    if mode == "bridge" and not gateway:
        raise _bad("gateway", "mode bridge needs the LAN's gateway address")
    gw = _inside(net, "gateway", _address("gateway", gateway)) if gateway else first
    if mode == "bridge":
        if not bridge:
            raise _bad("bridge", "mode bridge needs the name of an existing host bridge")
        if not isinstance(bridge, str) or not BRIDGE_RE.match(bridge):
            raise _bad("bridge", "must be a host interface name: letters, digits, '_', '.', "
                                 "'-', at most 15 characters")
    elif bridge:
        raise _bad("bridge", f"only mode bridge attaches to a host bridge (this is {mode})")
    if dns is None:
        servers = [] if mode == "bridge" else [str(ipaddress.IPv4Address(gw))]
    else:
        if not isinstance(dns, list):
            raise _bad("dns", "must be a list of IP addresses")
        if len(dns) > MAX_DNS:
            raise _bad("dns", f"at most {MAX_DNS} servers")
        servers = []
        for value in dns:
            try:
                servers.append(str(ipaddress.ip_address(str(value).strip())))
            except ValueError:
                raise _bad("dns", f"'{str(value)[:64]}' is not an IP address") from None
    if (dhcp_start is None) != (dhcp_end is None):
        raise _bad("dhcp_start" if dhcp_start is None else "dhcp_end",
                   "give both dhcp_start and dhcp_end, or neither")
    if dhcp_start is not None:
        start = _inside(net, "dhcp_start", _address("dhcp_start", dhcp_start))
        end = _inside(net, "dhcp_end", _address("dhcp_end", dhcp_end))
        if start > end:
            raise _bad("dhcp_end", "the DHCP range ends before it starts")
        if start <= gw <= end:
            raise _bad("dhcp_start", f"the DHCP range holds the gateway "
                                     f"{ipaddress.IPv4Address(gw)}")
        dhcp: Range | None = (start, end)
    else:
        dhcp = None if mode == "bridge" else default_dhcp_range(net, gw)
    if dhcp is not None and dhcp[0] > dhcp[1]:
        raise _bad("cidr", f"{net} leaves no room for a DHCP range beside the gateway")
    ip = ipaddress.IPv4Address
    return Definition(mode=mode, cidr=str(net), gateway=str(ip(gw)), dns=servers,
                      bridge=bridge or "",
                      dhcp_start=str(ip(dhcp[0])) if dhcp else "",
                      dhcp_end=str(ip(dhcp[1])) if dhcp else "")


def from_row(row: Any) -> Definition:
    """The definition of a stored network (anything with its attributes)."""
    return Definition(mode=row.mode, cidr=row.cidr, gateway=row.gateway, dns=list(row.dns or []),
                      bridge=row.bridge or "", dhcp_start=row.dhcp_start or "",
                      dhcp_end=row.dhcp_end or "")


def static_pool(cidr: str, gateway: str, dhcp_start: str = "", dhcp_end: str = ""
                ) -> list[Range]:
    """The static pool: usable addresses minus the gateway and the DHCP range, as ascending
    inclusive ranges of integers."""
    net = ipaddress.IPv4Network(cidr)
    first, last = usable(net)
    holes = [(int(ipaddress.IPv4Address(gateway)),) * 2]
    if dhcp_start and dhcp_end:
        holes.append((int(ipaddress.IPv4Address(dhcp_start)),
                      int(ipaddress.IPv4Address(dhcp_end))))
    ranges: list[Range] = []
    cursor = first
    for lo, hi in sorted(holes):
        if lo > cursor:
            ranges.append((cursor, min(lo - 1, last)))
        cursor = max(cursor, hi + 1)
    if cursor <= last:
        ranges.append((cursor, last))
    return [r for r in ranges if r[0] <= r[1]]


def pool_size(ranges: list[Range]) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


def prefix(cidr: str) -> int:
    return ipaddress.IPv4Network(cidr).prefixlen


def overlaps(cidr: str, other: str) -> bool:
    return ipaddress.IPv4Network(cidr).overlaps(ipaddress.IPv4Network(other))


def spec(name: str, d: Definition, network_id: str) -> NetworkSpec:
    """What a host needs to realise the network (fleet.contract.NetworkSpec); a bridge's DHCP
    is the LAN's own, so none is sent for it. `network_id` (a UUID) becomes the libvirt
    network's UUID."""
    bridged = d.mode == "bridge"
    return NetworkSpec(name=name, mode=d.mode, bridge=d.bridge, cidr=d.cidr,
                       gateway=d.gateway, dns=list(d.dns),
                       dhcp_start="" if bridged else d.dhcp_start,
                       dhcp_end="" if bridged else d.dhcp_end, uuid=network_id)


def network_config(mac: str, d: Definition | None, static_address: str = "") -> str:
    """The seed's network-config (v2 YAML) for a VM's one NIC, matched by its MAC and named
    eth0: a static address (with the gateway as default route, except on an isolated
    network, and the DNS servers) or DHCP on a fleet network; "" for the host's default
    network (the worker then writes its own DHCP config)."""
    if d is None:
        return ""
    eth: dict[str, Any] = {}
    if mac:
        eth.update({"match": {"macaddress": mac}, "set-name": "eth0"})
    if static_address:
        eth["addresses"] = [f"{static_address}/{prefix(d.cidr)}"]
        if d.mode != "isolated":
            eth["gateway4"] = d.gateway
        if d.dns:
            eth["nameservers"] = {"addresses": list(d.dns)}
    else:
        eth["dhcp4"] = True
    return yaml.safe_dump({"version": 2, "ethernets": {"eth0": eth}}, sort_keys=False)
