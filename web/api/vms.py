"""/api/v1/vms: create (202 with the VM and its job), list, show, delete, serial console."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from fleet.exceptions import Conflict, VirtfleetError
from web.api.schemas import (
    ConsoleQuerySchema,
    ConsoleSchema,
    JobSchema,
    VMAcceptedSchema,
    VMCreateSchema,
    VMDetailSchema,
    VMSchema,
)
from web.auth import current, login_required
from web.timings import timings
from web.vmops import create_vms, delete_vm, get_vm, list_vms, steps

blp = Blueprint("vms", __name__, description="Virtual machines")


def _ctx():  # type: ignore[no-untyped-def]
    ext = current_app.extensions
    return (ext["virtfleet.store"], ext["virtfleet.settings"], ext["virtfleet.dispatcher"],
            ext.get("virtfleet.bus"))


class HostTimeout(VirtfleetError):
    http_status = 504


@blp.route("/vms")
class VMs(MethodView):
    decorators = [login_required()]

    @blp.response(200, VMSchema(many=True))
    def get(self):  # type: ignore[no-untyped-def]
        """List this project's VMs."""
        store = _ctx()[0]
        with store.sessions() as s:
            vms = list_vms(s, current())
            for vm in vms:
                _ = vm.host, vm.project, vm.network
            return vms

    @blp.arguments(VMCreateSchema())  # an instance: webargs would make one per request
    @blp.response(202, VMAcceptedSchema)
    @blp.alt_response(409, description="no host can take it, or the name is taken")
    def post(self, data):  # type: ignore[no-untyped-def]
        """Create VMs: placed and claimed now (all or nothing), built on their hosts
        asynchronously. With `count` > 1 the VMs are named <name>-1..<name>-N."""
        store, settings, dispatcher, bus = _ctx()
        accepted = create_vms(store, settings, dispatcher, bus, current(), data)
        # The VMs as the create wrote them (vmops.VMView): nothing to read back.
        vms = accepted.vms
        return {"vm": vms[0], "job": accepted.jobs[0], "vms": vms, "jobs": accepted.jobs}


@blp.route("/vms/<vm_id>")
class VMById(MethodView):
    decorators = [login_required()]

    @blp.response(200, VMDetailSchema)
    def get(self, vm_id: str):  # type: ignore[no-untyped-def]
        """Show a VM, with the time each state took and each step of its build up to
        `ready` (`timings`)."""
        store = _ctx()[0]
        with store.sessions() as s:
            vm = get_vm(s, vm_id, current())
            _ = vm.host, vm.project, vm.network
            vm.steps = steps(s, vm.id)  # type: ignore[attr-defined]
            vm.timings = timings(s, vm)  # type: ignore[attr-defined]
            return vm

    @blp.response(202, JobSchema)
    def delete(self, vm_id: str):  # type: ignore[no-untyped-def]
        """Delete a VM: its host destroys the domain and removes its disks."""
        store, _settings, dispatcher, bus = _ctx()
        return delete_vm(store, dispatcher, bus, current(), vm_id)


@blp.route("/vms/<vm_id>/console")
class VMConsole(MethodView):
    decorators = [login_required()]

    @blp.arguments(ConsoleQuerySchema, location="query")
    @blp.response(200, ConsoleSchema)
    def get(self, args, vm_id: str):  # type: ignore[no-untyped-def]
        """The tail of the VM's serial console log, read on its host."""
        store, _settings, dispatcher, _bus = _ctx()
        with store.sessions() as s:
            vm = get_vm(s, vm_id, current())
            host = vm.host.name if vm.host else None
        if host is None:
            raise Conflict("the VM has no host yet, so it has no console")
        try:
            output = dispatcher.console_log(host, vm_id, args["max_bytes"])
        except TimeoutError:
            raise HostTimeout(f"host {host} did not answer in time") from None
        return {"vm_id": vm_id, "output": output}
