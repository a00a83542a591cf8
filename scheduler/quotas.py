"""Project quotas: what a project uses, and the check done in the same transaction as the
claim (the project row is locked first, so two requests cannot both pass the last unit)."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.orm import Session

from fleet.exceptions import Conflict
from fleet.store.fast import FastStatement
from fleet.store.models import VM, Project

LIMITS = (("max_instances", "instances"), ("max_vcpus", "vcpus"),
          ("max_memory_mb", "memory_mb"), ("max_disk_gb", "disk_gb"))


class QuotaExceeded(Conflict):
    """The request would take the project above one of its quotas."""


def usage(session: Session | Connection, project_id: int) -> dict[str, int]:
    row = session.execute(
        select(func.count(VM.id), func.coalesce(func.sum(VM.vcpus), 0),
               func.coalesce(func.sum(VM.memory_mb), 0), func.coalesce(func.sum(VM.disk_gb), 0))
        .where(VM.project_id == project_id)).one()
    return {"instances": int(row[0]), "vcpus": int(row[1]), "memory_mb": int(row[2]),
            "disk_gb": int(row[3])}


_LIMITS = FastStatement(
    select(*(getattr(Project, attr) for attr, _ in LIMITS))
    .where(Project.id == bindparam("project_id")).with_for_update(), ("project_id",))
"""The project's limits, its row locked (PostgreSQL): in every create's write transaction,
so compiled once and run on the driver's connection (fleet/store/fast.py)."""


def check(session: Session | Connection, project_id: int, *, vcpus: int, memory_mb: int,
          disk_gb: int, count: int = 1) -> None:
    """Raise QuotaExceeded if `count` VMs of this size do not fit the project's quotas."""
    conn = session if isinstance(session, Connection) else session.connection()
    row = _LIMITS.execute(conn, {"project_id": project_id}).fetchone()
    if row is None:
        raise Conflict("the project is gone")
    limits = {name: row[i] for i, (_, name) in enumerate(LIMITS)}
    if all(v is None for v in limits.values()):
        return
    used = usage(conn, project_id)
    want = {"instances": count, "vcpus": vcpus * count, "memory_mb": memory_mb * count,
            "disk_gb": disk_gb * count}
    over = {name: {"limit": limit, "used": used[name], "requested": want[name]}
            for name, limit in limits.items()
            if limit is not None and used[name] + want[name] > limit}
    if over:
        names = ", ".join(over)
        raise QuotaExceeded(f"project quota exceeded for {names}", {"quota": over})
