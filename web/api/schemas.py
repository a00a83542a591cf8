"""marshmallow schemas of the API: what requests may carry (unknown fields rejected) and
what responses show. One success schema per endpoint."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from fleet.contract import NAME_RE

# marshmallow str.format()s these messages: braces are doubled.
NAME = validate.Regexp(NAME_RE, error="must match ^[a-z0-9][a-z0-9-]{{0,62}}$ "
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
    count = fields.Integer(strict=True, load_default=1,
                           validate=validate.Range(min=1, max=100,
                                                   error="must be between 1 and 100"),
                           metadata={"description": "create N VMs named <name>-1..<name>-N, "
                                                    "all or nothing"})
    server_group = fields.String(load_default=None, validate=validate.Length(min=1, max=63),
                                 metadata={"description": "server group id or name"})
    constraints = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=63)),
                              values=fields.String(validate=validate.Length(max=63)),
                              load_default=dict,
                              metadata={"description": "host labels required, e.g. "
                                                       "{\"zone\": \"rack1\"}"})


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
    constraints = fields.Dict()
    server_group = fields.Function(lambda vm: vm.server_group_id)
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
    vm = fields.Nested(VMSchema, metadata={"description": "the (first) VM"})
    job = fields.Nested(JobSchema, metadata={"description": "its build job"})
    vms = fields.List(fields.Nested(VMSchema), metadata={"description": "all VMs (count)"})
    jobs = fields.List(fields.Nested(JobSchema))


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
    cpu_ratio = fields.Float(allow_none=True)
    ram_ratio = fields.Float(allow_none=True)
    disk_ratio = fields.Float(allow_none=True)
    max_vms = fields.Integer(allow_none=True)
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


LABEL_KEY = validate.Regexp(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z", error="label keys must match "
                            "^[a-z0-9][a-z0-9_.-]{{0,62}}$")
LABEL_VALUE = validate.Length(max=63)


class HostUpdateSchema(StrictSchema):
    enabled = fields.Boolean()
    maintenance = fields.Boolean()
    labels = fields.Dict(keys=fields.String(validate=LABEL_KEY),
                         values=fields.String(validate=LABEL_VALUE))
    cpu_ratio = fields.Float(allow_none=True, validate=validate.Range(min=0.01, max=100))
    ram_ratio = fields.Float(allow_none=True, validate=validate.Range(min=0.01, max=100))
    disk_ratio = fields.Float(allow_none=True, validate=validate.Range(min=0.01, max=100))
    max_vms = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=0))


class EvacuationSchema(Schema):
    host = fields.String()
    moved = fields.List(fields.Dict())
    not_moved = fields.List(fields.Dict())


class ServerGroupCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)
    policy = fields.String(required=True, validate=validate.OneOf(["affinity",
                                                                    "anti-affinity"]))
    hard = fields.Boolean(load_default=True)


class ServerGroupSchema(Schema):
    id = fields.String()
    name = fields.String()
    policy = fields.String()
    hard = fields.Boolean()
    members = fields.List(fields.Dict())
    created_at = fields.DateTime()


class QuotaUpdateSchema(StrictSchema):
    max_instances = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=0))
    max_vcpus = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=0))
    max_memory_mb = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=0))
    max_disk_gb = fields.Integer(strict=True, allow_none=True, validate=validate.Range(min=0))


class ProjectSchema(Schema):
    name = fields.String()
    max_instances = fields.Integer(allow_none=True)
    max_vcpus = fields.Integer(allow_none=True)
    max_memory_mb = fields.Integer(allow_none=True)
    max_disk_gb = fields.Integer(allow_none=True)
    usage = fields.Dict()
