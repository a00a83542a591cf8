"""/api/v1/hosts: the hosts that reported in, their capacity, use and liveness; admins set
enabled/maintenance, labels, allocation ratios and max VMs, and evacuate a host."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.exceptions import NotFound
from fleet.store.models import Host
from web.api.schemas import EvacuationSchema, HostSchema, HostUpdateSchema
from web.auth import login_required, require_admin

blp = Blueprint("hosts", __name__, description="KVM hosts running a virtfleet worker")


def get_host(session: Session, name: str) -> Host:
    host = session.scalars(select(Host).where(Host.name == name)).first()
    if host is None:
        raise NotFound(f"host '{name}' not found")
    return host


@blp.route("/hosts")
class Hosts(MethodView):
    decorators = [login_required()]

    @blp.response(200, HostSchema(many=True))
    def get(self):  # type: ignore[no-untyped-def]
        """List hosts."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return list(s.scalars(select(Host).order_by(Host.name)))


@blp.route("/hosts/<name>")
class HostByName(MethodView):
    decorators = [login_required()]

    @blp.response(200, HostSchema)
    def get(self, name: str):  # type: ignore[no-untyped-def]
        """Show one host."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return get_host(s, name)

    @blp.arguments(HostUpdateSchema)
    @blp.response(200, HostSchema)
    def patch(self, data, name: str):  # type: ignore[no-untyped-def]
        """Admin: enable/disable, maintenance, labels, allocation ratios, max VMs.

        Any change bumps the host's generation, so a claim computed before it loses its
        compare-and-set and is placed again under the new rules."""
        require_admin()
        with current_app.extensions["virtfleet.store"].session() as s:
            host = get_host(s, name)
            for key, value in data.items():
                setattr(host, key, value)
            host.generation = host.generation + 1
            s.flush()
            return host


@blp.route("/hosts/<name>/evacuate")
class HostEvacuate(MethodView):
    decorators = [login_required()]

    @blp.response(202, EvacuationSchema)
    def post(self, name: str):  # type: ignore[no-untyped-def]
        """Admin: disable the host and rebuild elsewhere what can move; VMs whose only disk is
        local to the host are listed, never destroyed."""
        require_admin()
        from web.vmops import evacuate
        ext = current_app.extensions
        return evacuate(ext["virtfleet.store"], ext["virtfleet.settings"],
                        ext["virtfleet.dispatcher"], ext.get("virtfleet.bus"), name)
