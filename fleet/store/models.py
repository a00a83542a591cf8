"""SQLAlchemy 2 models of everything the control plane remembers.

Owns table and column definitions only: no policy, no queries beyond relationships.
Capacity is counted in vCPUs, MiB of memory and GiB of disk.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    # Quotas; None means unlimited. Checked in the same transaction as the claim.
    max_instances: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_vcpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_disk_gb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    project: Mapped[Project] = relationship()


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(63), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    user: Mapped[User] = relationship()


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    arch: Mapped[str] = mapped_column(String(16), default="x86_64")
    virt_type: Mapped[str] = mapped_column(String(8), default="qemu")
    vcpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    disk_gb: Mapped[int] = mapped_column(Integer, default=0)
    used_vcpus: Mapped[int] = mapped_column(Integer, default=0)
    used_memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    used_disk_gb: Mapped[int] = mapped_column(Integer, default=0)
    cpu_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    ram_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    disk_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_vms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    alive: Mapped[bool] = mapped_column(Boolean, default=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cached_images: Mapped[list[Any]] = mapped_column(default=list)
    load: Mapped[float] = mapped_column(Float, default=0.0)
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    visibility: Mapped[str] = mapped_column(String(8), default="private")
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    virtual_size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_format: Mapped[str] = mapped_column(String(8), default="qcow2")
    original_format: Mapped[str] = mapped_column(String(8), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")
    """importing -> active, or error (with status_reason)."""
    status_reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ServerGroup(Base):
    __tablename__ = "server_groups"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    policy: Mapped[str] = mapped_column(String(16))  # affinity | anti-affinity
    hard: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VM(Base):
    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    user_data: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16), default="pending")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    failed_step: Mapped[str] = mapped_column(String(32), default="")
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    alternates: Mapped[list[Any]] = mapped_column(default=list)
    constraints: Mapped[dict[str, Any]] = mapped_column(default=dict)
    server_group_id: Mapped[str | None] = mapped_column(ForeignKey("server_groups.id"),
                                                        nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    mac: Mapped[str] = mapped_column(String(17), default="")
    addresses: Mapped[list[Any]] = mapped_column(default=list)
    """IP addresses as last reported by the host: [{"ip", "prefix", "source"}]."""
    network_id: Mapped[str | None] = mapped_column(
        ForeignKey("networks.id", name="fk_vms_network_id_networks"), nullable=True)
    """The fleet network of its NIC; None: the host's default network."""
    address_mode: Mapped[str] = mapped_column(String(8), default="dhcp")
    """dhcp | static (an address of the network's static pool, held in ip_allocations)."""
    static_address: Mapped[str] = mapped_column(String(39), default="")
    keypairs: Mapped[list[Any]] = mapped_column(default=list)
    """Names of the project's keypairs given at creation."""
    ssh_keys: Mapped[list[Any]] = mapped_column(default=list)
    """Their public keys as they were at creation: every (re)build of the VM gets these."""
    ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """When cloud-init finished the first boot (vm.ready); None until then, and again after
    a rebuild."""
    boot_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Domain start -> cloud-init finished, as the host measured it."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    host: Mapped[Host | None] = relationship()
    image: Mapped[Image] = relationship()
    project: Mapped[Project] = relationship()
    network: Mapped[Network | None] = relationship()


class Keypair(Base):
    """An SSH public key a project imported, given to VMs by name."""

    __tablename__ = "keypairs"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(63))
    public_key: Mapped[str] = mapped_column(Text)
    """One line, "<type> <base64> [comment]", as validated by fleet.sshkeys."""
    fingerprint: Mapped[str] = mapped_column(String(64))
    """"SHA256:<base64 of the sha256 of the key blob, no padding>", as ssh-keygen -l."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Network(Base):
    """A fleet network: realised on each host as libvirt network vf-<name> (nat, isolated)
    or an existing host bridge (bridge). Fleet-wide; admins create and delete them."""

    __tablename__ = "networks"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    mode: Mapped[str] = mapped_column(String(16))
    """nat | isolated | bridge"""
    bridge: Mapped[str] = mapped_column(String(15), default="")
    cidr: Mapped[str] = mapped_column(String(43))
    gateway: Mapped[str] = mapped_column(String(39))
    dns: Mapped[list[Any]] = mapped_column(default=list)
    dhcp_start: Mapped[str] = mapped_column(String(39), default="")
    dhcp_end: Mapped[str] = mapped_column(String(39), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IPAllocation(Base):
    """A static address held by a VM. The primary key (network_id, address) is what makes
    one holder per address fleet-wide: concurrent inserts of the same address lose to the
    database, not to a check in Python (scheduler.ipam)."""

    __tablename__ = "ip_allocations"
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), primary_key=True)
    address: Mapped[str] = mapped_column(String(39), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Snapshot(Base):
    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("vm_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16), default="creating")
    """creating -> ready, deleting -> gone, or error."""
    state_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Claim(Base):
    __tablename__ = "claims"
    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(36), unique=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    vm_id: Mapped[str] = mapped_column(String(36), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    step: Mapped[str] = mapped_column(String(32), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    host_name: Mapped[str] = mapped_column(String(63), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    type: Mapped[str] = mapped_column(String(32))
    vm_id: Mapped[str] = mapped_column(String(36), default="", index=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    job_id: Mapped[str] = mapped_column(String(36), default="")
    host_name: Mapped[str] = mapped_column(String(63), default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
