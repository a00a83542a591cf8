"""The host's websocket console server (worker.console) with a fake console stream in place of
libvirt's: token checks and close codes, bytes both ways, one session per VM, clean stop.
The real libvirt stream is exercised end to end in tests/e2e/test_console.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from fleet.config import load_settings
from fleet.consoletoken import sign
from worker import console as console_mod
from worker.virt import ConsoleUnavailable

SECRET = "host-secret-for-tests"
VM = "6f1c2a1e-0b7d-4c59-9a55-0d3c7e5b9a10"


class FakeStream:
    """Echoes what is written, from another thread, as libvirt's event loop would."""

    def __init__(self, vm_id: str, on_data: Any, on_close: Any) -> None:
        self.vm_id = vm_id
        self.on_data = on_data
        self.on_close = on_close
        self.closed = False
        self.written = bytearray()
        self.reading = True

    def write(self, data: bytes) -> bool:
        if self.closed:
            return False
        self.written += data
        threading.Thread(target=self.on_data, args=(b"echo:" + data,)).start()
        return True

    def pending_output(self) -> int:
        return 0

    def set_reading(self, reading: bool) -> None:
        self.reading = reading

    def close(self) -> None:
        self.closed = True

    def end(self, reason: str) -> None:
        self.closed = True
        self.on_close(reason)


@dataclass
class Libvirt:
    """Stands in for worker.virt.open_console: which domains run, what was opened."""

    running: set[str] = field(default_factory=lambda: {VM})
    absent: set[str] = field(default_factory=set)
    opened: list[FakeStream] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)

    def open_console(self, _virt: Any, uuid: str, on_data: Any, on_close: Any, *,
                     force: bool = False) -> FakeStream:
        if uuid in self.absent:
            raise ConsoleUnavailable("absent", "absent", 42)
        if uuid not in self.running:
            raise ConsoleUnavailable("not running", "not_running", 55)
        # libvirt without FORCE refuses a second session; with it the old one is cut off.
        for old in self.opened:
            if old.vm_id == uuid and not old.closed:
                assert force, "a second session without FORCE"
                old.end("cut off")
        stream = FakeStream(uuid, on_data, on_close)
        self.opened.append(stream)
        self.forced.append(force)
        return stream


@dataclass
class Server:
    server: console_mod.ConsoleServer
    libvirt: Libvirt

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/console"

    def token(self, vm_id: str = VM, host: str = "kvm1", ttl: float = 60,
              now: float | None = None, secret: str = SECRET) -> str:
        return sign(secret, vm_id, host, ttl, now=now)[0]

    def connect(self, token: str, path: str = "/console") -> ClientConnection:
        return connect(f"ws://127.0.0.1:{self.server.port}{path}?token={token}",
                       proxy=None, open_timeout=5, close_timeout=5)


@pytest.fixture
def srv(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Server]:
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    libvirt = Libvirt()
    monkeypatch.setattr(console_mod, "open_console", libvirt.open_console)
    settings = load_settings(env={"VIRTFLEET_HOST_NAME": "kvm1", "VIRTFLEET_HOST_TOKEN": SECRET,
                                  "VIRTFLEET_CONSOLE_BIND": "127.0.0.1:1",
                                  "VIRTFLEET_LIBVIRT_URI": "test:///default"})
    server = console_mod.ConsoleServer(settings)
    server.bind_port = 0  # any free port; `port` tells which
    server.start()
    try:
        yield Server(server, libvirt)
    finally:
        server.stop()
    assert not server._thread or not server._thread.is_alive()
    assert all(s.closed for s in libvirt.opened), "a console stream was left open"


def closed_with(ws: ClientConnection, timeout: float = 5) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=timeout)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


def test_bytes_go_both_ways(srv: Server) -> None:
    with srv.connect(srv.token()) as ws:
        ws.send("echo hi\n")  # text frames are typed as UTF-8
        assert ws.recv(timeout=5) == b"echo:echo hi\n"
        ws.send(b"\x03")
        assert ws.recv(timeout=5) == b"echo:\x03"
    assert srv.libvirt.forced == [True]
    deadline = time.monotonic() + 5
    while not srv.libvirt.opened[0].closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.libvirt.opened[0].closed  # the client went away: the stream is let go


@pytest.mark.parametrize("make, reason", [
    (lambda s: s.token(ttl=1, now=time.time() - 10), "token expired"),
    (lambda s: s.token(host="kvm2"), "token is for another host"),
    (lambda s: s.token(secret="another-secret"), "bad token signature"),
    (lambda s: s.token()[:-3] + "AAA", "bad token signature"),
    (lambda s: "", "malformed token"),
])
def test_bad_tokens_are_closed_with_policy_violation(srv: Server, make: Any, reason: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    token = make(srv)
    caplog.set_level(logging.DEBUG)
    with srv.connect(token) as ws:
        assert closed_with(ws) == (1008, reason)
    assert srv.libvirt.opened == []
    assert any(reason in r.getMessage() for r in caplog.records)
    if token:  # the server side never logs it, even at DEBUG (this test's client does)
        assert all(token not in r.getMessage() for r in caplog.records
                   if not r.name.startswith("websockets.client")), "token logged"


def test_a_token_is_good_once(srv: Server) -> None:
    token = srv.token()
    with srv.connect(token) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=5) == b"echo:x"
    with srv.connect(token) as ws:
        assert closed_with(ws) == (1008, "token already used")


def test_wrong_path_is_404(srv: Server) -> None:
    with pytest.raises(InvalidStatus) as exc:
        srv.connect(srv.token(), path="/other")
    assert exc.value.response.status_code == 404


def test_vm_not_here_or_not_running(srv: Server) -> None:
    srv.libvirt.absent.add("other-vm")
    with srv.connect(srv.token(vm_id="other-vm")) as ws:
        assert closed_with(ws) == (1008, "this VM is not on this host")
    with srv.connect(srv.token(vm_id="stopped-vm")) as ws:
        assert closed_with(ws) == (1008, "this VM is not running")


def test_console_ending_closes_the_websocket(srv: Server) -> None:
    with srv.connect(srv.token()) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=5) == b"echo:x"
        srv.libvirt.opened[0].end("the console ended (the guest stopped or libvirt closed it)")
        assert closed_with(ws) == (1000, "the console ended (the guest stopped or libvirt "
                                         "closed it)")


def test_a_newer_session_takes_over(srv: Server) -> None:
    with srv.connect(srv.token()) as first:
        first.send(b"1")
        assert first.recv(timeout=5) == b"echo:1"
        with srv.connect(srv.token()) as second:
            assert closed_with(first) == (4001, "a newer console session for this VM took over")
            second.send(b"2")
            assert second.recv(timeout=5) == b"echo:2"
            old, new = srv.libvirt.opened
            assert old.closed and not new.closed


def test_stopping_the_server_closes_sessions(srv: Server) -> None:
    with srv.connect(srv.token()) as ws:
        ws.send(b"x")
        assert ws.recv(timeout=5) == b"echo:x"
        srv.server.stop()
        assert closed_with(ws) == (1001, "the host's console server is stopping")
    assert srv.libvirt.opened[0].closed


def test_a_slow_client_pauses_reading_from_the_guest(srv: Server) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    count = 400  # 25 MiB: more than the socket buffers and the server's queue hold
    with connect(f"{srv.url}?token={srv.token()}", proxy=None, open_timeout=5,
                 max_size=None, ping_interval=None) as ws:
        ws.send(b"start")
        assert ws.recv(timeout=5) == b"echo:start"
        stream = srv.libvirt.opened[0]

        def flood() -> None:  # as libvirt's loop would: it stops when reading is paused
            for _ in range(count):
                while not stream.reading and not stream.closed:
                    time.sleep(0.005)
                stream.on_data(chunk)

        feeder = threading.Thread(target=flood)
        feeder.start()
        deadline = time.monotonic() + 20
        while stream.reading and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not stream.reading, "reading from the guest never paused"
        received = 0
        while received < count * len(chunk):
            data = ws.recv(timeout=10)
            assert isinstance(data, bytes)
            received += len(data)
        feeder.join(10)
        assert received == count * len(chunk)
        assert stream.reading  # resumed once the client caught up
