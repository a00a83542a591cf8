"""Ready detection: a VM is ``ready`` when cloud-init has finished its first boot, and the host
learns it from the VM's serial console log.

How: the control plane's user-data carries a part that runs when cloud-init has finished
and prints one line, :data:`fleet.contract.READY_MARKER` followed by cloud-init's
``result.json``, on the serial console. libvirt already writes every domain's serial
console to ``<instance dir>/console.log`` (see ``worker.domain``); this module watches that
file for the line, parses it with :func:`fleet.userdata.parse_ready_line`, and sends
``vm.ready`` (``boot_seconds`` from the domain's start to the line, ``result``) or
``vm.guest.failed`` (``reason``, ``result``) through the worker's ``emit``.

Why the console: it needs no network path from the guest to the control plane (guests on
isolated networks, or a control plane the tenants must not reach), no guest agent in the
image, and nothing listening for guests; it is a file the host writes anyway, and the same
line is what an operator sees in ``GET /vms/<id>/console``. The cost is a poll of a few
files: one thread (:class:`ReadyWatcher`) looks at every watched log every
``interval`` seconds and reads only the bytes added since its last look.

What counts: only output written after the domain's start by the current build. The log is
kept across rebuilds and power cycles (libvirt appends), so before a build starts the domain
:meth:`ReadyWatcher.prepare` records the log's size (and inode) in ``<instance
dir>/ready.json``; the watcher reads from there. A shrunk or replaced log (rotated by
virtlogd) is read from its start. The outcome is recorded in the same file, so a worker that
restarts re-sends it (the control plane ignores it unless the VM is ``running``) and keeps
watching VMs that had not printed the line yet (:meth:`ReadyWatcher.resume`).

A watch ends at the first marker line, when the VM is deleted or rebuilt
(:meth:`ReadyWatcher.unwatch`, :meth:`ReadyWatcher.prepare`), or ``ready_timeout`` seconds
after the start (0: never): then it sends EV_READY_TIMEOUT (recorded like an outcome), and the
control plane leaves the VM ``running`` with a reason (an image without cloud-init, or without
a console on ttyS0).

Must not: talk to libvirt (the caller says which domains run), connect to guests, or open
the store.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import contract as c
from worker.domain import instance_paths

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.3
"""Seconds between two looks at the watched console logs."""

READ_CHUNK = 1024 * 1024
"""Most bytes read from one log per look (a chatty guest is caught up over several looks)."""

MAX_LINE = 256 * 1024
"""Longest partial line kept between looks; a longer one without the marker is dropped."""

MARKER = c.READY_MARKER.encode()

ParseReady = Callable[[str], tuple[bool, str, Any]]
"""parse(line) -> (ok, reason, result): :func:`fleet.userdata.parse_ready_line`'s shape."""

Emit = Callable[..., None]
"""emit(event_type, vm_id=..., **data), as the worker's."""


def _parse_ready_line(line: str) -> tuple[bool, str, Any]:
    from fleet.userdata import parse_ready_line  # the control plane's half of the contract

    return parse_ready_line(line)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_state(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass
class _Watch:
    vm_id: str
    log: Path
    state: Path
    offset: int
    ino: int | None
    started: float | None
    deadline: float | None
    buf: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    reason: str
    result: Any
    seen_at: float


class ReadyWatcher:
    """Watches the console logs of freshly started VMs for the ready line (one thread).

    ``emit`` sends events; ``storage_dir`` is the host's; ``timeout`` is ``ready_timeout``
    (seconds, 0 = never); ``parse`` and ``clock`` (wall clock) are for tests.
    """

    def __init__(self, emit: Emit, storage_dir: Path, timeout: float = 900.0,
                 interval: float = POLL_INTERVAL, parse: ParseReady | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.emit = emit
        self.storage_dir = Path(storage_dir)
        self.timeout = float(timeout)
        self.interval = interval
        self.parse = parse or _parse_ready_line
        self.clock = clock
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what builds and deletes call ---------------------------------------------------

    def prepare(self, vm_id: str) -> None:
        """Before a build starts the domain: forget any earlier boot's watch and outcome, and
        note where this boot's output will begin in the console log."""
        paths = instance_paths(self.storage_dir, vm_id)
        with self._lock:
            self._watches.pop(vm_id, None)
            try:
                st = os.stat(paths.console)
                offset, ino = st.st_size, st.st_ino
            except FileNotFoundError:
                offset, ino = 0, None
            _write_state(paths.ready, {"boot": uuidlib.uuid4().hex, "offset": offset,
                                       "ino": ino, "started": None})

    def watch(self, vm_id: str, started: float | None = None) -> None:
        """After a build started the domain (at wall-clock ``started``): watch its console
        from where :meth:`prepare` said this boot begins (the log's start without it)."""
        paths = instance_paths(self.storage_dir, vm_id)
        with self._lock:
            state = _read_state(paths.ready) or {"boot": uuidlib.uuid4().hex, "offset": 0,
                                                 "ino": None, "started": None}
            if started is not None:
                state["started"] = started
                state.pop("outcome", None)
                _write_state(paths.ready, state)
            self._add_locked(vm_id, state)

    def unwatch(self, vm_id: str) -> None:
        """Stop watching ``vm_id`` (it is being deleted or rebuilt); nothing is sent for it
        after this returns."""
        with self._lock:
            self._watches.pop(vm_id, None)

    def watching(self) -> set[str]:
        """The VMs watched now."""
        with self._lock:
            return set(self._watches)

    def resume(self, running: Iterable[str]) -> None:
        """After a worker (re)start, for the VMs whose domains run: send the recorded
        outcome again, or keep watching from where this boot began."""
        for vm_id in running:
            try:
                paths = instance_paths(self.storage_dir, vm_id)
            except ValueError:
                continue  # not a virtfleet VM id
            with self._lock:
                if vm_id in self._watches:
                    continue
                state = _read_state(paths.ready)
                outcome = (state or {}).get("outcome")
                if not outcome:
                    if state is None and not paths.dir.exists():
                        continue  # not built by this host's worker
                    self._add_locked(vm_id, state or {"offset": 0, "ino": None,
                                                      "started": None})
                    continue
            self._send(vm_id, outcome)

    # -- the thread ---------------------------------------------------------------------

    def start(self, running: Callable[[], Iterable[str]] | None = None) -> ReadyWatcher:
        """Run the watcher thread; it first calls :meth:`resume` with ``running()``."""
        def run() -> None:
            if running is not None:
                try:
                    self.resume(running())
                except Exception:  # noqa: BLE001 - watching new builds matters more
                    log.exception("resuming ready watches failed")
            while not self._stop.wait(self.interval):
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - the next look tries again
                    log.exception("watching console logs failed")

        self._thread = threading.Thread(target=run, name="ready-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poll(self) -> None:
        """One look at every watched log (the thread's round; tests call it directly)."""
        with self._lock:
            watches = list(self._watches.values())
        for w in watches:
            try:
                outcome = self._read(w)
            except OSError as exc:
                log.warning("console log of VM %s cannot be read: %s", w.vm_id, exc)
                outcome = None
            if outcome is not None:
                self._finish(w, outcome)
            elif w.deadline is not None and self.clock() >= w.deadline:
                log.warning("VM %s printed no ready line within %g s of its start; "
                            "no longer watching its console", w.vm_id, self.timeout)
                self._finish(w, None)

    # -- internals ----------------------------------------------------------------------

    def _add_locked(self, vm_id: str, state: dict[str, Any]) -> None:
        paths = instance_paths(self.storage_dir, vm_id)
        started = state.get("started")
        deadline = None
        if self.timeout > 0:
            deadline = (started if started is not None else self.clock()) + self.timeout
        self._watches[vm_id] = _Watch(
            vm_id=vm_id, log=paths.console, state=paths.ready,
            offset=int(state.get("offset") or 0), ino=state.get("ino"),
            started=started, deadline=deadline)

    def _read(self, w: _Watch) -> _Outcome | None:
        """Read what was added to ``w``'s log; the outcome if a whole marker line is in."""
        try:
            fh = w.log.open("rb")
        except FileNotFoundError:
            return None
        with fh:
            st = os.fstat(fh.fileno())
            if (w.ino is not None and st.st_ino != w.ino) or st.st_size < w.offset:
                w.offset = 0  # rotated or truncated: the new file holds the newest output
                w.buf.clear()
            w.ino = st.st_ino
            fh.seek(w.offset)
            data = fh.read(READ_CHUNK)
        if not data:
            return None
        w.offset += len(data)
        w.buf += data
        # When a line in it was written: at the latest the file's last change (which may be
        # well before this look, e.g. for a worker that restarted), at the latest now.
        seen_at = min(self.clock(), st.st_mtime)
        while True:
            end = w.buf.find(b"\n")
            if end < 0:
                break
            line = bytes(w.buf[:end])
            del w.buf[:end + 1]
            at = line.find(MARKER)
            if at >= 0:
                return self._outcome(line[at:], seen_at)
        if len(w.buf) > MAX_LINE:
            at = w.buf.find(MARKER)
            if at < 0 or len(w.buf) - at > MAX_LINE:
                # keep a tail that may hold the start of a marker cut in two
                del w.buf[:len(w.buf) - (len(MARKER) - 1)]
            else:
                del w.buf[:at]
        return None

    def _outcome(self, raw: bytes, seen_at: float) -> _Outcome:
        line = raw.decode("utf-8", errors="replace").strip()
        try:
            ok, reason, result = self.parse(line)
        except Exception as exc:  # noqa: BLE001 - a garbled line is the guest's failure
            return _Outcome(False, f"the guest's ready line cannot be read: {exc}", None,
                            seen_at)
        return _Outcome(bool(ok), str(reason or ""), result, seen_at)

    def _finish(self, w: _Watch, outcome: _Outcome | None) -> None:
        """Stop watching `w` with its outcome (None: the deadline passed), recorded in its
        ready.json (a restarted worker does not watch it again) and sent."""
        if outcome is None:
            data: dict[str, Any] = {"type": c.EV_READY_TIMEOUT, "seconds": self.timeout}
        elif outcome.ok:
            data = {"type": c.EV_VM_READY, "result": outcome.result, "boot_seconds": None}
            if w.started is not None:
                data["boot_seconds"] = round(max(0.0, outcome.seen_at - w.started), 3)
        else:
            data = {"type": c.EV_GUEST_FAILED, "reason": outcome.reason,
                    "result": outcome.result}
        with self._lock:
            if self._watches.get(w.vm_id) is not w:
                return  # unwatched (deleted, rebuilt) while we read
            del self._watches[w.vm_id]
            state = _read_state(w.state)
            if state is not None:
                state["outcome"] = data
                try:
                    _write_state(w.state, state)
                except OSError as exc:
                    log.warning("outcome of VM %s not recorded: %s", w.vm_id, exc)
        if outcome is not None:
            log.info("VM %s: %s", w.vm_id, "ready" if outcome.ok
                     else f"cloud-init failed ({outcome.reason})")
        self._send(w.vm_id, data)

    def _send(self, vm_id: str, data: dict[str, Any]) -> None:
        data = dict(data)
        type_ = data.pop("type")
        try:
            self.emit(type_, vm_id=vm_id, **data)
        except Exception:  # noqa: BLE001 - re-sent from ready.json when the worker restarts
            log.exception("sending %s for VM %s failed", type_, vm_id)
