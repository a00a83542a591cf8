"""The ready watcher on temporary console logs: the marker line arriving later, split in two
writes, with errors, garbled; the timeout (and none); unwatch; a rebuild's old marker; a
worker restart (recorded outcome re-sent, watch resumed); a rotated log; the thread."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from fleet import contract as c
from worker.domain import instance_paths
from worker.readiness import MAX_LINE, ReadyWatcher

MARKER = c.READY_MARKER


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_parse(line: str) -> tuple[bool, str, Any]:
    """fleet.userdata.parse_ready_line's shape: (ok, reason, result)."""
    assert line.startswith(MARKER), line
    result = json.loads(line[len(MARKER):])
    errors = result["v1"]["errors"]
    return (not errors, "; ".join(errors), result)


def ready_line(errors: list[str] | None = None) -> str:
    body = {"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0]", "errors": errors or []}}
    return MARKER + json.dumps(body) + "\r\n"


class Host:
    """A storage dir with one instance, a watcher on a fake clock, and the events it sent."""

    def __init__(self, tmp_path: Path, timeout: float = 900.0) -> None:
        self.vm_id = str(uuid.uuid4())
        self.storage = tmp_path
        self.paths = instance_paths(tmp_path, self.vm_id)
        self.paths.dir.mkdir(parents=True)
        self.clock = Clock()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.watcher = ReadyWatcher(self.emit, tmp_path, timeout=timeout, parse=fake_parse,
                                    clock=self.clock)

    def emit(self, type_: str, **data: Any) -> None:
        self.events.append((type_, data))

    def write(self, text: str) -> None:
        with self.paths.console.open("a") as fh:
            fh.write(text)

    def start(self) -> None:
        """What a build does around define_and_start."""
        self.watcher.prepare(self.vm_id)
        self.watcher.watch(self.vm_id, started=self.clock.now)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_marker_appearing_later_sends_ready_with_the_boot_time(host: Host) -> None:
    host.start()
    host.watcher.poll()  # no log yet
    host.write("SeaBIOS\r\nLinux version 6.1\r\n")
    host.clock.now += 3
    host.watcher.poll()
    assert host.events == [] and host.watcher.watching() == {host.vm_id}
    host.write("cloud-init final\r\n" + ready_line() + "login: ")
    host.clock.now += 4.5
    host.watcher.poll()
    assert len(host.events) == 1
    type_, data = host.events[0]
    assert type_ == c.EV_VM_READY and data["vm_id"] == host.vm_id
    assert data["boot_seconds"] == 7.5
    assert data["result"]["v1"]["errors"] == []
    assert host.watcher.watching() == set()
    host.write(ready_line())  # e.g. a later reboot: nobody watches any more
    host.watcher.poll()
    assert len(host.events) == 1


def test_a_line_written_in_two_chunks_is_read_whole(host: Host) -> None:
    host.start()
    line = ready_line()
    host.write("boot\n" + line[:25])
    host.watcher.poll()
    assert host.events == []
    host.write(line[25:])
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]
    assert host.events[0][1]["result"]["v1"]["datasource"].startswith("DataSourceNoCloud")


def test_the_marker_after_other_output_on_the_same_line(host: Host) -> None:
    host.start()
    host.write("[   12.5] random: crng init done\r" + ready_line())
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]


def test_cloud_init_errors_send_guest_failed(host: Host) -> None:
    host.start()
    host.write(ready_line(["('scripts_user', RuntimeError('runparts failed'))"]))
    host.watcher.poll()
    assert len(host.events) == 1
    type_, data = host.events[0]
    assert type_ == c.EV_GUEST_FAILED
    assert "runparts failed" in data["reason"] and data["result"]["v1"]["errors"]
    assert "boot_seconds" not in data


def test_a_garbled_ready_line_is_a_guest_failure(host: Host) -> None:
    host.start()
    host.write(MARKER + '{"v1": {"err\n')
    host.watcher.poll()
    type_, data = host.events[0]
    assert type_ == c.EV_GUEST_FAILED and "cannot be read" in data["reason"]


def test_the_timeout_stops_watching_logs_and_says_so(host: Host,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    host.start()
    host.write("booting forever\n")
    host.clock.now += 899
    host.watcher.poll()
    assert host.watcher.watching() == {host.vm_id} and host.events == []
    host.clock.now += 2
    with caplog.at_level(logging.WARNING, logger="worker.readiness"):
        host.watcher.poll()
    assert host.watcher.watching() == set()
    assert host.events == [(c.EV_READY_TIMEOUT, {"vm_id": host.vm_id, "seconds": 900.0})]
    assert "no ready line within 900 s" in caplog.text
    host.write(ready_line())  # too late: no longer watched
    host.watcher.poll()
    assert len(host.events) == 1


def test_a_restarted_worker_does_not_watch_a_timed_out_vm_again(host: Host) -> None:
    host.start()
    host.clock.now += 901
    host.watcher.poll()
    again = ReadyWatcher(host.emit, host.storage, timeout=900.0, parse=fake_parse,
                         clock=host.clock)
    again.resume([host.vm_id])  # the outcome is in ready.json: said again, not watched
    assert again.watching() == set()
    assert [t for t, _ in host.events] == [c.EV_READY_TIMEOUT, c.EV_READY_TIMEOUT]


def test_a_marker_already_there_at_the_deadline_still_counts(host: Host) -> None:
    host.start()
    host.write(ready_line())
    host.clock.now += 5000
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]


def test_timeout_zero_watches_forever(tmp_path: Path) -> None:
    h = Host(tmp_path, timeout=0)
    h.start()
    h.clock.now += 10**7
    h.watcher.poll()
    assert h.watcher.watching() == {h.vm_id}
    h.write(ready_line())
    h.watcher.poll()
    assert h.events[0][0] == c.EV_VM_READY


def test_unwatch_stops_before_the_marker(host: Host) -> None:
    host.start()
    host.write("half way\n")
    host.watcher.poll()
    host.watcher.unwatch(host.vm_id)
    host.write(ready_line())
    host.watcher.poll()
    assert host.events == [] and host.watcher.watching() == set()


def test_a_rebuild_ignores_the_marker_of_the_boot_before(host: Host) -> None:
    host.start()
    host.write("first boot\n" + ready_line())
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]
    # rebuild: libvirt appends to the same log; the old marker is before the new start
    host.events.clear()
    host.clock.now += 100
    host.start()
    host.watcher.poll()
    assert host.events == [] and host.watcher.watching() == {host.vm_id}
    host.clock.now += 2
    host.write("second boot\n" + ready_line(["second boot failed"]))
    host.watcher.poll()
    assert host.events == [(c.EV_GUEST_FAILED, {
        "vm_id": host.vm_id, "reason": "second boot failed",
        "result": {"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0]",
                          "errors": ["second boot failed"]}}})]


def test_a_rebuild_while_still_watching_replaces_the_watch(host: Host) -> None:
    host.start()
    host.write("first boot, no marker yet\n")
    host.watcher.poll()
    host.watcher.prepare(host.vm_id)  # the rebuild's build, before its start
    assert host.watcher.watching() == set()
    host.watcher.watch(host.vm_id, started=host.clock.now)
    host.write(ready_line())
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]


def test_a_rotated_log_is_read_from_its_start(host: Host) -> None:
    host.write("x" * 5000 + "\n")
    host.start()  # offset 5001
    host.write("more of this boot\n")
    host.watcher.poll()
    # virtlogd rotates: console.log -> console.log.0, a new (smaller) console.log
    os.replace(host.paths.console, host.paths.console.with_suffix(".log.0"))
    host.write(ready_line())
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]


def test_a_long_line_without_the_marker_is_not_kept(host: Host) -> None:
    host.start()
    host.write("y" * (MAX_LINE + 10))
    host.watcher.poll()
    watch = host.watcher._watches[host.vm_id]
    assert len(watch.buf) < len(MARKER)
    host.write(MARKER[:5])
    host.watcher.poll()
    host.write(ready_line()[5:])
    host.watcher.poll()
    assert [t for t, _ in host.events] == [c.EV_VM_READY]


def test_a_restarted_worker_resends_a_recorded_outcome(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.start()
    h.clock.now += 6
    h.write(ready_line())
    h.watcher.poll()
    assert h.events[0][1]["boot_seconds"] == 6
    # a new worker process: the outcome comes from ready.json, the same as before
    again = Host.__new__(Host)
    again.events = []
    w2 = ReadyWatcher(again.emit, tmp_path, parse=fake_parse, clock=Clock(5000))
    w2.resume([h.vm_id, str(uuid.uuid4()), "not-a-uuid"])
    assert again.events == h.events
    assert w2.watching() == set()


def test_a_restarted_worker_resumes_watching(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.write("an older boot\n" + ready_line(["old"]))
    h.start()
    h.clock.now += 3
    h.write("this boot, still booting\n")
    events: list[tuple[str, dict[str, Any]]] = []
    w2 = ReadyWatcher(lambda t, **d: events.append((t, d)), tmp_path, parse=fake_parse,
                      clock=h.clock)
    w2.resume([h.vm_id])
    assert w2.watching() == {h.vm_id}
    w2.poll()
    assert events == []  # the older boot's marker is not this boot's
    h.clock.now += 2
    h.write(ready_line())
    w2.poll()
    assert events[0][0] == c.EV_VM_READY and events[0][1]["boot_seconds"] == 5


def test_a_restarted_worker_finds_a_marker_printed_while_it_was_down(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.clock.now = time.time() - 10  # started 10 s ago (the file's mtime is real time)
    h.start()
    h.write(ready_line())
    h.clock.now = time.time() + 3600  # the worker comes back an hour later
    events: list[tuple[str, dict[str, Any]]] = []
    w2 = ReadyWatcher(lambda t, **d: events.append((t, d)), tmp_path, parse=fake_parse,
                      clock=h.clock)
    w2.resume([h.vm_id])
    w2.poll()
    assert events[0][0] == c.EV_VM_READY
    # the time is the log's last change, not the late look's
    assert 9 < events[0][1]["boot_seconds"] < 15


def test_a_domain_from_before_ready_json_is_watched_from_the_start(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.write("boot\n" + ready_line())
    h.watcher.resume([h.vm_id])
    h.watcher.poll()
    assert h.events[0][0] == c.EV_VM_READY and h.events[0][1]["boot_seconds"] is None


def test_a_failing_emit_is_logged_and_resent_after_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Host(tmp_path)

    def broken(*_a: Any, **_k: Any) -> None:
        raise ConnectionError("redis is down")

    h.watcher.emit = broken
    h.start()
    h.write(ready_line())
    with caplog.at_level(logging.ERROR, logger="worker.readiness"):
        h.watcher.poll()
    assert "sending vm.ready" in caplog.text
    w2 = ReadyWatcher(h.emit, tmp_path, parse=fake_parse, clock=h.clock)
    w2.resume([h.vm_id])
    assert [t for t, _ in h.events] == [c.EV_VM_READY]


def test_the_thread_resumes_then_polls_and_stops(tmp_path: Path) -> None:
    h = Host(tmp_path)
    h.watcher.prepare(h.vm_id)
    w = ReadyWatcher(h.emit, tmp_path, parse=fake_parse, interval=0.02)
    w.start(running=lambda: [h.vm_id])
    try:
        deadline = time.monotonic() + 5
        while w.watching() != {h.vm_id} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.watching() == {h.vm_id}
        h.write(ready_line())
        while not h.events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [t for t, _ in h.events] == [c.EV_VM_READY]
    finally:
        w.stop()
    assert w._thread is not None and not w._thread.is_alive()


def test_the_real_parser_of_the_control_plane() -> None:
    userdata = pytest.importorskip("fleet.userdata")
    parse = getattr(userdata, "parse_ready_line", None)
    if parse is None:
        pytest.skip("fleet.userdata.parse_ready_line is not there yet")
    ok, reason, result = parse(ready_line().strip())
    assert ok is True and not reason and result["v1"]["errors"] == []
    ok, reason, _ = parse(ready_line(["boom"]).strip())
    assert ok is False and "boom" in reason
