"""/api/v1/hosts: the hosts that reported in, their capacity, use and liveness."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from fleet.exceptions import NotFound
from fleet.store.models import Host
from web.api.schemas import HostSchema
from web.auth import login_required

blp = Blueprint("hosts", __name__, description="KVM hosts running a virtfleet worker")


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
            host = s.scalars(select(Host).where(Host.name == name)).first()
            if host is None:
                raise NotFound(f"host '{name}' not found")
            return host
