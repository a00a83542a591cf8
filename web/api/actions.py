"""/api/v1/vms/<id>/actions and /api/v1/vms/<id>/snapshots: power, resize, snapshots and
rebuild of a VM; each answers 202 with its job (GET /api/v1/jobs/<id> follows it)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from web.actionops import get_snapshot, list_snapshots, request_action
from web.api.schemas import ActionSchema, JobSchema, SnapshotNameSchema, SnapshotSchema
from web.auth import current, login_required

blp = Blueprint("actions", __name__, description="Actions on VMs: power, resize, snapshots, "
                                                 "rebuild")


def _act(vm_id: str, action: str, args: dict[str, Any]):  # type: ignore[no-untyped-def]
    ext = current_app.extensions
    return request_action(ext["virtfleet.store"], ext["virtfleet.settings"],
                          ext["virtfleet.dispatcher"], ext.get("virtfleet.bus"), current(),
                          vm_id, action, args)


@blp.route("/vms/<vm_id>/actions")
class VMActions(MethodView):
    decorators = [login_required()]

    @blp.arguments(ActionSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="the action does not fit the VM's state (the message "
                                       "names the states that allow it), the host has no "
                                       "room for a resize, or a disk would shrink")
    def post(self, data, vm_id: str):  # type: ignore[no-untyped-def]
        """Act on a VM: start, stop (ACPI, forced off after `timeout`), reboot, force_off,
        resize (while stopped; the disk only grows), snapshot_create / snapshot_revert /
        snapshot_delete (`name`), rebuild (from its image, same id, name and MAC)."""
        return _act(vm_id, data["action"], data["args"])


@blp.route("/vms/<vm_id>/snapshots")
class VMSnapshots(MethodView):
    decorators = [login_required()]

    @blp.response(200, SnapshotSchema(many=True))
    def get(self, vm_id: str):  # type: ignore[no-untyped-def]
        """The VM's snapshots (libvirt internal snapshots of its disk, with its memory when
        it was running)."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return list_snapshots(s, current(), vm_id)

    @blp.arguments(SnapshotNameSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(409, description="the name is taken, or the VM is busy")
    def post(self, data, vm_id: str):  # type: ignore[no-untyped-def]
        """Snapshot the VM (running or stopped)."""
        return _act(vm_id, "snapshot_create", data)


@blp.route("/vms/<vm_id>/snapshots/<name>")
class VMSnapshotByName(MethodView):
    decorators = [login_required()]

    @blp.response(200, SnapshotSchema)
    def get(self, vm_id: str, name: str):  # type: ignore[no-untyped-def]
        """One snapshot."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return get_snapshot(s, current(), vm_id, name)

    @blp.response(202, JobSchema)
    def delete(self, vm_id: str, name: str):  # type: ignore[no-untyped-def]
        """Delete a snapshot (its data in the disk too)."""
        return _act(vm_id, "snapshot_delete", {"name": name})


@blp.route("/vms/<vm_id>/snapshots/<name>/revert")
class VMSnapshotRevert(MethodView):
    decorators = [login_required()]

    @blp.response(202, JobSchema)
    def post(self, vm_id: str, name: str):  # type: ignore[no-untyped-def]
        """Bring the VM back to a snapshot: its disk, and its memory when it was taken
        running (the VM then runs from that moment)."""
        return _act(vm_id, "snapshot_revert", {"name": name})
