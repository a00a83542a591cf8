"""/api/v1/jobs/<id>: the state of one build or delete job."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint

from fleet.exceptions import NotFound
from fleet.store.models import Job
from web.api.schemas import JobSchema
from web.auth import current, login_required

blp = Blueprint("jobs", __name__, description="Asynchronous work on VMs")


@blp.route("/jobs/<job_id>")
class JobById(MethodView):
    decorators = [login_required()]

    @blp.response(200, JobSchema)
    def get(self, job_id: str):  # type: ignore[no-untyped-def]
        """Show a job."""
        who = current()
        with current_app.extensions["virtfleet.store"].sessions() as s:
            job = s.get(Job, job_id)
            if job is None or (not who.is_admin and job.project_id != who.project_id):
                raise NotFound(f"job '{job_id}' not found")
            return job
