"""/api/v1/projects/<name>: a project's quotas and usage; admins set the quotas."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import select

from fleet.exceptions import NotFound
from fleet.store.models import Project
from scheduler.quotas import usage
from web.api.schemas import ProjectSchema, QuotaUpdateSchema
from web.auth import current, login_required, require_admin

blp = Blueprint("projects", __name__, description="Projects (tenants) and their quotas")


def _get(session, name: str) -> Project:  # type: ignore[no-untyped-def]
    who = current()
    project = session.scalars(select(Project).where(Project.name == name)).first()
    if project is None or (not who.is_admin and project.id != who.project_id):
        raise NotFound(f"project '{name}' not found")
    project.usage = usage(session, project.id)
    return project


@blp.route("/projects/<name>")
class ProjectByName(MethodView):
    decorators = [login_required()]

    @blp.response(200, ProjectSchema)
    def get(self, name: str):  # type: ignore[no-untyped-def]
        """A project's quotas (null = unlimited) and what it uses now."""
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return _get(s, name)

    @blp.arguments(QuotaUpdateSchema)
    @blp.response(200, ProjectSchema)
    def patch(self, data, name: str):  # type: ignore[no-untyped-def]
        """Admin: set quotas (null removes a limit)."""
        require_admin()
        with current_app.extensions["virtfleet.store"].session() as s:
            project = _get(s, name)
            for key, value in data.items():
                setattr(project, key, value)
            s.flush()
            return project
