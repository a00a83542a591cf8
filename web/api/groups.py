"""/api/v1/server-groups: affinity and anti-affinity groups (hard or soft) of a project."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet.exceptions import Conflict, NotFound
from fleet.store.models import VM, ServerGroup
from web.api.schemas import ServerGroupCreateSchema, ServerGroupSchema
from web.auth import Principal, current, login_required

blp = Blueprint("server-groups", __name__, description="Affinity and anti-affinity groups")


def find_group(session: Session, ref: str, who: Principal) -> ServerGroup:
    q = select(ServerGroup).where((ServerGroup.id == ref) | (ServerGroup.name == ref))
    if not who.is_admin:
        q = q.where(ServerGroup.project_id == who.project_id)
    group = session.scalars(q).first()
    if group is None:
        raise NotFound(f"server group '{ref}' not found")
    return group


def _view(session: Session, group: ServerGroup) -> ServerGroup:
    group.members = [  # type: ignore[attr-defined]
        {"id": vm.id, "name": vm.name, "host": vm.host.name if vm.host else None}
        for vm in session.scalars(select(VM).where(VM.server_group_id == group.id))]
    return group


@blp.route("/server-groups")
class Groups(MethodView):
    decorators = [login_required()]

    @blp.response(200, ServerGroupSchema(many=True))
    def get(self):  # type: ignore[no-untyped-def]
        """List this project's server groups."""
        who = current()
        q = select(ServerGroup).order_by(ServerGroup.name)
        if not who.is_admin:
            q = q.where(ServerGroup.project_id == who.project_id)
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return [_view(s, g) for g in s.scalars(q)]

    @blp.arguments(ServerGroupCreateSchema)
    @blp.response(201, ServerGroupSchema)
    def post(self, data):  # type: ignore[no-untyped-def]
        """Create a server group: `affinity` keeps members on one host, `anti-affinity` on
        different hosts; `hard: false` makes it a preference instead of a rule."""
        who = current()
        with current_app.extensions["virtfleet.store"].session() as s:
            if s.scalars(select(ServerGroup).where(ServerGroup.project_id == who.project_id,
                                                   ServerGroup.name == data["name"])).first():
                raise Conflict(f"a server group named '{data['name']}' already exists")
            group = ServerGroup(project_id=who.project_id, **data)
            s.add(group)
            s.flush()
            return _view(s, group)


@blp.route("/server-groups/<ref>")
class GroupByRef(MethodView):
    decorators = [login_required()]

    @blp.response(200, ServerGroupSchema)
    def get(self, ref: str):  # type: ignore[no-untyped-def]
        """Show a server group and where its members run."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return _view(s, find_group(s, ref, current()))

    @blp.response(204)
    def delete(self, ref: str):  # type: ignore[no-untyped-def]
        """Delete an empty server group."""
        with current_app.extensions["virtfleet.store"].session() as s:
            group = find_group(s, ref, current())
            members = s.scalar(select(func.count()).select_from(VM)
                               .where(VM.server_group_id == group.id))
            if members:
                raise Conflict(f"server group '{group.name}' still has {members} VMs")
            s.delete(group)
