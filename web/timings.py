"""How long each step of a VM's latest build took, read back from its events.

Owns the reading of the event log into steps: `placement` (the request: placement, claim
and store writes, from the VM row to its `building` event), `queued` (the build message on
its way to the host), the host's build steps (image, overlay, seed, define, start: each
from its own vm.build.step event to the next step, or to build done/failed), and `boot`
(domain started until cloud-init finished: the host's own measure from vm.ready when it
sent one). A build retried on another host starts its steps again; a rebuild is a build
(without placement). Read-only: never writes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet import contract as c
from fleet.store.models import VM, Event

BUILD_ENDS = (c.EV_BUILD_DONE, c.EV_ACTION_DONE)
FAILS = (c.EV_BUILD_FAILED, c.EV_ACTION_FAILED)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _secs(start: datetime, end: datetime) -> float:
    return round(max(0.0, (_aware(end) - _aware(start)).total_seconds()), 3)


def _is_build_start(ev: Event) -> bool:
    data = ev.data or {}
    return ev.type == c.EV_STATE and data.get("state") == "building" \
        and data.get("action") in (None, "rebuild")


def _step(name: str, at: datetime, seconds: float | None = None,
          failed: bool = False) -> dict[str, Any]:
    return {"step": name, "at": _aware(at), "seconds": seconds, "failed": failed}


def timings(session: Session, vm: VM) -> list[dict[str, Any]]:
    """[{step, at, seconds, failed}] of the VM's latest build; `seconds` is None while the
    step runs (or when the build ended without saying how)."""
    events = list(session.scalars(select(Event).where(Event.vm_id == vm.id)
                                  .order_by(Event.id)))
    starts = [i for i, ev in enumerate(events) if _is_build_start(ev)]
    if not starts:
        return []
    anchor = events[starts[-1]]
    out: list[dict[str, Any]] = []
    if (anchor.data or {}).get("action") is None and starts[-1] == starts[0]:
        out.append(_step("placement", vm.created_at, _secs(vm.created_at, anchor.ts)))
    head = len(out)
    out.append(_step("queued", anchor.ts))
    job_id = anchor.job_id
    started_at: datetime | None = None
    for ev in events[starts[-1] + 1:]:
        open_ = out[-1] if out and out[-1]["seconds"] is None else None
        if started_at is None and ev.job_id == job_id:
            step = (ev.data or {}).get("step", "")
            if ev.type == c.EV_BUILD_STEP and step in c.BUILD_STEPS:
                if any(s["step"] == step for s in out[head + 1:]):
                    del out[head + 1:]  # retried on another host: its steps start again
                    open_ = None
                if open_ is not None:
                    open_["seconds"] = _secs(open_["at"], ev.ts)
                out.append(_step(step, ev.ts))
            elif ev.type in BUILD_ENDS:
                if open_ is not None:
                    open_["seconds"] = _secs(open_["at"], ev.ts)
                started_at = ev.ts
                out.append(_step("boot", ev.ts))
            elif ev.type in FAILS and open_ is not None:
                open_["seconds"], open_["failed"] = _secs(open_["at"], ev.ts), True
        elif started_at is not None and ev.type in (c.EV_VM_READY, c.EV_GUEST_FAILED):
            boot = out[-1]
            measured = (ev.data or {}).get("boot_seconds")
            boot["seconds"] = round(float(measured), 3) \
                if isinstance(measured, int | float) and not isinstance(measured, bool) \
                else _secs(started_at, ev.ts)
            boot["failed"] = ev.type == c.EV_GUEST_FAILED
            break
    return out
