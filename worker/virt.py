"""libvirt access: the only module in virtfleet that imports ``libvirt``.

Owns: a lazily (re)opened connection (:class:`Virt`) with idempotent domain
define/start and destroy/undefine, domain state and listing, host capacity, making a
libvirt network active, and the lifecycle event listener (:class:`LifecycleListener`).
Every libvirt failure leaves this module as :class:`VirtError` with a clean message.

Must not: build domain XML (see ``worker.domain``), touch image files, or decide what
a VM should be; callers pass finished XML and UUIDs.
"""

from __future__ import annotations

import logging
import platform
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import libvirt

from worker.domain import NS

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default; errors reach callers as VirtError.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class VirtError(Exception):
    """A libvirt call failed. ``code`` is libvirt's error code (``VIR_ERR_*``), if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def _errors(op: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        msg = exc.get_error_message() or str(exc)
        raise VirtError(f"{op}: {msg}", exc.get_error_code()) from None


def _code(exc: libvirt.libvirtError) -> int:
    return exc.get_error_code()


STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
"""libvirt domain state codes -> the names :meth:`Virt.state` returns."""

_UNDEFINE_FLAG_SETS = (
    (
        "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
        "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
        "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA",
        "VIR_DOMAIN_UNDEFINE_NVRAM",
    ),
    ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"),
    (),
)
"""Undefine flags, richest first; drivers that reject a set (the test driver) get the next."""


def _flags(names: tuple[str, ...]) -> int:
    value = 0
    for name in names:
        value |= getattr(libvirt, name, 0)
    return value


def _uuid_of(xml: str) -> str:
    try:
        uuid = ET.fromstring(xml).findtext("uuid")
    except ET.ParseError as exc:
        raise ValueError(f"invalid domain XML: {exc}") from None
    if not uuid:
        raise ValueError("domain XML must carry a <uuid> (needed for idempotent defines)")
    return uuid.strip()


def _parse_metadata(xml: str) -> dict[str, str | None]:
    # libvirt hands the element back without its namespace; accept both forms.
    root = ET.fromstring(xml)

    def field(tag: str) -> str | None:
        text = root.findtext(f"{{{NS}}}{tag}")
        if text is None:
            text = root.findtext(tag)
        return text.strip() if text else None

    return {"vm_id": field("id"), "project": field("project")}


class Virt:
    """One libvirt connection (``uri``), opened on first use and reopened when it drops."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()

    # -- connection ---------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                with suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
            # The event loop must exist before any connection opens: a connection opened
            # earlier never gets keepalive and can hang forever on a stuck daemon.
            _ensure_event_loop()
            with _errors(f"cannot connect to {self.uri}"):
                self._conn = libvirt.open(self.uri)
            return self._conn

    def close(self) -> None:
        """Close the connection (the next call reopens it)."""
        with self._lock:
            if self._conn is not None:
                with suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def __enter__(self) -> Virt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lookup(self, uuid: str) -> libvirt.virDomain | None:
        conn = self._connection()
        try:
            return conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(f"lookup of domain {uuid}: {exc.get_error_message()}",
                            _code(exc)) from None

    # -- host ---------------------------------------------------------------------

    def capacity(self) -> dict[str, Any]:
        """Return ``{vcpus, memory_mb, arch, hostname}`` of the host behind the connection."""
        conn = self._connection()
        with _errors("host capacity"):
            model, memory_mb, cpus = conn.getInfo()[:3]
            hostname = conn.getHostname()
        # Not getCapabilities(): libvirtd re-probes every QEMU binary for it (30 s here).
        return {
            "vcpus": int(cpus),
            "memory_mb": int(memory_mb),
            "arch": platform.machine() if self.uri.startswith("qemu") else model,
            "hostname": hostname,
        }

    def ensure_network_active(self, name: str) -> None:
        """Start and autostart the defined libvirt network ``name`` if it is inactive."""
        conn = self._connection()
        with _errors(f"network {name}"):
            net = conn.networkLookupByName(name)
            if net.isActive():
                return
            net.create()
            net.setAutostart(1)

    # -- domains ------------------------------------------------------------------

    def define_and_start(self, xml: str) -> None:
        """Define the domain in ``xml`` and start it; safe to repeat.

        An existing domain with the same UUID is redefined only while it is not
        running, and started if it is not active.
        """
        uuid = _uuid_of(xml)
        conn = self._connection()
        dom = self._lookup(uuid)
        with _errors(f"define/start of domain {uuid}"):
            if dom is None or not dom.isActive():
                dom = conn.defineXML(xml)
            if not dom.isActive():
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID or not dom.isActive():
                        raise

    def destroy_and_undefine(self, uuid: str) -> bool:
        """Stop and forget domain ``uuid``; return False if it did not exist."""
        dom = self._lookup(uuid)
        if dom is None:
            return False
        with _errors(f"destroy/undefine of domain {uuid}"):
            try:
                if dom.isActive():
                    dom.destroy()
                if not dom.isPersistent():
                    return True
                self._undefine(dom)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return True
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    self._undefine(dom)  # raced with a shutdown; the destroy had no work
                    return True
                raise
        return True

    @staticmethod
    def _undefine(dom: libvirt.virDomain) -> None:
        for names in _UNDEFINE_FLAG_SETS:
            try:
                dom.undefineFlags(_flags(names)) if names else dom.undefine()
                return
            except libvirt.libvirtError as exc:
                if not names or _code(exc) not in (
                    libvirt.VIR_ERR_INVALID_ARG,
                    libvirt.VIR_ERR_NO_SUPPORT,
                ):
                    raise

    def state(self, uuid: str) -> str | None:
        """Return the state name of domain ``uuid`` (see :data:`STATES`), None if absent."""
        dom = self._lookup(uuid)
        if dom is None:
            return None
        try:
            code = dom.state()[0]
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(f"state of domain {uuid}: {exc.get_error_message()}",
                            _code(exc)) from None
        return STATES.get(code, "unknown")

    def list_domains(self) -> list[dict[str, Any]]:
        """Return ``{uuid, name, state, vm_id, project}`` for every domain on the host.

        ``vm_id``/``project`` come from virtfleet's ``<metadata>`` entry (None without one).
        """
        conn = self._connection()
        with _errors("list domains"):
            doms = conn.listAllDomains(0)
        out = []
        for dom in doms:
            try:
                entry: dict[str, Any] = {
                    "uuid": dom.UUIDString(),
                    "name": dom.name(),
                    "state": STATES.get(dom.state()[0], "unknown"),
                }
            except libvirt.libvirtError:
                continue  # vanished while listing
            meta: dict[str, str | None] = {"vm_id": None, "project": None}
            try:
                meta = _parse_metadata(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, 0))
            except (libvirt.libvirtError, ET.ParseError):
                pass
            entry.update(meta)
            out.append(entry)
        return out


# ------------------------------------------------------------------ lifecycle events

_EVENTS: dict[int, tuple[str, tuple[str, ...]]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: (
        "defined", ("added", "updated", "renamed", "from_snapshot")),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: ("undefined", ("removed", "renamed")),
    libvirt.VIR_DOMAIN_EVENT_STARTED: (
        "started", ("booted", "migrated", "restored", "from_snapshot", "wakeup")),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: (
        "suspended",
        ("paused", "migrated", "ioerror", "watchdog", "restored", "from_snapshot",
         "api_error", "postcopy", "postcopy_failed"),
    ),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: (
        "resumed", ("unpaused", "migrated", "from_snapshot", "postcopy", "postcopy_failed")),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: (
        "stopped",
        ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: ("shutdown", ("finished", "guest", "host")),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: ("pmsuspended", ("memory", "disk")),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: ("crashed", ("panicked", "crashloaded")),
}
"""libvirt lifecycle event code -> (event name, detail names indexed by detail code)."""


def event_names(event: int, detail: int) -> tuple[str, str]:
    """Map a libvirt lifecycle ``(event, detail)`` pair to virtfleet's strings."""
    name, details = _EVENTS.get(event, ("unknown", ()))
    return name, details[detail] if 0 <= detail < len(details) else "unknown"


LifecycleCallback = Callable[[str, str, str, str], None]
"""``callback(uuid, name, event, detail)``; runs on the event loop thread, keep it short."""

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it on a daemon thread, once a process."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # keep the loop alive whatever a callback did
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-event-loop", daemon=True).start()
        _loop_started = True


class LifecycleListener:
    """Delivers domain lifecycle events of ``uri`` to ``callback`` from a daemon thread.

    Holds its own connection and reconnects with exponential backoff when it drops.
    ``on_connect`` (optional) runs after every (re)connect, so a caller can resync
    state that changed while no events were seen.
    """

    POLL_SECONDS = 2.0
    """How often a connection is checked for liveness when no close callback fires."""

    def __init__(
        self,
        uri: str,
        callback: LifecycleCallback,
        *,
        on_connect: Callable[[], None] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.uri = uri
        self.callback = callback
        self.on_connect = on_connect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LifecycleListener:
        """Start listening (returns self)."""
        if self._thread is not None:
            raise RuntimeError("listener already started")
        _ensure_event_loop()
        self._thread = threading.Thread(target=self._run, name="libvirt-lifecycle", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close the connection."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        try:
            name, detail_name = event_names(event, detail)
            self.callback(dom.UUIDString(), dom.name(), name, detail_name)
        except Exception:
            log.exception("lifecycle callback failed")

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        log.warning("libvirt connection %s closed (reason %s)", self.uri, reason)
        self._wake.set()

    def _connect(self) -> tuple[Any, int]:
        conn = libvirt.open(self.uri)
        try:
            with suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)  # not supported by local test drivers
            with suppress(libvirt.libvirtError):
                conn.registerCloseCallback(self._on_close, None)
            cb_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
            )
        except libvirt.libvirtError:
            with suppress(libvirt.libvirtError):
                conn.close()
            raise
        return conn, cb_id

    @staticmethod
    def _disconnect(conn: Any, cb_id: int) -> None:
        for step in (
            lambda: conn.domainEventDeregisterAny(cb_id),
            conn.unregisterCloseCallback,
            conn.close,
        ):
            with suppress(libvirt.libvirtError):
                step()

    @staticmethod
    def _alive(conn: Any) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._stopping.is_set():
            try:
                conn, cb_id = self._connect()
            except libvirt.libvirtError as exc:
                log.warning("cannot listen on %s (%s); retrying in %.0fs",
                            self.uri, exc.get_error_message(), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_initial
            self._wake.clear()
            self.connected.set()
            if self.on_connect is not None:
                try:
                    self.on_connect()
                except Exception:
                    log.exception("on_connect hook failed")
            while not self._stopping.is_set():
                self._wake.wait(self.POLL_SECONDS)
                if self._wake.is_set() or not self._alive(conn):
                    break
            self.connected.clear()
            self._disconnect(conn, cb_id)
