"""/api/v1/vms/<id>/console/token: a short-lived, single-use ticket to a VM's interactive
serial console, served by the websocket console server of the VM's host (worker/console.py).

Owns the checks before a token is signed (the caller's VM, on a live host, running there, the
host has a console server) and signing it (fleet.consoletoken). Never reaches libvirt: the
host is asked through the contract (``console_info``), and the client then talks to the host.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields

from fleet.consoletoken import sign
from fleet.exceptions import Conflict, VirtfleetError
from web.api.vms import HostTimeout
from web.auth import current, login_required
from web.vmops import get_vm

log = logging.getLogger(__name__)

blp = Blueprint("console", __name__, description="Interactive serial console")

RUNNING_STATES = ("running", "ready")
"""VM states (in the store) whose console may be opened."""

HOST_RUNNING_STATES = ("running", "blocked", "paused")
"""Domain states (as the host reports them) whose console can be opened."""


class ConsoleUnavailable(VirtfleetError):
    http_status = 503


class ConsoleTokenSchema(Schema):
    url = fields.String(required=True, metadata={
        "description": "websocket URL of the host's console server, token included: connect "
                       "once before expires_at; binary frames carry the console both ways, "
                       "text frames are sent as UTF-8"})
    expires_at = fields.DateTime(required=True)
    vm_id = fields.String(required=True)
    host = fields.String(required=True)


@blp.route("/vms/<vm_id>/console/token")
class ConsoleToken(MethodView):
    decorators = [login_required()]

    @blp.response(200, ConsoleTokenSchema)
    @blp.alt_response(404, description="no such VM in the caller's project")
    @blp.alt_response(409, description="the VM is not running on a live host with a console")
    @blp.alt_response(503, description="console tokens are not configured (host_token)")
    @blp.alt_response(504, description="the VM's host did not answer")
    def post(self, vm_id: str):  # type: ignore[no-untyped-def]
        """A token for the VM's interactive serial console (the VM's project or an admin).

        The token is good for one connection, within `console_token_ttl` seconds. One
        console session per VM: a new one takes over from the previous (closed with 4001)."""
        ext = current_app.extensions
        store, settings, dispatcher = (ext["virtfleet.store"], ext["virtfleet.settings"],
                                       ext["virtfleet.dispatcher"])
        with store.sessions() as s:
            vm = get_vm(s, vm_id, current())
            state, host = vm.state, vm.host
            host_name, alive = (host.name, host.alive) if host is not None else (None, False)
        if host_name is None:
            raise Conflict("the VM has no host yet, so it has no console")
        if state not in RUNNING_STATES:
            raise Conflict(f"the VM is {state}: its console opens only while it runs")
        if not alive:
            raise Conflict(f"host {host_name} is down")
        if not settings.host_token:
            raise ConsoleUnavailable("console tokens need the host credential "
                                     "(setting 'host_token')")
        try:
            info = dispatcher.console_info(host_name, vm_id)
        except TimeoutError:
            raise HostTimeout(f"host {host_name} did not answer in time") from None
        if not info.get("url"):
            raise Conflict(f"host {host_name} has no console server")
        if info.get("state") not in HOST_RUNNING_STATES:
            raise Conflict(f"the VM is not running on host {host_name}")
        token, claims = sign(settings.host_token, vm_id, host_name, settings.console_token_ttl)
        log.info("console token for VM %s on %s issued to %s", vm_id, host_name,
                 current().name)
        return ({"url": f"{info['url']}/console?token={token}",
                 "expires_at": datetime.fromtimestamp(claims.exp, UTC),
                 "vm_id": vm_id, "host": host_name},
                {"Cache-Control": "no-store"})
