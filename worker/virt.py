"""libvirt access: the only module in virtfleet that imports ``libvirt``.

Owns: a lazily (re)opened connection (:class:`Virt`) with idempotent domain
define/start and destroy/undefine, domain state and listing, host capacity, libvirt
networks (define, start, read back, remove), and the lifecycle event listener
(:class:`LifecycleListener`). Every libvirt failure leaves this module as
:class:`VirtError` with a clean message.

Must not: build domain or network XML (see ``worker.domain``, ``worker.networks``), touch
image files, or decide what a VM should be; callers pass finished XML and UUIDs.
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

    def ensure_network_active(self, name: str) -> bool:
        """Start and autostart the defined libvirt network ``name`` if it is inactive; True
        if this call started it. Safe when another caller starts it at the same moment."""
        conn = self._connection()
        with _errors(f"network {name}"):
            net = conn.networkLookupByName(name)
            if net.isActive():
                return False
            started = True
            try:
                net.create()
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID or not net.isActive():
                    raise
                started = False
            net.setAutostart(1)
            return started

    def _network(self, name: str) -> libvirt.virNetwork | None:
        conn = self._connection()
        try:
            return conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise VirtError(f"lookup of network {name}: {exc.get_error_message()}",
                            _code(exc)) from None

    def network_xml(self, name: str) -> str | None:
        """The persistent definition of libvirt network ``name``; None if it does not exist."""
        net = self._network(name)
        if net is None:
            return None
        # The test driver knows no INACTIVE flag; its live XML says the same.
        for flags in (libvirt.VIR_NETWORK_XML_INACTIVE, 0):
            try:
                return str(net.XMLDesc(flags))
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_NETWORK:
                    return None
                if flags and _code(exc) in (libvirt.VIR_ERR_INVALID_ARG,
                                            libvirt.VIR_ERR_NO_SUPPORT):
                    continue
                raise VirtError(f"XML of network {name}: {exc.get_error_message()}",
                                _code(exc)) from None
        return None  # not reached

    def network_names(self) -> list[str]:
        """Names of every libvirt network of the host (active or not)."""
        conn = self._connection()
        with _errors("list networks"):
            return sorted(str(net.name()) for net in conn.listAllNetworks(0))

    def network_state(self, name: str) -> dict[str, bool] | None:
        """``{active, autostart, persistent}`` of libvirt network ``name``; None if absent."""
        net = self._network(name)
        if net is None:
            return None
        with _errors(f"state of network {name}"):
            try:
                return {"active": bool(net.isActive()), "autostart": bool(net.autostart()),
                        "persistent": bool(net.isPersistent())}
            except libvirt.libvirtError as exc:
                # Removed between the lookup and the query (a host's removal racing us).
                if _code(exc) == libvirt.VIR_ERR_NO_NETWORK:
                    return None
                raise

    def define_network(self, xml: str) -> bool:
        """Define a persistent libvirt network from finished ``xml`` (not started).

        Returns False, without changing anything, when a network of that name exists
        already (another build defined it first); any other failure is a VirtError."""
        conn = self._connection()
        try:
            conn.networkDefineXML(xml)
        except libvirt.libvirtError as exc:
            msg = exc.get_error_message() or str(exc)
            if _code(exc) == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in msg:
                return False
            raise VirtError(f"define of network: {msg}", _code(exc)) from None
        return True

    def remove_network(self, name: str) -> bool:
        """Stop and undefine libvirt network ``name``; False if it did not exist."""
        net = self._network(name)
        if net is None:
            return False
        with _errors(f"removal of network {name}"):
            try:
                if net.isActive():
                    net.destroy()
                if net.isPersistent():
                    net.undefine()
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_NETWORK:
                    raise
        return True

    def _all_domains(self) -> list[libvirt.virDomain]:
        conn = self._connection()
        with _errors("list domains"):
            return list(conn.listAllDomains(0))

    def domains_on_network(self, name: str) -> list[str]:
        """Names of the domains (running or not) with an interface on libvirt network
        ``name``, from their persistent definitions."""
        out = []
        for dom in self._all_domains():
            try:
                root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                dom_name = str(dom.name())
            except libvirt.libvirtError:
                continue  # vanished while listing
            if any(src.get("network") == name
                   for src in root.findall("./devices/interface[@type='network']/source")):
                out.append(dom_name)
        return sorted(out)

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
        out = []
        for dom in self._all_domains():
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

    # -- actions (start, stop, snapshots, addresses) --------------------------------

    def _domain(self, uuid: str) -> libvirt.virDomain:
        dom = self._lookup(uuid)
        if dom is None:
            raise VirtError(f"domain {uuid} is not defined on this host",
                            libvirt.VIR_ERR_NO_DOMAIN)
        return dom

    def is_active(self, uuid: str) -> bool:
        """Whether domain ``uuid`` runs (False when it is off or absent)."""
        dom = self._lookup(uuid)
        if dom is None:
            return False
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise VirtError(f"state of domain {uuid}: {exc.get_error_message()}",
                            _code(exc)) from None

    def start(self, uuid: str) -> bool:
        """Start defined domain ``uuid``; False if it was already running."""
        dom = self._domain(uuid)
        with _errors(f"start of domain {uuid}"):
            if dom.isActive():
                return False
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID or not dom.isActive():
                    raise
                return False
        return True

    def shutdown(self, uuid: str) -> None:
        """Ask the guest to power off (guest agent if it answers, else the ACPI power
        button); returns at once. A domain already off is left alone."""
        dom = self._domain(uuid)
        with _errors(f"shutdown of domain {uuid}"):
            try:
                dom.shutdown()
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
                    raise

    def destroy(self, uuid: str) -> bool:
        """Power domain ``uuid`` off at once (kept defined); False if it was not running."""
        dom = self._domain(uuid)
        with _errors(f"power off of domain {uuid}"):
            if not dom.isActive():
                return False
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
                    raise
                return False
        return True

    def xml(self, uuid: str, inactive: bool = True) -> str:
        """Domain ``uuid``'s XML: its persistent definition (``inactive``) or the live one."""
        dom = self._domain(uuid)
        with _errors(f"XML of domain {uuid}"):
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))

    def define(self, xml: str) -> None:
        """(Re)define a domain from finished ``xml`` without starting it."""
        uuid = _uuid_of(xml)
        with _errors(f"define of domain {uuid}"):
            self._connection().defineXML(xml)

    def snapshot_create(self, uuid: str, xml: str) -> str:
        """Create a snapshot of domain ``uuid`` from finished ``<domainsnapshot>`` ``xml``;
        returns its state (``running`` with memory, ``shutoff`` disk only)."""
        dom = self._domain(uuid)
        with _errors(f"snapshot of domain {uuid}"):
            snap = dom.snapshotCreateXML(xml, 0)
            state = ET.fromstring(snap.getXMLDesc(0)).findtext("state")
        return (state or "").strip()

    def snapshot_names(self, uuid: str) -> list[str]:
        """Names of domain ``uuid``'s snapshots, oldest first."""
        dom = self._domain(uuid)
        with _errors(f"snapshots of domain {uuid}"):
            snaps = dom.listAllSnapshots(0)
            dated = []
            for snap in snaps:
                created = ET.fromstring(snap.getXMLDesc(0)).findtext("creationTime") or "0"
                dated.append((int(created), snap.getName()))
        return [name for _, name in sorted(dated)]

    def snapshot_current(self, uuid: str) -> str | None:
        """Name of domain ``uuid``'s current snapshot (the last made or reverted to)."""
        dom = self._domain(uuid)
        with _errors(f"current snapshot of domain {uuid}"):
            if not dom.hasCurrentSnapshot(0):
                return None
            return str(dom.snapshotCurrent(0).getName())

    def _snapshot(self, dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
        try:
            return dom.snapshotLookupByName(name, 0)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                return None
            raise VirtError(f"snapshot {name}: {exc.get_error_message()}", _code(exc)) from None

    def snapshot_exists(self, uuid: str, name: str) -> bool:
        return self._snapshot(self._domain(uuid), name) is not None

    def snapshot_revert(self, uuid: str, name: str) -> None:
        """Bring domain ``uuid`` back to snapshot ``name``: disk, definition and, for a
        snapshot of a running guest, its memory (the domain then runs)."""
        dom = self._domain(uuid)
        snap = self._snapshot(dom, name)
        if snap is None:
            raise VirtError(f"domain {uuid} has no snapshot {name!r}",
                            libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT)
        with _errors(f"revert of domain {uuid} to {name}"):
            dom.revertToSnapshot(snap, 0)

    def snapshot_delete(self, uuid: str, name: str) -> bool:
        """Delete snapshot ``name`` of domain ``uuid`` (its data in the disk and its
        metadata); False if there was none."""
        dom = self._domain(uuid)
        snap = self._snapshot(dom, name)
        if snap is None:
            return False
        with _errors(f"delete of snapshot {name} of domain {uuid}"):
            try:
                snap.delete(0)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                    raise
                return False
        return True

    def interface_addresses(self, uuid: str, source: str) -> list[dict[str, Any]]:
        """IP addresses of running domain ``uuid`` as ``source`` sees them: ``lease`` (the
        libvirt network's DHCP leases) or ``agent`` (the guest agent; raises VirtError with
        ``VIR_ERR_AGENT_UNRESPONSIVE`` when none answers). ``[{ip, prefix, mac, family}]``."""
        sources = {"lease": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
                   "agent": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT}
        dom = self._domain(uuid)
        with _errors(f"{source} addresses of domain {uuid}"):
            found = dom.interfaceAddresses(sources[source], 0) or {}
        out = []
        for iface in found.values():
            for addr in iface.get("addrs") or []:
                family = "ipv6" if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV6 else "ipv4"
                out.append({"ip": addr.get("addr"), "prefix": addr.get("prefix"),
                            "mac": iface.get("hwaddr") or "", "family": family})
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


# ------------------------------------------------------------------ serial console

ConsoleDataCallback = Callable[[bytes], None]
"""``on_data(chunk)``: bytes the guest wrote to its serial console."""

ConsoleCloseCallback = Callable[[str], None]
"""``on_close(reason)``: the console ended on libvirt's side (once; not after ``close()``)."""

_CONSOLE_OPEN_STATES = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED,
                        libvirt.VIR_DOMAIN_PAUSED)
"""Domain states whose serial console can be opened."""


class ConsoleUnavailable(VirtError):
    """The domain is not on this host (``absent``) or not running (``not_running``)."""

    def __init__(self, message: str, why: str, code: int) -> None:
        super().__init__(message, code)
        self.why = why


class ConsoleStream:
    """A domain's serial console as a non-blocking byte pipe (see :func:`open_console`).

    libvirt's console stream in ``VIR_STREAM_NONBLOCK`` mode, driven by the process-wide
    libvirt event loop the way ``virsh console`` drives it: every ``recv``/``send`` runs on the
    event loop thread, in the stream's event callback. ``write``, ``set_reading``,
    ``pending_output`` and ``close`` may be called from any thread; ``on_data`` and
    ``on_close`` run on the event loop thread (keep them short, never block in them).
    """

    READ_CHUNK = 64 * 1024
    """Most bytes taken from the stream per ``recv``."""

    READS_PER_EVENT = 16
    """Most ``recv`` calls per event, so one chatty console cannot starve the loop."""

    WRITE_CHUNK = 64 * 1024
    """Most bytes given to one ``send`` (libvirt's RPC messages have a size limit)."""

    def __init__(self, stream: Any, on_data: ConsoleDataCallback,
                 on_close: ConsoleCloseCallback) -> None:
        self._stream = stream
        self._on_data = on_data
        self._on_close = on_close
        self._lock = threading.Lock()
        self._out = bytearray()
        self._reading = True
        self._closed = False

    def _events(self) -> int:
        events = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        if self._reading:
            events |= libvirt.VIR_STREAM_EVENT_READABLE
        if self._out:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        return events

    def _start(self) -> None:
        with self._lock:
            self._stream.eventAddCallback(self._events(), self._on_event, None)

    def _on_event(self, stream: Any, events: int, _opaque: Any) -> None:
        chunks: list[bytes] = []
        reason = ""
        detached = False
        with self._lock:
            if self._closed:
                return
            try:
                if events & libvirt.VIR_STREAM_EVENT_READABLE and self._reading:
                    for _ in range(self.READS_PER_EVENT):
                        got = stream.recv(self.READ_CHUNK)
                        if got == -2:  # nothing more for now
                            break
                        if not got:
                            reason = "the console ended (the guest stopped or libvirt closed it)"
                            break
                        chunks.append(got)
                if not reason and events & libvirt.VIR_STREAM_EVENT_WRITABLE and self._out:
                    sent = stream.send(bytes(self._out[:self.WRITE_CHUNK]))
                    if sent != -2:
                        del self._out[:sent]
                if not reason and events & (libvirt.VIR_STREAM_EVENT_ERROR
                                            | libvirt.VIR_STREAM_EVENT_HANGUP):
                    reason = "the console stream hung up"
            except libvirt.libvirtError as exc:
                reason = f"the console stream failed: {exc.get_error_message() or exc}"
            if reason:
                detached = self._detach_locked()
            else:
                with suppress(libvirt.libvirtError):
                    stream.eventUpdateCallback(self._events())
        if detached:
            self._abort()
        for chunk in chunks:
            self._call(self._on_data, chunk)
        if reason:
            self._call(self._on_close, reason)

    @staticmethod
    def _call(fn: Callable[[Any], None], arg: Any) -> None:
        try:
            fn(arg)
        except Exception:  # never into libvirt's dispatcher
            log.exception("console callback failed")

    def _detach_locked(self) -> bool:
        """Mark closed and drop the event callback; True if this call did it. As virsh does,
        the callback goes before the abort (a non-blocking stream needs that)."""
        if self._closed:
            return False
        self._closed = True
        self._out.clear()
        with suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        return True

    def _abort(self) -> None:
        """Tell libvirtd to let go of the console (a round trip; never under the lock, so
        ``write`` never waits on it)."""
        with suppress(libvirt.libvirtError):
            self._stream.abort()

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the guest; False if the console is already closed."""
        with self._lock:
            if self._closed:
                return False
            if data:
                self._out += data
                with suppress(libvirt.libvirtError):
                    self._stream.eventUpdateCallback(self._events())
            return True

    def pending_output(self) -> int:
        """Bytes written but not yet taken by libvirt."""
        with self._lock:
            return len(self._out)

    def set_reading(self, reading: bool) -> None:
        """Pause (False) or resume (True) reading from the guest: backpressure for slow readers."""
        with self._lock:
            if self._closed or self._reading == reading:
                return
            self._reading = reading
            with suppress(libvirt.libvirtError):
                self._stream.eventUpdateCallback(self._events())

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Let go of the console (idempotent). Blocks for one round trip to libvirtd, so
        call it off any event loop; ``on_close`` is not called for it."""
        with self._lock:
            detached = self._detach_locked()
        if detached:
            self._abort()


def open_console(virt: Virt, uuid: str, on_data: ConsoleDataCallback,
                 on_close: ConsoleCloseCallback, *, force: bool = False) -> ConsoleStream:
    """Open the serial console of running domain ``uuid`` (virDomainOpenConsole).

    libvirt allows one console session per domain: with ``force`` an existing session is
    cut off and this one takes over, without it opening fails while another is open.
    Blocks for a round trip to libvirtd. Raises ConsoleUnavailable when the domain is not
    here or not running, VirtError when libvirt fails.
    """
    _ensure_event_loop()
    dom = virt._lookup(uuid)
    if dom is None:
        raise ConsoleUnavailable(f"domain {uuid} is not on this host", "absent",
                                 libvirt.VIR_ERR_NO_DOMAIN)
    with _errors(f"console of domain {uuid}"):
        state = dom.state()[0]
        if state not in _CONSOLE_OPEN_STATES:
            raise ConsoleUnavailable(f"domain {uuid} is {STATES.get(state, 'not running')}",
                                     "not_running", libvirt.VIR_ERR_OPERATION_INVALID)
        stream = dom.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE if force else 0)
            console = ConsoleStream(stream, on_data, on_close)
            console._start()
        except BaseException:
            with suppress(libvirt.libvirtError):
                stream.abort()
            raise
    return console
