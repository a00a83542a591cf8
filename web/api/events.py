"""/api/v1/events: the event log (filtered to the caller's project) and its live SSE stream."""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Response, current_app, stream_with_context
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import fields, validate
from sqlalchemy import select

from fleet.bus import Bus
from fleet.store.models import Event
from web.api.schemas import EventSchema, StrictSchema
from web.auth import Principal, current, login_required

blp = Blueprint("events", __name__, description="What happened, as it happens")


class EventQuerySchema(StrictSchema):
    vm_id = fields.String(load_default=None)
    after = fields.Integer(load_default=0, validate=validate.Range(min=0))
    limit = fields.Integer(load_default=200, validate=validate.Range(min=1, max=1000))


def may_see(who: Principal, project_id: int | None) -> bool:
    return who.is_admin or (project_id is not None and project_id == who.project_id)


@blp.route("/events")
class Events(MethodView):
    decorators = [login_required()]

    @blp.arguments(EventQuerySchema, location="query")
    @blp.response(200, EventSchema(many=True))
    def get(self, args):  # type: ignore[no-untyped-def]
        """Events after an id, oldest first."""
        who = current()
        q = select(Event).where(Event.id > args["after"]).order_by(Event.id).limit(args["limit"])
        if args["vm_id"]:
            q = q.where(Event.vm_id == args["vm_id"])
        if not who.is_admin:
            q = q.where(Event.project_id == who.project_id)
        with current_app.extensions["virtfleet.store"].sessions() as s:
            return list(s.scalars(q))


@blp.route("/events/stream")
class EventStream(MethodView):
    decorators = [login_required()]

    @blp.response(200, content_type="text/event-stream")
    def get(self):  # type: ignore[no-untyped-def]
        """Server-sent events: every event of this project as it is applied."""
        who = current()
        bus = Bus(current_app.extensions["virtfleet.settings"].redis_url)

        def stream() -> Iterator[str]:
            yield ": connected\n\n"
            for event in bus.listen():
                if event is None:
                    yield ": keep-alive\n\n"
                elif may_see(who, event.get("project_id")):
                    yield f"id: {event.get('id', '')}\ndata: {json.dumps(event)}\n\n"

        return Response(stream_with_context(stream()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
