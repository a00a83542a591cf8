"""/api/v1/placement/explain: a dry run of placement, claiming nothing — every host's
verdict (the filter that removed it and why, or its rank and each weigher's score)."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from scheduler import claims
from scheduler.placement import default_weighers, rank
from scheduler.snapshot import Request
from web.api.groups import find_group
from web.api.images import find_image
from web.api.schemas import StrictSchema
from web.auth import current, login_required

blp = Blueprint("placement", __name__, description="Why a VM would land where it would")


class ExplainRequestSchema(StrictSchema):
    image = fields.String(load_default=None)
    vcpus = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1, max=128))
    memory_mb = fields.Integer(strict=True, load_default=256,
                               validate=validate.Range(min=64, max=4 * 1024 * 1024))
    disk_gb = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1,
                                                                                  max=65536))
    server_group = fields.String(load_default=None)
    constraints = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)


class ExplainSchema(Schema):
    policy = fields.String()
    hosts = fields.List(fields.Dict(), metadata={"description": "ranked hosts first, then the "
                                                                "filtered ones with the reason"})
    filters = fields.Dict(keys=fields.String(), values=fields.Integer(),
                          metadata={"description": "how many hosts each filter removed"})


@blp.route("/placement/explain")
class Explain(MethodView):
    decorators = [login_required()]

    @blp.arguments(ExplainRequestSchema)
    @blp.response(200, ExplainSchema)
    def post(self, data):  # type: ignore[no-untyped-def]
        """Dry-run placement for a VM of this shape; nothing is claimed."""
        who = current()
        settings = current_app.extensions["virtfleet.settings"]
        with current_app.extensions["virtfleet.store"].sessions() as s:
            sha = find_image(s, data["image"], who).sha256 if data["image"] else ""
            group = find_group(s, data["server_group"], who) if data["server_group"] else None
            req = Request(vcpus=data["vcpus"], memory_mb=data["memory_mb"],
                          disk_gb=data["disk_gb"], image_sha256=sha,
                          constraints=data["constraints"],
                          group_policy=group.policy if group else None,
                          group_hard=group.hard if group else True,
                          group_hosts=claims.group_hosts(s, group.id) if group else {})
            hosts = claims.load_snapshots(s, settings)
        ranking = rank(hosts, req, weighers=default_weighers(settings.placement_policy),
                       explain=True)
        ordered = sorted(ranking.verdicts, key=lambda v: (not v["passed"], v.get("rank", 0)))
        return {"policy": settings.placement_policy, "hosts": ordered,
                "filters": ranking.removed}
