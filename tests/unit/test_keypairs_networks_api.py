"""Keypairs, networks and VMs that use them, through the REST API (Flask's test client, a
recording dispatcher, a migrated SQLite store): bad keys and networks, tenancy, static
addresses (different for every VM, released on delete, 409 when exhausted, nothing
half-made on any failure) and what the build message carries.

The `env` fixture (and Env) are test_actions_api's: a test's `env` parameter "redefines"
the imported fixture, which is how pytest fixtures are shared (hence F811 off here).
"""
# ruff: noqa: F811

from __future__ import annotations

from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy import select

from fleet import contract as c
from fleet.store.models import VM, Claim, Event, Host, IPAllocation, Job, Keypair, Network
from tests.unit.test_actions_api import Env, env  # noqa: F401 - the fixture
from tests.unit.test_api import assert_error_body

OPENSSH = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def ed25519_line(comment: str = "alice@laptop") -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*OPENSSH).decode()
    return f"{key} {comment}"


def add_keypair(env: Env, name: str = "laptop", who: str = "alice") -> dict[str, Any]:
    resp = env.call("POST", "/keypairs", who=who,
                    json={"name": name, "public_key": ed25519_line()})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def add_network(env: Env, name: str = "lab", cidr: str = "10.77.0.0/24",
                **kw: Any) -> dict[str, Any]:
    resp = env.call("POST", "/networks", who="root",
                    json={"name": name, "mode": "nat", "cidr": cidr, **kw})
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def create(env: Env, who: str = "alice", **kw: Any) -> Any:
    body = {"name": "web1", "image": "debian", "vcpus": 1, "memory_mb": 256, "disk_gb": 1,
            **kw}
    return env.call("POST", "/vms", who=who, json=body)


def created(env: Env, **kw: Any) -> dict[str, Any]:
    resp = create(env, **kw)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()


def builds(env: Env) -> list[dict[str, Any]]:
    return [p for kind, _h, p in env.dispatcher.calls if kind == "build"]


def allocations(env: Env) -> dict[str, str]:
    with env.store.sessions() as s:
        return {a.address: a.vm_id for a in s.scalars(select(IPAllocation))}


def assert_no_vm_left(env: Env) -> None:
    assert env.count(VM) == 0 and env.count(Claim) == 0 and env.count(Job) == 0
    assert env.count(IPAllocation) == 0 and env.count(Event) == 0
    assert env.used() == (0, 0, 0)


# -- keypairs -------------------------------------------------------------------------------


def test_keypair_import_list_show_delete(env: Env) -> None:
    line = ed25519_line()
    resp = env.call("POST", "/keypairs", json={"name": "laptop", "public_key": line + "\n"})
    assert resp.status_code == 201, resp.get_json()
    kp = resp.get_json()
    assert (kp["name"], kp["type"], kp["public_key"]) == ("laptop", "ssh-ed25519", line)
    assert kp["fingerprint"].startswith("SHA256:")
    del kp["created_at"]  # SQLite gives it back without its zone
    shown = [{k: v for k, v in x.items() if k != "created_at"}
             for x in env.call("GET", "/keypairs").get_json()]
    assert shown == [kp]
    for ref in ("laptop", kp["id"]):
        shown = env.call("GET", f"/keypairs/{ref}").get_json()
        assert {k: v for k, v in shown.items() if k != "created_at"} == kp
    body = assert_error_body(env.call("POST", "/keypairs", json={"name": "laptop",
                                                                 "public_key": line}), 409)
    assert "laptop" in body["message"]
    assert env.call("DELETE", "/keypairs/laptop").status_code == 204
    assert_error_body(env.call("GET", "/keypairs/laptop"), 404)
    assert env.call("GET", "/keypairs").get_json() == []


@pytest.mark.parametrize("public_key, words", [
    ("ssh-rsa " + rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
     .public_bytes(*OPENSSH).decode().split()[1], "at least 2048 bits"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
     "-----END OPENSSH PRIVATE KEY-----\n", "private key"),
    ('command="/bin/sh" ' + ed25519_line(), "options"),
    (ed25519_line() + "\n" + ed25519_line(), "single line"),
    ("ssh-ed25519 AAAA%%%%", "base64"),
    ("ssh-dss AAAAB3NzaC1kc3MAAA==", "not accepted"),
])
def test_bad_keys_are_400_saying_why(env: Env, public_key: str, words: str) -> None:
    resp = env.call("POST", "/keypairs", json={"name": "k", "public_key": public_key})
    body = assert_error_body(resp, 400)
    assert words in body["message"] and list(body["errors"]) == ["public_key"]
    assert "b3BlbnNzaC1rZXktdjEAAAAA" not in resp.get_data(as_text=True)
    assert env.count(Keypair) == 0


@pytest.mark.parametrize("body, field", [
    ({"name": "Bad Name", "public_key": "x"}, "name"),
    ({"name": "k"}, "public_key"),
    ({"name": "k", "public_key": "x", "comment": "no"}, "comment"),
])
def test_keypair_schema_is_422(env: Env, body: dict[str, Any], field: str) -> None:
    assert field in str(assert_error_body(env.call("POST", "/keypairs", json=body),
                                          422)["errors"])


def test_keypairs_belong_to_their_project(env: Env) -> None:
    kp = add_keypair(env)
    for who in ("bob", "root"):  # admins too: keys are a project's own
        assert env.call("GET", "/keypairs", who=who).get_json() == []
        assert_error_body(env.call("GET", "/keypairs/laptop", who=who), 404)
        assert_error_body(env.call("GET", f"/keypairs/{kp['id']}", who=who), 404)
        assert_error_body(env.call("DELETE", "/keypairs/laptop", who=who), 404)
    assert env.call("GET", "/keypairs/laptop").status_code == 200
    add_keypair(env, who="bob")  # the same name in another project
    add_keypair(env, name="bobs", who="bob")
    # Nor can alice's VM use a keypair of bob's.
    body = assert_error_body(create(env, keypairs=["laptop", "bobs"]), 404)
    assert "keypair 'bobs' not found in project team-a" in body["message"]
    assert_no_vm_left(env)


# -- networks -------------------------------------------------------------------------------


def test_admins_create_and_delete_networks_everyone_reads_them(env: Env) -> None:
    resp = env.call("POST", "/networks", json={"name": "lab", "mode": "nat",
                                               "cidr": "10.77.0.0/24"})
    assert_error_body(resp, 403)
    net = add_network(env)
    assert {k: net[k] for k in ("name", "mode", "cidr", "gateway", "dns", "dhcp_start",
                                "dhcp_end", "bridge")} == {
        "name": "lab", "mode": "nat", "cidr": "10.77.0.0/24", "gateway": "10.77.0.1",
        "dns": ["10.77.0.1"], "dhcp_start": "10.77.0.128", "dhcp_end": "10.77.0.254",
        "bridge": ""}
    assert net["static_pool"] == [{"start": "10.77.0.2", "end": "10.77.0.127"}]
    assert (net["static_total"], net["static_held"], net["vms"]) == (126, 0, 0)
    for who in ("alice", "bob"):
        assert [n["name"] for n in env.call("GET", "/networks", who=who).get_json()] == ["lab"]
        shown = env.call("GET", "/networks/lab", who=who).get_json()
        assert {k: v for k, v in shown.items() if k != "created_at"} == \
            {k: v for k, v in net.items() if k != "created_at"}
    assert_error_body(env.call("DELETE", "/networks/lab"), 403)
    assert env.call("DELETE", "/networks/lab", who="root").status_code == 204
    assert_error_body(env.call("GET", "/networks/lab"), 404)


def test_bridge_network(env: Env) -> None:
    resp = env.call("POST", "/networks", who="root", json={
        "name": "lan", "mode": "bridge", "bridge": "br0", "cidr": "192.168.50.0/24",
        "gateway": "192.168.50.1", "dns": ["192.168.50.1"], "dhcp_start": "192.168.50.100",
        "dhcp_end": "192.168.50.199"})
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["static_pool"] == [
        {"start": "192.168.50.2", "end": "192.168.50.99"},
        {"start": "192.168.50.200", "end": "192.168.50.254"}]


@pytest.mark.parametrize("body, code, words", [
    ({"mode": "nat", "cidr": "10.0.0.1/24"}, 400, "did you mean 10.0.0.0/24"),
    ({"mode": "nat", "cidr": "10.0.0.0/8"}, 400, "/16 and /29"),
    ({"mode": "nat", "cidr": "10.0.0.0/24", "gateway": "10.0.0.255"}, 400, "broadcast"),
    ({"mode": "nat", "cidr": "10.0.0.0/24", "gateway": "10.0.9.1"}, 400, "not inside"),
    ({"mode": "nat", "cidr": "10.0.0.0/24", "dns": ["resolver"]}, 400, "not an IP"),
    ({"mode": "nat", "cidr": "10.0.0.0/24", "bridge": "br0"}, 400, "only mode bridge"),
    ({"mode": "bridge", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}, 400, "host bridge"),
    ({"mode": "bridge", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
      "bridge": "br0;reboot"}, 400, "interface name"),
    ({"mode": "routed", "cidr": "10.0.0.0/24"}, 422, "mode"),
    ({"mode": "nat", "cidr": "10.0.0.0/24", "vlan": 5}, 422, "vlan"),
    ({"mode": "nat"}, 422, "cidr"),
])
def test_bad_networks_say_why(env: Env, body: dict[str, Any], code: int, words: str) -> None:
    resp = env.call("POST", "/networks", who="root", json={"name": "n1", **body})
    assert words in assert_error_body(resp, code)["message"]
    assert env.count(Network) == 0


def test_network_names_and_cidrs_do_not_clash(env: Env) -> None:
    add_network(env)
    assert "lab" in assert_error_body(env.call("POST", "/networks", who="root", json={
        "name": "lab", "mode": "nat", "cidr": "10.99.0.0/24"}), 409)["message"]
    body = assert_error_body(env.call("POST", "/networks", who="root", json={
        "name": "other", "mode": "isolated", "cidr": "10.77.0.128/25"}), 409)
    assert "overlaps network 'lab'" in body["message"]


def test_a_network_in_use_cannot_be_deleted(env: Env) -> None:
    add_network(env)
    vm = created(env, network="lab")["vm"]
    body = assert_error_body(env.call("DELETE", "/networks/lab", who="root"), 409)
    assert "1 VMs" in body["message"]
    assert env.call("GET", "/networks/lab").get_json()["vms"] == 1
    env.call("DELETE", f"/vms/{vm['id']}")
    env.apply(c.EV_DELETED, vm["id"], state="deleted")
    assert not [call for call in env.dispatcher.calls if call[0] == "remove_network"]
    lab_id = env.call("GET", "/networks/lab").get_json()["id"]
    assert env.call("DELETE", "/networks/lab", who="root").status_code == 204
    # every registered host is asked to remove its libvirt network (it may have realised it)
    with env.store.sessions() as s:
        hosts = sorted(s.scalars(select(Host.name)))
    assert hosts and [(h, p) for kind, h, p in env.dispatcher.calls
                      if kind == "remove_network"] == [(h, {"name": "lab", "uuid": lab_id})
                                                       for h in hosts]


# -- VMs with keypairs and networks ---------------------------------------------------------


def test_vm_with_keypairs_and_a_static_address(env: Env) -> None:
    kp = add_keypair(env)
    add_network(env)
    body = created(env, keypairs=["laptop"], network="lab", address="static",
                   user_data="#cloud-config\npackages: [htop]\n")
    vm = body["vm"]
    assert (vm["network"], vm["address_mode"], vm["keypairs"]) == ("lab", "static", ["laptop"])
    assert vm["addresses"] == [{"ip": "10.77.0.2", "prefix": 24, "source": "static"}]
    assert vm["ready_at"] is None
    payload = builds(env)[-1]["vm"]
    assert payload["network"] == {"name": "lab", "mode": "nat", "bridge": "",
                                  "cidr": "10.77.0.0/24", "gateway": "10.77.0.1",
                                  "dns": ["10.77.0.1"], "dhcp_start": "10.77.0.128",
                                  "dhcp_end": "10.77.0.254",
                                  "uuid": env.call("GET", "/networks/lab").get_json()["id"]}
    eth = yaml.safe_load(payload["network_config"])["ethernets"]["eth0"]
    assert eth == {"match": {"macaddress": vm["mac"]}, "set-name": "eth0",
                   "addresses": ["10.77.0.2/24"], "gateway4": "10.77.0.1",
                   "nameservers": {"addresses": ["10.77.0.1"]}}
    user_data = payload["user_data"]
    assert "packages: [htop]" in user_data and kp["public_key"] in user_data
    assert c.READY_MARKER in user_data and "hostname: web1" in user_data
    # Reported addresses come after the static one, without repeating it.
    env.apply(c.EV_ADDRESSES, vm["id"], addresses=[
        {"ip": "10.77.0.2", "prefix": 24, "source": "agent"},
        {"ip": "fe80::1", "prefix": 64, "source": "agent"}])
    assert env.vm(vm["id"])["addresses"] == [
        {"ip": "10.77.0.2", "prefix": 24, "source": "static"},
        {"ip": "fe80::1", "prefix": 64, "source": "agent"}]


def test_dhcp_on_a_fleet_network_and_the_default_network(env: Env) -> None:
    add_network(env)
    vm = created(env, network="lab")["vm"]
    assert (vm["network"], vm["address_mode"], vm["addresses"]) == ("lab", "dhcp", [])
    eth = yaml.safe_load(builds(env)[-1]["vm"]["network_config"])["ethernets"]["eth0"]
    assert eth == {"match": {"macaddress": vm["mac"]}, "set-name": "eth0", "dhcp4": True}
    assert allocations(env) == {}
    vm = created(env, name="web2")["vm"]
    assert (vm["network"], vm["address_mode"]) == (None, "dhcp")
    assert builds(env)[-1]["vm"]["network"] is None
    assert builds(env)[-1]["vm"]["network_config"] == ""


def test_a_deleted_keypair_stays_with_the_vms_made_with_it(env: Env) -> None:
    kp = add_keypair(env)
    vm = created(env, keypairs=["laptop", "laptop"])["vm"]  # repeats count once
    assert vm["keypairs"] == ["laptop"]
    env.call("DELETE", "/keypairs/laptop")
    env.apply(c.EV_BUILD_DONE, vm["id"], builds(env)[-1]["job_id"])
    env.act(vm["id"], action="rebuild")
    rebuild = env.dispatcher.actions()[-1]["args"]["vm"]
    assert kp["public_key"] in rebuild["user_data"]


def test_two_vms_get_different_addresses_and_delete_gives_them_back(env: Env) -> None:
    add_network(env)
    first = created(env, network="lab", address="static")["vm"]
    second = created(env, name="web2", network="lab", address="static")["vm"]
    assert first["addresses"][0]["ip"] == "10.77.0.2"
    assert second["addresses"][0]["ip"] == "10.77.0.3"
    assert allocations(env) == {"10.77.0.2": first["id"], "10.77.0.3": second["id"]}
    assert env.call("GET", "/networks/lab").get_json()["static_held"] == 2
    # The address is held while the host deletes, and free once it is gone.
    env.call("DELETE", f"/vms/{first['id']}")
    assert "10.77.0.2" in allocations(env)
    env.apply(c.EV_DELETED, first["id"], state="deleted")
    assert allocations(env) == {"10.77.0.3": second["id"]}
    third = created(env, name="web3", network="lab", address="static")["vm"]
    assert third["addresses"][0]["ip"] == "10.77.0.2"


def test_count_takes_one_address_per_vm(env: Env) -> None:
    add_network(env)
    vms = created(env, name="web", count=3, network="lab", address="static")["vms"]
    assert [v["addresses"][0]["ip"] for v in vms] == ["10.77.0.2", "10.77.0.3", "10.77.0.4"]


def test_exhausted_pool_is_409_and_nothing_half_made(env: Env) -> None:
    add_network(env, cidr="10.77.0.0/29")  # static pool: .2 and .3
    created(env, name="a", network="lab", address="static")
    created(env, name="b", network="lab", address="static")
    before = (env.count(VM), env.count(Claim), env.count(Job), env.count(Event), env.used())
    body = assert_error_body(create(env, name="c", network="lab", address="static"), 409)
    assert "no free static address" in body["message"]
    assert body["errors"] == {"network": "lab", "pool_size": 2}
    assert (env.count(VM), env.count(Claim), env.count(Job), env.count(Event),
            env.used()) == before
    assert len(builds(env)) == 2 and len(allocations(env)) == 2
    # DHCP on the same network still works.
    assert create(env, name="c", network="lab").status_code == 202


def test_count_beyond_the_pool_is_all_or_nothing(env: Env) -> None:
    add_network(env, cidr="10.77.0.0/29")
    assert_error_body(create(env, name="web", count=3, network="lab", address="static"), 409)
    assert_no_vm_left(env)
    assert builds(env) == []


def test_no_host_gives_the_address_back(env: Env) -> None:
    add_network(env)
    assert_error_body(create(env, network="lab", address="static", memory_mb=1 << 20), 409)
    assert_no_vm_left(env)


def test_broker_down_gives_the_address_back(env: Env) -> None:
    add_network(env)
    env.dispatcher.fail = True
    assert_error_body(create(env, network="lab", address="static"), 503)
    assert_no_vm_left(env)
    env.dispatcher.fail = False
    vm = created(env, network="lab", address="static")["vm"]
    assert vm["addresses"][0]["ip"] == "10.77.0.2"


def test_a_vm_without_a_host_releases_its_address_on_delete(env: Env) -> None:
    add_network(env)
    vm = created(env, network="lab", address="static")["vm"]
    with env.store.session() as s:
        row = s.get(VM, vm["id"])
        row.host_id, row.state = None, "error"
    assert env.call("DELETE", f"/vms/{vm['id']}").status_code == 202
    assert allocations(env) == {} and env.count(VM) == 0


@pytest.mark.parametrize("kw, code, words", [
    ({"keypairs": ["missing"]}, 404, "keypair 'missing' not found"),
    ({"network": "nowhere"}, 404, "network 'nowhere' not found"),
    ({"address": "static"}, 422, "needs a `network`"),
    ({"address": "manual", "network": "lab"}, 422, "address"),
    ({"keypairs": "laptop"}, 422, "keypairs"),
    ({"keypairs": ["Bad Name"]}, 422, "keypairs"),
    ({"network": "Lab"}, 422, "network"),
    ({"user_data": "#cloud-config\npackages: [htop\nruncmd: []\n"}, 400, "line"),
    ({"user_data": "just some text"}, 400, "user_data must be"),
])
def test_bad_create_bodies_say_why_and_store_nothing(env: Env, kw: dict[str, Any], code: int,
                                                     words: str) -> None:
    add_network(env)
    add_keypair(env)
    resp = create(env, **kw)
    body = assert_error_body(resp, code)
    assert words in body["message"], body
    assert_no_vm_left(env)
    assert "/work" not in resp.get_data(as_text=True)


def test_the_list_shows_network_fields(env: Env) -> None:
    add_network(env)
    created(env, network="lab", address="static")
    listed = env.call("GET", "/vms").get_json()
    assert listed[0]["network"] == "lab" and listed[0]["addresses"][0]["source"] == "static"
    with env.store.sessions() as s:
        assert s.scalars(select(Host)).one().used_vcpus == 1
