"""The host's interactive serial console server: a websocket per session, libvirt's console
stream behind it, authorised by a short-lived console token (``fleet.consoletoken``).

Owns the websocket server (``websockets``' asyncio server, on a thread of its own), token
checks (signature, host, expiry, replay), one session per VM, and the ``console_info`` RPC the
web asks before it signs a token. Talks to libvirt only through ``worker.virt``; never logs a
token; never opens the store.

Protocol: connect to ``<console_url>/console?token=<token>``. Guest output arrives as binary
frames; binary or text (UTF-8) frames sent are typed into the guest. Close codes:

- 1000: the console ended (guest stopped, libvirt closed it) or the client went away;
- 1001: the worker is stopping;
- 1008: the token is bad, expired, replayed or for another host, or its VM is not running here;
- 1011: libvirt could not open the console;
- 4001: a newer session for the same VM took over (libvirt allows one session per VM; the
  newest wins, so a stale browser tab or a half-open connection cannot lock a user out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from celery import Celery
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from fleet import contract as c
from fleet.config import Settings
from fleet.consoletoken import NonceCache, TokenError, verify
from worker.virt import ConsoleStream, ConsoleUnavailable, Virt, VirtError, open_console

log = logging.getLogger(__name__)

_ws_log = logging.getLogger(__name__ + ".ws")
# websockets logs request lines (with the token) and frames (with what is typed) at DEBUG.
_ws_log.setLevel(logging.INFO)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_ERROR = 1011
CLOSE_TAKEN_OVER = 4001

MAX_MESSAGE = 64 * 1024
"""Largest frame a client may send."""

OUT_HIGH, OUT_LOW = 1024 * 1024, 256 * 1024
"""Guest output queued for a slow client: reading from the guest pauses above HIGH and
resumes below LOW."""

IN_HIGH = 256 * 1024
"""Client input libvirt has not taken yet: reading from the client waits above this."""

TAKEOVER_WAIT = 15.0
"""Seconds a new session waits for the one it replaces to let go of the console."""

_CONSOLE_PATH = "/console"


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class _Session:
    """One client's console of one VM; lives on the server's event loop."""

    def __init__(self, server: ConsoleServer, ws: ServerConnection, vm_id: str,
                 previous: _Session | None) -> None:
        self.server = server
        self.ws = ws
        self.vm_id = vm_id
        self.previous = previous
        self.stream: ConsoleStream | None = None
        self.queue: asyncio.Queue[bytes | str] = asyncio.Queue()
        self.queued = 0
        self.paused = False
        self.kicked: tuple[int, str] | None = None
        self.done = asyncio.Event()
        self.finished = asyncio.Event()
        """Set once this session has let go of the console."""

    # -- called on libvirt's event loop thread -------------------------------------------

    def _from_libvirt(self, loop: asyncio.AbstractEventLoop, item: bytes | str) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is already gone
            loop.call_soon_threadsafe(self._enqueue, item)

    # -- on the server's loop -------------------------------------------------------------

    def _enqueue(self, item: bytes | str) -> None:
        if isinstance(item, bytes):
            self.queued += len(item)
            if not self.paused and self.queued > OUT_HIGH and self.stream is not None:
                self.paused = True
                self.stream.set_reading(False)
        self.queue.put_nowait(item)

    async def run(self) -> tuple[int, str]:
        try:
            return await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        if self.previous is not None:
            # One at a time: the session we replace lets go before we open (with FORCE, in
            # case a client outside virtfleet holds it), so two opens never race.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.previous.finished.wait(), TAKEOVER_WAIT)
            self.previous = None
        if self.kicked is not None:
            return self.kicked
        try:
            self.stream = await loop.run_in_executor(self.server.executor, partial(
                open_console, self.server.virt, self.vm_id,
                partial(self._from_libvirt, loop), partial(self._from_libvirt, loop),
                force=True))
        except ConsoleUnavailable as exc:
            return CLOSE_POLICY, ("this VM is not on this host" if exc.why == "absent"
                                  else "this VM is not running")
        except VirtError as exc:
            log.warning("console of VM %s cannot be opened: %s", self.vm_id, exc)
            return CLOSE_ERROR, "the console cannot be opened on this host"
        to_client = asyncio.create_task(self._to_client())
        from_client = asyncio.create_task(self._from_client())
        kicked = asyncio.create_task(self.done.wait())
        try:
            finished, _ = await asyncio.wait({to_client, from_client, kicked},
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_client, from_client, kicked):
                task.cancel()
            await asyncio.gather(to_client, from_client, kicked, return_exceptions=True)
            await loop.run_in_executor(self.server.executor, self.stream.close)
        if self.kicked is not None:
            return self.kicked
        if to_client in finished and not to_client.cancelled() and to_client.exception() is None:
            return CLOSE_NORMAL, _reason(to_client.result())
        return CLOSE_NORMAL, "client closed the console"

    async def _to_client(self) -> str:
        """Guest output to the client, coalesced into frames; returns why the console ended."""
        assert self.stream is not None
        while True:
            item = await self.queue.get()
            if isinstance(item, str):
                return item
            chunks, size, ended = [item], len(item), ""
            while not self.queue.empty() and size < MAX_MESSAGE:
                nxt = self.queue.get_nowait()
                if isinstance(nxt, str):
                    ended = nxt
                    break
                chunks.append(nxt)
                size += len(nxt)
            data = b"".join(chunks)
            self.queued -= len(data)
            if self.paused and self.queued < OUT_LOW:
                self.paused = False
                self.stream.set_reading(True)
            await self.ws.send(data)
            if ended:
                return ended

    async def _from_client(self) -> None:
        """Client input to the guest, until the client closes."""
        assert self.stream is not None
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                data = message.encode() if isinstance(message, str) else message
                if not self.stream.write(data):
                    return
                while self.stream.pending_output() > IN_HIGH and not self.stream.closed:
                    await asyncio.sleep(0.05)

    def kick(self, code: int, reason: str) -> None:
        """End this session (on the server's loop): another took over, or the server stops."""
        self.kicked = (code, reason)
        self.done.set()


class ConsoleServer:
    """The websocket console server of one host, on a daemon thread with its own asyncio loop.

    ``start()`` returns once it listens (``port`` is the real port) or raises what stopped it;
    ``stop()`` closes every session (streams aborted, websockets closed with 1001) and joins.
    """

    def __init__(self, settings: Settings, virt: Virt | None = None) -> None:
        host, _, port = settings.console_bind.rpartition(":")
        self.bind_host = host.strip("[]") or None
        self.bind_port = int(port)
        self.host_name = settings.host_name
        self.secret = settings.host_token
        self.url = settings.console_url
        # Its own connection: console traffic never queues behind builds, and the other way.
        self.virt = virt or Virt(settings.libvirt_uri)
        self.nonces = NonceCache()
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="console-libvirt")
        self.port: int | None = None
        self.sessions: dict[str, _Session] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> ConsoleServer:
        if not self.secret:
            raise RuntimeError("the console server needs the host credential "
                               "(setting 'host_token')")
        self._thread = threading.Thread(target=self._run, name="console-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            error = self._error or "it did not start in time"
            self.stop()
            raise RuntimeError(f"the console server cannot listen on "
                               f"{self.bind_host}:{self.bind_port}: {error}")
        log.info("console server listening on %s:%s (clients use %s)",
                 self.bind_host, self.port, self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.virt.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start() or logged
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("console server stopped")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with serve(self._handle, self.bind_host, self.bind_port,
                         process_request=self._check_path, compression=None,
                         max_size=MAX_MESSAGE, logger=_ws_log) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stopping.wait()
            reason = "the host's console server is stopping"
            for session in list(self.sessions.values()):
                session.kick(CLOSE_GOING_AWAY, reason)
            # Closes the listener and every connection, and waits for the handlers, each of
            # which lets go of its stream.
            server.close(code=CLOSE_GOING_AWAY, reason=reason)
            await server.wait_closed()

    # -- connections --------------------------------------------------------------------

    @staticmethod
    def _check_path(_ws: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0].rstrip("/") == _CONSOLE_PATH:
            return None
        return Response(404, "Not Found", Headers([("Content-Type", "text/plain")]),
                        b"not found: connect to /console?token=...\n")

    async def _handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if ws.remote_address else "?"
        query = ws.request.path.partition("?")[2] if ws.request else ""
        token = (parse_qs(query).get("token") or [""])[0]
        try:
            claims = verify(self.secret, token, self.host_name)
            self.nonces.use(claims)
        except TokenError as exc:
            log.warning("console refused for %s: %s", peer, exc)
            await ws.close(CLOSE_POLICY, _reason(str(exc)))
            return
        vm_id = claims.vm_id
        previous = self.sessions.get(vm_id)
        if previous is not None:
            previous.kick(CLOSE_TAKEN_OVER, "a newer console session for this VM took over")
        session = _Session(self, ws, vm_id, previous)
        self.sessions[vm_id] = session
        log.info("console of VM %s opened for %s", vm_id, peer)
        code, reason = CLOSE_ERROR, "internal error"
        try:
            code, reason = await session.run()
        except Exception:
            log.exception("console session of VM %s failed", vm_id)
        finally:
            if self.sessions.get(vm_id) is session:
                del self.sessions[vm_id]
            log.info("console of VM %s closed for %s (%s: %s)", vm_id, peer, code, reason)
            with contextlib.suppress(ConnectionClosed):
                await ws.close(code, _reason(reason))


def register(app: Celery, server: ConsoleServer | None, state: Callable[[str], str | None]
             ) -> None:
    """The ``console_info`` RPC: where this host's console server is, and the VM's state."""

    @app.task(name=c.TASK_CONSOLE_INFO, ignore_result=False, acks_late=False)
    def console_info(vm_id: str) -> dict[str, Any]:
        return {"url": server.url if server is not None else "", "state": state(vm_id)}
