"""marshmallow schemas of the API: what requests may carry (unknown fields rejected) and
what responses show. One success schema per endpoint."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from fleet.contract import NAME_RE

NAME = validate.Regexp(NAME_RE, error="must match ^[a-z0-9][a-z0-9-]{0,62}$ "
                       "(lower-case letters, digits and '-', at most 63)")


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class ImageCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)
    source = fields.String(required=True, validate=validate.Length(min=1, max=4096),
                           metadata={"description": "an http(s) URL, or (admins only) a path "
                                                    "on the controller"})
    visibility = fields.String(load_default="private",
                               validate=validate.OneOf(["private", "public"]))


class ImageSchema(Schema):
    id = fields.String()
    name = fields.String()
    project = fields.Function(lambda img: img.project_name)
    visibility = fields.String()
    sha256 = fields.String()
    size_bytes = fields.Integer()
    virtual_size_bytes = fields.Integer()
    disk_format = fields.String()
    created_at = fields.DateTime()


class VMCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)
    image = fields.String(required=True, validate=validate.Length(min=1, max=63),
                          metadata={"description": "image id or name"})
    vcpus = fields.Integer(strict=True, load_default=1,
                           validate=validate.Range(min=1, max=128,
                                                   error="must be between 1 and 128"))
    memory_mb = fields.Integer(strict=True, load_default=256,
                               validate=validate.Range(min=64, max=4 * 1024 * 1024,
                                                       error="must be between 64 and 4194304"))
    disk_gb = fields.Integer(strict=True, load_default=1,
                             validate=validate.Range(min=1, max=65536,
                                                     error="must be between 1 and 65536"))
    user_data = fields.String(load_default="", validate=validate.Length(max=65536))


class StepSchema(Schema):
    state = fields.String()
    at = fields.DateTime()
    seconds = fields.Float(allow_none=True)


class VMSchema(Schema):
    id = fields.String()
    name = fields.String()
    project = fields.Function(lambda vm: vm.project.name)
    image_id = fields.String()
    vcpus = fields.Integer()
    memory_mb = fields.Integer()
    disk_gb = fields.Integer()
    state = fields.String()
    state_reason = fields.String()
    failed_step = fields.String()
    host = fields.Function(lambda vm: vm.host.name if vm.host else None)
    alternates = fields.List(fields.String())
    mac = fields.String()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class JobSchema(Schema):
    id = fields.String()
    vm_id = fields.String()
    kind = fields.String()
    state = fields.String()
    step = fields.String()
    message = fields.String()
    host = fields.String(attribute="host_name")
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class VMAcceptedSchema(Schema):
    vm = fields.Nested(VMSchema)
    job = fields.Nested(JobSchema)


class VMDetailSchema(VMSchema):
    steps = fields.List(fields.Nested(StepSchema))


class ConsoleSchema(Schema):
    vm_id = fields.String()
    output = fields.String()


class ConsoleQuerySchema(StrictSchema):
    max_bytes = fields.Integer(load_default=65536,
                               validate=validate.Range(min=1, max=1024 * 1024))


class HostSchema(Schema):
    name = fields.String()
    arch = fields.String()
    virt_type = fields.String()
    vcpus = fields.Integer()
    memory_mb = fields.Integer()
    disk_gb = fields.Integer()
    used_vcpus = fields.Integer()
    used_memory_mb = fields.Integer()
    used_disk_gb = fields.Integer()
    alive = fields.Boolean()
    enabled = fields.Boolean()
    maintenance = fields.Boolean()
    labels = fields.Dict(keys=fields.String(), values=fields.String())
    cached_images = fields.List(fields.String())
    load = fields.Float()
    last_heartbeat = fields.DateTime(allow_none=True)


class EventSchema(Schema):
    id = fields.Integer()
    type = fields.String()
    ts = fields.DateTime()
    vm_id = fields.String()
    job_id = fields.String()
    host = fields.String(attribute="host_name")
    data = fields.Dict()
