"""marshmallow schemas of the API: what requests may carry (unknown fields rejected) and
what responses show. One success schema per endpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from fleet.contract import NAME_RE
from fleet.networks import prefix

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
    disk_format = fields.String(load_default=None, validate=validate.OneOf(["qcow2", "raw"]),
                                metadata={"description": "the format you expect; the file's "
                                                         "header decides, and must agree"})


class ImageUploadQuerySchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)
    visibility = fields.String(load_default="private",
                               validate=validate.OneOf(["private", "public"]))
    disk_format = fields.String(load_default=None, validate=validate.OneOf(["qcow2", "raw"]),
                                metadata={"description": "the format you expect; the file's "
                                                         "header decides, and must agree"})
    virtual_size = fields.Integer(
        load_default=None, validate=validate.Range(min=1),
        metadata={"description": "the disk's size in bytes: required with a sparse body "
                                 "(application/x-virtfleet-sparse), refused otherwise"})


class ImageSchema(Schema):
    id = fields.String()
    name = fields.String()
    project = fields.Function(lambda img: img.project_name)
    visibility = fields.String()
    status = fields.String(metadata={"description": "importing, active or error"})
    status_reason = fields.String()
    sha256 = fields.String(metadata={"description": "of the qcow2 file hosts download (empty "
                                                    "while a raw import is converted)"})
    size_bytes = fields.Integer()
    virtual_size_bytes = fields.Integer()
    disk_format = fields.String()
    original_format = fields.String()
    created_at = fields.DateTime()


class PrewarmSchema(StrictSchema):
    hosts = fields.List(fields.String(validate=NAME), required=True,
                        validate=validate.Length(min=1, max=1000))


class PrewarmAcceptedSchema(Schema):
    image_id = fields.String()
    sha256 = fields.String()
    hosts = fields.List(fields.String())


MAX_VM_KEYPAIRS = 20
"""Keypairs one VM may name."""


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
    keypairs = fields.List(fields.String(validate=NAME), load_default=list,
                           validate=validate.Length(max=MAX_VM_KEYPAIRS),
                           metadata={"description": "names of this project's keypairs: "
                                                    "their public keys go to the guest's "
                                                    "default user"})
    network = fields.String(load_default=None, validate=NAME,
                            metadata={"description": "a fleet network's name; none: the "
                                                     "host's default network"})
    address = fields.String(load_default="dhcp", validate=validate.OneOf(["dhcp", "static"]),
                            metadata={"description": "dhcp, or static: the lowest free "
                                                     "address of the network's static pool "
                                                     "(needs `network`)"})

    @validates_schema
    def _static_needs_a_network(self, data: dict, **kwargs: object) -> None:
        if data.get("address") == "static" and not data.get("network"):
            raise ValidationError("a static address needs a `network` to take it from",
                                  field_name="address")


def vm_addresses(vm: Any) -> list[dict[str, Any]]:
    """The VM's static address first (when it holds one), then what its host reported."""
    seen = [dict(a) for a in (vm.addresses or []) if isinstance(a, dict)]
    if vm.address_mode == "static" and vm.static_address and vm.network is not None:
        seen = [a for a in seen if a.get("ip") != vm.static_address]
        return [{"ip": vm.static_address, "prefix": prefix(vm.network.cidr),
                 "source": "static"}, *seen]
    return seen


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
    network = fields.Function(lambda vm: vm.network.name if vm.network else None,
                              metadata={"description": "its fleet network (null: the host's "
                                                       "default network)"})
    address_mode = fields.String(metadata={"description": "dhcp or static"})
    addresses = fields.Function(
        vm_addresses, metadata={
            "description": "IP addresses: the static one it holds (source `static`), then "
                           "those its host last saw: [{ip, prefix, source}], source `lease` "
                           "(libvirt's DHCP) or `agent` (the guest agent)"})
    keypairs = fields.List(fields.String())
    ready_at = fields.DateTime(allow_none=True, metadata={
        "description": "when cloud-init finished its first boot (state `ready`)"})
    boot_seconds = fields.Float(allow_none=True, metadata={
        "description": "domain start until cloud-init finished, as its host measured it"})
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


class TimingSchema(Schema):
    step = fields.String(metadata={"description": "placement, queued, image, overlay, seed, "
                                                  "define, start, boot"})
    at = fields.DateTime()
    seconds = fields.Float(allow_none=True, metadata={"description": "null while it runs"})
    failed = fields.Boolean()


class VMDetailSchema(VMSchema):
    steps = fields.List(fields.Nested(StepSchema))
    timings = fields.List(fields.Nested(TimingSchema), metadata={
        "description": "how long each step of its latest build took, up to ready"})


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


# -- actions on VMs (web/api/actions.py) ---------------------------------------------------

STOP_TIMEOUT = validate.Range(min=0, max=600, error="must be between 0 and 600 seconds")


class NoArgsSchema(StrictSchema):
    """start, force_off, rebuild: no arguments."""


class StopArgsSchema(StrictSchema):
    timeout = fields.Integer(strict=True, load_default=60, validate=STOP_TIMEOUT,
                             metadata={"description": "seconds to wait for the guest to power "
                                                      "off after the ACPI button before "
                                                      "forcing it off"})


class RebootArgsSchema(StopArgsSchema):
    hard = fields.Boolean(load_default=False,
                          metadata={"description": "power off at once instead of asking the "
                                                   "guest first"})


class ResizeArgsSchema(StrictSchema):
    vcpus = fields.Integer(strict=True, validate=validate.Range(
        min=1, max=128, error="must be between 1 and 128"))
    memory_mb = fields.Integer(strict=True, validate=validate.Range(
        min=64, max=4 * 1024 * 1024, error="must be between 64 and 4194304"))
    disk_gb = fields.Integer(strict=True, validate=validate.Range(
        min=1, max=65536, error="must be between 1 and 65536"),
        metadata={"description": "grow only"})

    @validates_schema
    def _something(self, data: dict, **kwargs: object) -> None:
        if not data:
            raise ValidationError("give at least one of vcpus, memory_mb, disk_gb")


class SnapshotNameSchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)


ACTION_ARGS: dict[str, type[Schema]] = {
    "start": NoArgsSchema,
    "stop": StopArgsSchema,
    "reboot": RebootArgsSchema,
    "force_off": NoArgsSchema,
    "resize": ResizeArgsSchema,
    "snapshot_create": SnapshotNameSchema,
    "snapshot_revert": SnapshotNameSchema,
    "snapshot_delete": SnapshotNameSchema,
    "rebuild": NoArgsSchema,
}
"""The arguments each action takes beside `action` (unknown fields rejected)."""


class ActionSchema(StrictSchema):
    """`{"action": "<name>", ...its arguments}`: validated by the schema of that action
    (like marshmallow-oneofschema), loaded as `{"action": name, "args": {...}}`.

    start, force_off, rebuild: none. stop: timeout. reboot: timeout, hard. resize: vcpus,
    memory_mb, disk_gb (at least one; only while stopped; the disk only grows).
    snapshot_create, snapshot_revert, snapshot_delete: name."""

    # Declared for the API document; load() below validates by action.
    action = fields.String(required=True, validate=validate.OneOf(list(ACTION_ARGS)))
    timeout = fields.Integer(metadata={"description": "stop, reboot: seconds before forcing "
                                                      "the guest off (default 60)"})
    hard = fields.Boolean(metadata={"description": "reboot: power off at once"})
    vcpus = fields.Integer(metadata={"description": "resize"})
    memory_mb = fields.Integer(metadata={"description": "resize"})
    disk_gb = fields.Integer(metadata={"description": "resize (grow only)"})
    name = fields.String(metadata={"description": "snapshot_create, snapshot_revert, "
                                                  "snapshot_delete"})

    def load(self, data, *, many=None, partial=None, unknown=None):  # type: ignore[no-untyped-def, override]
        if not isinstance(data, Mapping):
            raise ValidationError({"_schema": ["the body must be a JSON object"]})
        action = data.get("action")
        schema = ACTION_ARGS.get(action) if isinstance(action, str) else None
        if schema is None:
            raise ValidationError({"action": ["must be one of: " + ", ".join(ACTION_ARGS)]})
        args = schema().load({k: v for k, v in data.items() if k != "action"})
        return {"action": action, "args": args}


class SnapshotSchema(Schema):
    name = fields.String()
    state = fields.String(metadata={"description": "creating -> ready; deleting -> gone; "
                                                   "error (see state_reason)"})
    state_reason = fields.String()
    created_at = fields.DateTime()


# -- keypairs (web/api/keypairs.py) and networks (web/api/networks.py) -----------------------


class KeypairCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)
    public_key = fields.String(required=True, validate=validate.Length(min=1, max=16384),
                               metadata={"description": "one line of an OpenSSH .pub file: "
                                                        "ssh-ed25519, ssh-rsa (>= 2048 bits) "
                                                        "or ecdsa-sha2-nistp256/384/521"})


class KeypairSchema(Schema):
    id = fields.String()
    name = fields.String()
    type = fields.Function(lambda kp: kp.public_key.split(" ", 1)[0])
    fingerprint = fields.String(metadata={"description": "SHA256:..., as ssh-keygen -l"})
    public_key = fields.String()
    created_at = fields.DateTime()


class NetworkCreateSchema(StrictSchema):
    name = fields.String(required=True, validate=NAME)
    mode = fields.String(required=True, validate=validate.OneOf(["nat", "isolated", "bridge"]),
                         metadata={"description": "nat or isolated (a libvirt network on each "
                                                  "host), bridge (an existing host bridge)"})
    cidr = fields.String(required=True, validate=validate.Length(min=1, max=43),
                         metadata={"description": "IPv4, /16 to /29, e.g. 10.77.0.0/24"})
    gateway = fields.String(load_default=None, validate=validate.Length(min=1, max=39),
                            metadata={"description": "default: the first address (required "
                                                     "for bridge: the LAN's router)"})
    dns = fields.List(fields.String(validate=validate.Length(min=1, max=39)),
                      load_default=None,
                      metadata={"description": "resolvers (at most 3); default: the gateway "
                                               "(nat, isolated), none (bridge)"})
    bridge = fields.String(load_default=None, validate=validate.Length(min=1, max=15),
                           metadata={"description": "mode bridge only: the host bridge"})
    dhcp_start = fields.String(load_default=None, validate=validate.Length(min=1, max=39),
                               metadata={"description": "default: the upper half of the cidr "
                                                        "(nat, isolated); for bridge, the "
                                                        "LAN's own range, kept out of the "
                                                        "static pool"})
    dhcp_end = fields.String(load_default=None, validate=validate.Length(min=1, max=39))


class NetworkSchema(Schema):
    id = fields.String()
    name = fields.String()
    mode = fields.String()
    bridge = fields.String()
    cidr = fields.String()
    gateway = fields.String()
    dns = fields.List(fields.String())
    dhcp_start = fields.String()
    dhcp_end = fields.String()
    static_pool = fields.List(fields.Dict(), metadata={
        "description": "ranges of static addresses: [{start, end}]"})
    static_total = fields.Integer()
    static_held = fields.Integer()
    vms = fields.Integer(metadata={"description": "VMs attached to it"})
    created_at = fields.DateTime()
