"""/api/v1/networks: fleet networks VMs attach to (admins create and delete, all may read).

A network is fleet-wide: every host realises it when a VM first needs it (see
fleet.contract.NetworkSpec). The definition's rules and address layout live in
fleet.networks; which VM holds which static address in scheduler.ipam.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet import networks
from fleet.exceptions import Conflict, NotFound
from fleet.store.models import VM, Host, Network
from scheduler import ipam
from web.api.schemas import NetworkCreateSchema, NetworkSchema
from web.auth import login_required, require_admin

log = logging.getLogger(__name__)

blp = Blueprint("networks", __name__, description="Fleet networks and their addresses")


def find_network(session: Session, ref: str, lock: bool = False) -> Network:
    """A network by name (or id). `lock`: hold it against a concurrent delete until the
    transaction ends (PostgreSQL FOR KEY SHARE: concurrent VM creates do not wait on each
    other, a delete waits for them)."""
    q = select(Network).where((Network.name == ref) | (Network.id == ref))
    if lock:
        q = q.with_for_update(key_share=True)
    net = session.scalars(q).first()
    if net is None:
        raise NotFound(f"network '{ref}' not found")
    return net


def _vm_count(session: Session, network_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(VM)
                              .where(VM.network_id == network_id)) or 0)


def _view(session: Session, net: Network) -> dict[str, Any]:
    pool = ipam.pool_of(net)
    ip = ipaddress.IPv4Address
    return {"id": net.id, "name": net.name, "mode": net.mode, "bridge": net.bridge,
            "cidr": net.cidr, "gateway": net.gateway, "dns": list(net.dns or []),
            "dhcp_start": net.dhcp_start, "dhcp_end": net.dhcp_end,
            "static_pool": [{"start": str(ip(lo)), "end": str(ip(hi))} for lo, hi in pool],
            "static_total": networks.pool_size(pool), "static_held": ipam.held(session, net.id),
            "vms": _vm_count(session, net.id), "created_at": net.created_at}


@blp.route("/networks")
class Networks(MethodView):
    decorators = [login_required()]

    @blp.response(200, NetworkSchema(many=True))
    def get(self):  # type: ignore[no-untyped-def]
        """List the fleet's networks."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return [_view(s, n) for n in s.scalars(select(Network).order_by(Network.name))]

    @blp.arguments(NetworkCreateSchema)
    @blp.response(201, NetworkSchema)
    @blp.alt_response(409, description="the name is taken or the cidr overlaps a network")
    def post(self, data):  # type: ignore[no-untyped-def]
        """Create a network (admin). nat/isolated: the DHCP range defaults to the upper half
        of the cidr; the static pool is every other usable address but the gateway."""
        require_admin()
        d = networks.define(data["mode"], data["cidr"], gateway=data["gateway"],
                            dns=data["dns"], bridge=data["bridge"],
                            dhcp_start=data["dhcp_start"], dhcp_end=data["dhcp_end"])
        with current_app.extensions["virtfleet.store"].session() as s:
            if s.scalars(select(Network.id).where(Network.name == data["name"])).first():
                raise Conflict(f"a network named '{data['name']}' already exists")
            for other in s.scalars(select(Network)):
                if networks.overlaps(d.cidr, other.cidr):
                    raise Conflict(f"{d.cidr} overlaps network '{other.name}' ({other.cidr})",
                                   {"network": other.name, "cidr": other.cidr})
            net = Network(name=data["name"], mode=d.mode, bridge=d.bridge, cidr=d.cidr,
                          gateway=d.gateway, dns=list(d.dns), dhcp_start=d.dhcp_start,
                          dhcp_end=d.dhcp_end)
            s.add(net)
            try:
                s.flush()
            except IntegrityError:  # the same name, created concurrently
                raise Conflict(f"a network named '{data['name']}' already exists") from None
            return _view(s, net)


@blp.route("/networks/<ref>")
class NetworkByRef(MethodView):
    decorators = [login_required()]

    @blp.response(200, NetworkSchema)
    def get(self, ref: str):  # type: ignore[no-untyped-def]
        """Show a network, its static pool and how much of it is held."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return _view(s, find_network(s, ref))

    @blp.response(204)
    @blp.alt_response(409, description="VMs still use it")
    def delete(self, ref: str):  # type: ignore[no-untyped-def]
        """Delete a network no VM uses (admin); every host removes its libvirt network."""
        require_admin()
        with current_app.extensions["virtfleet.store"].session() as s:
            net = find_network(s, ref)
            # Row lock first: a VM create holding the network (find_network(lock=True))
            # finishes before we count, so its VM is seen.
            s.scalars(select(Network.id).where(Network.id == net.id).with_for_update()).all()
            count = _vm_count(s, net.id)
            if count:
                raise Conflict(f"network '{net.name}' is used by {count} VMs: delete them "
                               "first", {"vms": count})
            s.delete(net)
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(f"network '{net.name}' is still in use") from None
            name, network_id = net.name, net.id
            hosts = list(s.scalars(select(Host.name).order_by(Host.name)))
        # Every host that may have realised it removes its libvirt network (a host that never
        # did finds nothing to do; one that is down gets it from its queue when it is back).
        dispatcher = current_app.extensions["virtfleet.dispatcher"]
        for host in hosts:
            try:
                dispatcher.remove_network(host, {"name": name, "uuid": network_id})
            except Exception:  # noqa: BLE001 - the network is deleted; the host keeps a leftover
                log.exception("could not ask host %s to remove network %s", host, name)
