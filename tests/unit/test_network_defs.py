"""Fleet network definitions (fleet.networks): the rules, the defaults, the address layout
(gateway, DHCP range, static pool) and the network-config a guest gets."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from fleet import networks
from fleet.exceptions import BadRequest


def ips(ranges: list[networks.Range]) -> list[tuple[str, str]]:
    return [(str(ipaddress.IPv4Address(lo)), str(ipaddress.IPv4Address(hi))) for lo, hi in ranges]


def refused(field: str, *args: object, **kw: object) -> str:
    with pytest.raises(BadRequest) as err:
        networks.define(*args, **kw)  # type: ignore[arg-type]
    assert err.value.http_status == 400
    assert list(err.value.errors) == [field], err.value.errors
    return str(err.value)


def test_nat_defaults_upper_half_dhcp_and_the_rest_static() -> None:
    d = networks.define("nat", "10.77.0.0/24")
    assert (d.gateway, d.dns, d.bridge) == ("10.77.0.1", ["10.77.0.1"], "")
    assert (d.dhcp_start, d.dhcp_end) == ("10.77.0.128", "10.77.0.254")
    pool = networks.static_pool(d.cidr, d.gateway, d.dhcp_start, d.dhcp_end)
    assert ips(pool) == [("10.77.0.2", "10.77.0.127")]
    assert networks.pool_size(pool) == 126


def test_a_gateway_inside_the_upper_half_is_kept_out_of_dhcp() -> None:
    d = networks.define("isolated", "10.0.0.0/29", gateway="10.0.0.6")
    assert (d.dhcp_start, d.dhcp_end) == ("10.0.0.4", "10.0.0.5")
    assert ips(networks.static_pool(d.cidr, d.gateway, d.dhcp_start, d.dhcp_end)) == \
        [("10.0.0.1", "10.0.0.3")]
    d = networks.define("nat", "10.0.0.0/24", gateway="10.0.0.200")
    assert (d.dhcp_start, d.dhcp_end) == ("10.0.0.128", "10.0.0.199")
    assert ips(networks.static_pool(d.cidr, d.gateway, d.dhcp_start, d.dhcp_end)) == \
        [("10.0.0.1", "10.0.0.127"), ("10.0.0.201", "10.0.0.254")]


def test_bridge_needs_its_bridge_and_gateway_and_has_no_dhcp_of_its_own() -> None:
    d = networks.define("bridge", "192.168.1.0/24", gateway="192.168.1.1", bridge="br0",
                        dns=["192.168.1.1", "2001:db8::53"])
    assert (d.dhcp_start, d.dhcp_end, d.dns) == ("", "", ["192.168.1.1", "2001:db8::53"])
    assert ips(networks.static_pool(d.cidr, d.gateway)) == [("192.168.1.2", "192.168.1.254")]
    # The LAN's own DHCP range, when given, stays out of the static pool but is not sent.
    d = networks.define("bridge", "192.168.1.0/24", gateway="192.168.1.1", bridge="br-lan.10",
                        dhcp_start="192.168.1.100", dhcp_end="192.168.1.199")
    assert ips(networks.static_pool(d.cidr, d.gateway, d.dhcp_start, d.dhcp_end)) == \
        [("192.168.1.2", "192.168.1.99"), ("192.168.1.200", "192.168.1.254")]
    spec = networks.spec("lan", d, "6f1c2d3e-0000-4000-8000-00000000000a")
    assert spec == {"name": "lan", "mode": "bridge", "bridge": "br-lan.10",
                    "cidr": "192.168.1.0/24", "gateway": "192.168.1.1", "dns": [],
                    "dhcp_start": "", "dhcp_end": "",
                    "uuid": "6f1c2d3e-0000-4000-8000-00000000000a"}
    assert "bridge" in refused("bridge", "bridge", "192.168.1.0/24", gateway="192.168.1.1")
    assert "gateway" in refused("gateway", "bridge", "192.168.1.0/24", bridge="br0")


@pytest.mark.parametrize("field, kw, words", [
    ("mode", {"mode": "routed"}, "one of"),
    ("cidr", {"cidr": "10.0.0.1/24"}, "did you mean 10.0.0.0/24"),
    ("cidr", {"cidr": "10.0.0.0/30"}, "/16 and /29"),
    ("cidr", {"cidr": "10.0.0.0/15"}, "/16 and /29"),
    ("cidr", {"cidr": "10.0.0.0"}, "IPv4 network"),
    ("cidr", {"cidr": "fd00::/64"}, "IPv4 network"),
    ("cidr", {"cidr": "10.0.0.0/24; rm -rf /"}, "not an IPv4 network"),
    ("gateway", {"gateway": "10.0.1.1"}, "not inside"),
    ("gateway", {"gateway": "10.0.0.0"}, "network address"),
    ("gateway", {"gateway": "10.0.0.255"}, "broadcast"),
    ("gateway", {"gateway": "ten"}, "not an IPv4 address"),
    ("dns", {"dns": ["8.8.8.8", "dns.example"]}, "not an IP address"),
    ("dns", {"dns": ["1.1.1.1"] * 4}, "at most 3"),
    ("bridge", {"bridge": "br0"}, "only mode bridge"),
    ("dhcp_end", {"dhcp_start": "10.0.0.10"}, "both"),
    ("dhcp_start", {"dhcp_end": "10.0.0.10"}, "both"),
    ("dhcp_end", {"dhcp_start": "10.0.0.20", "dhcp_end": "10.0.0.10"}, "before it starts"),
    ("dhcp_start", {"dhcp_start": "10.0.0.1", "dhcp_end": "10.0.0.10"}, "gateway"),
    ("dhcp_end", {"dhcp_start": "10.0.0.10", "dhcp_end": "10.0.1.10"}, "not inside"),
])
def test_bad_definitions_name_the_field(field: str, kw: dict[str, object], words: str) -> None:
    args = {"mode": "nat", "cidr": "10.0.0.0/24", **kw}
    assert words in refused(field, **args)


@pytest.mark.parametrize("name", ["br0", "virbr1", "br-lan.10", "a" * 15, "Bridge_1"])
def test_bridge_names_allowed(name: str) -> None:
    assert networks.define("bridge", "10.0.0.0/24", gateway="10.0.0.1", bridge=name).bridge == name


@pytest.mark.parametrize("name", ["a" * 16, "br 0", "br0;", "-br", "../x", "br/0", "é"])
def test_bridge_names_refused(name: str) -> None:
    refused("bridge", "bridge", "10.0.0.0/24", gateway="10.0.0.1", bridge=name)


def test_network_config_static_dhcp_and_none() -> None:
    mac = "52:54:00:aa:bb:cc"
    nat = networks.define("nat", "10.77.0.0/24")
    doc = yaml.safe_load(networks.network_config(mac, nat, "10.77.0.2"))
    assert doc == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": mac}, "set-name": "eth0", "addresses": ["10.77.0.2/24"],
        "gateway4": "10.77.0.1", "nameservers": {"addresses": ["10.77.0.1"]}}}}
    doc = yaml.safe_load(networks.network_config(mac, nat))
    assert doc == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": mac}, "set-name": "eth0", "dhcp4": True}}}
    isolated = networks.define("isolated", "10.78.0.0/24")
    eth = yaml.safe_load(networks.network_config(mac, isolated, "10.78.0.5"))["ethernets"]["eth0"]
    assert "gateway4" not in eth and eth["addresses"] == ["10.78.0.5/24"]
    assert networks.network_config(mac, None) == ""


def test_overlaps() -> None:
    assert networks.overlaps("10.0.0.0/24", "10.0.0.128/25")
    assert not networks.overlaps("10.0.0.0/24", "10.0.1.0/24")
