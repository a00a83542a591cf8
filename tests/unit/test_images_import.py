"""Image import and host caches against the real qemu-img: header refusals answered at once,
the control plane's inspection and raw -> qcow2 conversion, streamed uploads, URL refusals
(redirects included), VM create on images that are not active, prewarm, and the host cache's
clean-up with real overlays. Hostile images are built here with qemu-img; each test shows
that the host file they point at never got into what the controller stored."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fleet import contract as c
from fleet import download, writeback
from fleet.config import load_settings
from fleet.exceptions import BadRequest, ConfigError
from fleet.proc import ProcError, run
from fleet.store.models import Event, Host, Image, Project
from fleet.store.session import Store
from scheduler import imagejobs
from web import create_app, imports
from web.auth import create_token
from web.imports import (
    HEADER_BYTES,
    ImageRefused,
    Limits,
    inspect_header,
    store_stream,
)
from worker import cache, images

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MIB = 1024 * 1024
MARKER = b"VF-HOST-SECRET-7f3a9c"
"""What the host file hostile images point at contains; it must never be stored."""


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Recorder:
    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    fail: bool = False

    def _send(self, *call: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append(call)

    def build(self, host: str, payload: dict[str, Any]) -> None:
        self._send("build", host, payload)

    def delete(self, host: str, payload: dict[str, Any]) -> None:
        self._send("delete", host, payload)

    def console_log(self, host: str, vm_id: str, max_bytes: int) -> str:
        return ""

    def inspect_image(self, image_id: str) -> None:
        self._send("inspect_image", "control", image_id)

    def prewarm(self, host: str, payload: dict[str, Any]) -> None:
        self._send("prewarm", host, payload)


@dataclass
class Env:
    app: Flask
    client: FlaskClient
    store: Store
    dispatcher: Recorder
    state_dir: Path
    tokens: dict[str, str]

    @property
    def settings(self) -> Any:
        return self.app.extensions["virtfleet.settings"]

    def call(self, method: str, path: str, who: str | None = "root", **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return self.client.open(path, method=method, headers=headers, **kw)

    def upload(self, name: str, data: bytes | Path, who: str = "root", **query: str) -> Any:
        body = data.read_bytes() if isinstance(data, Path) else data
        qs = "&".join(f"{k}={v}" for k, v in {"name": name, **query}.items())
        return self.call("POST", f"/api/v1/images/upload?{qs}", who=who, data=body,
                         headers={"Content-Type": "application/octet-stream"})

    def run_jobs(self) -> None:
        """Run the inspections the web sent, as the scheduler's image runner would."""
        for kind, _, image_id in list(self.dispatcher.calls):
            if kind == "inspect_image":
                imagejobs.inspect_image(self.store, self.settings, image_id)
        self.dispatcher.calls = [x for x in self.dispatcher.calls if x[0] != "inspect_image"]

    def image(self, image_id: str) -> dict[str, Any]:
        resp = self.call("GET", f"/api/v1/images/{image_id}")
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.state_dir.rglob("*") if p.is_file()
                      and not p.name.startswith("virtfleet.db"))

    def assert_nothing_stored(self) -> None:
        assert self.stored_files() == []
        self.assert_marker_absent()

    def assert_marker_absent(self) -> None:
        for p in self.state_dir.rglob("*"):
            if p.is_file():
                assert MARKER not in p.read_bytes(), p


def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "virtfleet.toml"
    path.write_text("")
    return path


def make_env(tmp_path: Path, migrated_db: Path, **env: str) -> Env:
    state = tmp_path / "state"
    settings = load_settings(env={"VIRTFLEET_STATE_DIR": str(state),
                                  "VIRTFLEET_HOST_NAME": "controller",
                                  "VIRTFLEET_PUBLIC_URL": "http://ctl.example:8080", **env},
                             path=empty_config(tmp_path))
    state.mkdir()
    shutil.copyfile(migrated_db, state / "virtfleet.db")
    store = Store(settings.db_url)
    with store.session() as s:
        tokens = {"alice": create_token(s, "alice", "team-a"),
                  "root": create_token(s, "root", "ops", admin=True)}
        team_a = s.scalars(select(Project).where(Project.name == "team-a")).one()
        s.add(Image(id="img-a", name="debian", project_id=team_a.id, sha256="ef" * 32,
                    size_bytes=1000, disk_format="qcow2", status="active"))
        for name in ("node1", "node2"):
            s.add(Host(name=name, vcpus=4, memory_mb=4096, disk_gb=100, labels={},
                       cached_images=[]))
    recorder = Recorder()
    app = create_app(test_config={"TESTING": True, "STORE": store, "DISPATCHER": recorder,
                                  "BUS": None}, settings=settings)
    return Env(app, app.test_client(), store, recorder, state, tokens)


@pytest.fixture
def env(tmp_path: Path, migrated_db: Path) -> Iterator[Env]:
    e = make_env(tmp_path, migrated_db)
    yield e
    e.store.dispose()


def qemu_img(*args: str) -> None:
    run(["qemu-img", *args], timeout=60)


def secret_file(path: Path) -> Path:
    """A host file the hostile images point at, full of MARKER."""
    path.write_bytes(MARKER * (MIB // len(MARKER) + 1))
    return path


def backed_qcow2(tmp_path: Path) -> Path:
    secret = secret_file(tmp_path / "host-secret.raw")
    evil = tmp_path / "backed.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil))
    return evil


def data_file_qcow2(tmp_path: Path) -> Path:
    data = tmp_path / "host-data.raw"
    evil = tmp_path / "datafile.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on", str(evil),
             "1M")
    with data.open("r+b") as fh:  # the guest's disk *is* that host file
        fh.write(MARKER * 100)
    return evil


# -- the header check (pure) ---------------------------------------------------------------


def qcow2_header(version: int = 3, backing: int = 0, size: int = 16 * MIB, crypt: int = 0,
                 incompat: int = 0) -> bytes:
    head = bytearray(HEADER_BYTES)
    head[0:4] = b"QFI\xfb"
    struct.pack_into(">IQI", head, 4, version, backing, 8 if backing else 0)
    struct.pack_into(">I", head, 20, 16)
    struct.pack_into(">Q", head, 24, size)
    struct.pack_into(">I", head, 32, crypt)
    struct.pack_into(">Q", head, 72, incompat)
    struct.pack_into(">I", head, 100, 104)
    return bytes(head)


@pytest.mark.parametrize("head, message", [
    (qcow2_header(backing=512), "backing file"),
    (qcow2_header(incompat=1 << 2), "external data file"),
    (qcow2_header(crypt=2), "encrypted"),
    (qcow2_header(incompat=1 << 1), "corrupt"),
    (qcow2_header(incompat=1 << 9), "features"),
    (qcow2_header(version=1), "version 1"),
    (qcow2_header(size=3 * 1024**4), "above the limit"),
    (qcow2_header(size=0), "no virtual size"),
    (qcow2_header()[:60], "truncated"),
    (b"KDMV" + bytes(508), "VMDK"),
    (b"# Disk DescriptorFile\nparentFileNameHint=\"/etc/shadow\"\n", "VMDK"),
    (b"vhdxfile" + bytes(504), "VHDX"),
    (b"conectix" + bytes(504), "VHD"),
    (b"QED\x00" + bytes(508), "QED"),
    (b"LUKS\xba\xbe" + bytes(506), "LUKS"),
    (b"<<< VirtualBox Disk Image >>>\n".ljust(64, b"\0") + b"\x7f\x10\xda\xbe" + bytes(444),
     "VDI"),
])
def test_header_refusals(head: bytes, message: str) -> None:
    with pytest.raises(ImageRefused, match=message):
        inspect_header(head, None, 2 * 1024**4)


def test_header_decides_and_pins_the_format() -> None:
    assert inspect_header(qcow2_header(), None, 2 * 1024**4) == ("qcow2", 16 * MIB)
    assert inspect_header(b"\0" * 512, 4096, 2 * 1024**4) == ("raw", 4096)
    with pytest.raises(ImageRefused, match="not raw as declared"):
        inspect_header(qcow2_header(), None, 2 * 1024**4, declared="raw")
    with pytest.raises(ImageRefused, match="not qcow2 as declared"):
        inspect_header(b"\0" * 512, 4096, 2 * 1024**4, declared="qcow2")
    with pytest.raises(ImageRefused, match="above the limit"):
        inspect_header(b"\0" * 512, 4096, 1024)


def test_a_refused_header_stops_the_stream_before_anything_is_written(tmp_path: Path) -> None:
    pulled = []

    def chunks() -> Iterator[bytes]:
        yield qcow2_header(backing=512)
        for i in range(100):
            pulled.append(i)
            yield b"\0" * MIB

    with pytest.raises(ImageRefused, match="backing"):
        store_stream(chunks(), tmp_path / "imports" / "x", Limits(10**12, 10**12))
    assert pulled == []  # not one chunk after the header was read
    assert not (tmp_path / "imports").exists() or list((tmp_path / "imports").iterdir()) == []


# -- hostile images through the API: refused at once, nothing of the host file kept ---------


@needs_qemu_img
@pytest.mark.parametrize("how", ["upload", "upload-claiming-raw", "controller-path"])
def test_qcow2_with_a_backing_file_on_the_host_is_refused(env: Env, tmp_path: Path,
                                                          how: str) -> None:
    evil = backed_qcow2(tmp_path)
    if how == "controller-path":
        resp = env.call("POST", "/api/v1/images", json={"name": "evil", "source": str(evil)})
    else:
        resp = env.upload("evil", evil, **({"disk_format": "raw"} if "raw" in how else {}))
    assert resp.status_code == 422, resp.get_json()
    assert "backing file" in resp.get_json()["message"]
    assert str(tmp_path) not in resp.get_data(as_text=True)
    env.assert_nothing_stored()
    assert env.dispatcher.calls == []


@needs_qemu_img
def test_qcow2_with_an_external_data_file_is_refused(env: Env, tmp_path: Path) -> None:
    evil = data_file_qcow2(tmp_path)
    resp = env.upload("evil", evil)
    assert resp.status_code == 422, resp.get_json()
    assert "external data file" in resp.get_json()["message"]
    env.assert_nothing_stored()
    assert env.dispatcher.calls == []


@needs_qemu_img
def test_a_raw_upload_that_is_really_a_qcow2_with_a_backing_file_is_refused(
        env: Env, tmp_path: Path) -> None:
    # Claimed raw, named .raw, a header that says qcow2 with a backing file: the header wins.
    evil = backed_qcow2(tmp_path).rename(tmp_path / "innocent.raw")
    resp = env.upload("innocent", evil, disk_format="raw")
    assert resp.status_code == 422, resp.get_json()
    assert "backing file" in resp.get_json()["message"]
    env.assert_nothing_stored()


@needs_qemu_img
def test_a_clean_qcow2_claimed_raw_is_refused_too(env: Env, tmp_path: Path) -> None:
    img = tmp_path / "clean.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    resp = env.upload("clean", img, disk_format="raw")
    assert resp.status_code == 422
    assert "qcow2 image, not raw as declared" in resp.get_json()["message"]
    env.assert_nothing_stored()


@needs_qemu_img
def test_huge_virtual_sizes_are_refused(env: Env, tmp_path: Path) -> None:
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", str(huge), "3T")  # above the default 2 TiB
    assert huge.stat().st_size < MIB
    resp = env.upload("huge", huge)
    assert resp.status_code == 422
    assert "virtual size (3298534883328 bytes) is above the limit of 2199023255552" in \
        resp.get_json()["message"]
    env.assert_nothing_stored()


@needs_qemu_img
def test_virtual_size_limit_is_a_setting_and_applies_to_raw(tmp_path: Path,
                                                            migrated_db: Path) -> None:
    env = make_env(tmp_path, migrated_db, VIRTFLEET_MAX_VIRTUAL_BYTES=str(8 * MIB))
    try:
        img = tmp_path / "q.qcow2"
        qemu_img("create", "-f", "qcow2", str(img), "16M")
        assert env.upload("q", img).status_code == 422
        resp = env.upload("r", b"\1" * (9 * MIB))
        assert resp.status_code == 422 and "above the limit" in resp.get_json()["message"]
        env.assert_nothing_stored()
        assert env.upload("small", b"\1" * (8 * MIB)).status_code == 202
    finally:
        env.store.dispose()


# -- the control plane's inspection and conversion -------------------------------------------


@needs_qemu_img
def test_raw_upload_is_converted_to_qcow2_by_the_control_plane(env: Env,
                                                               tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as fh:
        fh.write(os.urandom(MIB))
        fh.seek(7 * MIB)
        fh.write(b"the end".ljust(MIB, b"."))
    resp = env.upload("disk", raw, visibility="private")
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert (body["status"], body["original_format"], body["sha256"]) == ("importing", "raw", "")
    assert env.dispatcher.calls == [("inspect_image", "control", body["id"])]
    # Until the control plane is done, VMs may not use it, nor may hosts download it.
    resp = env.call("POST", "/api/v1/vms", json={"name": "early", "image": "disk"})
    assert resp.status_code == 409 and "importing, not active" in resp.get_json()["message"]
    assert env.call("GET", f"/api/v1/images/{body['id']}/data").status_code == 409

    env.run_jobs()
    image = env.image(body["id"])
    assert (image["status"], image["disk_format"], image["original_format"]) == \
        ("active", "qcow2", "raw")
    stored = env.state_dir / "images" / image["sha256"]
    assert [p.name for p in (env.state_dir / "images").iterdir()] == [image["sha256"]]
    assert list((env.state_dir / "imports").iterdir()) == []
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == image["sha256"]
    assert image["size_bytes"] == stored.stat().st_size
    assert stored.read_bytes()[:4] == b"QFI\xfb"
    info = images.info(stored, "qcow2")
    assert info["virtual-size"] == 8 * MIB == image["virtual_size_bytes"]
    assert "backing-filename" not in info
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(stored)], timeout=60)
    data = env.call("GET", f"/api/v1/images/{image['id']}/data")
    assert hashlib.sha256(data.data).hexdigest() == image["sha256"]
    with env.store.sessions() as s:
        ev = s.scalars(select(Event).where(Event.type == c.EV_IMAGE_ACTIVE)).one()
        assert ev.data["image_id"] == image["id"] and ev.project_id is not None


@needs_qemu_img
def test_a_raw_file_of_an_odd_size_becomes_whole_sectors(env: Env) -> None:
    image_id = env.upload("odd", b"\7" * 1000).get_json()["id"]
    env.run_jobs()
    image = env.image(image_id)
    assert (image["status"], image["virtual_size_bytes"]) == ("active", 1024)


@needs_qemu_img
def test_qcow2_upload_is_kept_as_it_is_and_a_twin_is_active_at_once(env: Env,
                                                                    tmp_path: Path) -> None:
    img = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "32M")
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    resp = env.upload("base", img)
    assert resp.status_code == 202 and resp.get_json()["sha256"] == digest
    env.run_jobs()
    first = env.image(resp.get_json()["id"])
    assert (first["status"], first["sha256"], first["virtual_size_bytes"]) == \
        ("active", digest, 32 * MIB)
    # The same bytes again (another name, here through a controller path): already known,
    # already inspected: 201, active, nothing sent, one file in the store.
    resp = env.call("POST", "/api/v1/images", json={"name": "again", "source": str(img)})
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["status"] == "active" and resp.get_json()["sha256"] == digest
    assert env.dispatcher.calls == []
    assert [p.name for p in (env.state_dir / "images").iterdir()] == [digest]
    assert list((env.state_dir / "imports").iterdir()) == []


@needs_qemu_img
def test_a_header_that_passes_but_qemu_img_refuses_ends_in_error(env: Env) -> None:
    bad = bytearray(qcow2_header())
    struct.pack_into(">I", bad, 20, 40)  # cluster_bits 40: qemu-img will not open it
    resp = env.upload("bad", bytes(bad) + bytes(MIB))
    assert resp.status_code == 202
    image_id = resp.get_json()["id"]
    env.run_jobs()
    image = env.image(image_id)
    assert image["status"] == "error"
    assert "qemu-img could not read the image" in image["status_reason"]
    assert str(env.state_dir) not in image["status_reason"]
    assert env.stored_files() == []
    resp = env.call("POST", "/api/v1/vms", json={"name": "vm", "image": "bad"})
    assert resp.status_code == 409
    assert "is error, not active" in resp.get_json()["message"]
    with env.store.sessions() as s:
        ev = s.scalars(select(Event).where(Event.type == c.EV_IMAGE_ERROR)).one()
        assert ev.data["reason"] == image["status_reason"]


@needs_qemu_img
def test_the_job_refuses_a_backing_file_the_header_check_missed(env: Env,
                                                                tmp_path: Path) -> None:
    # Defence in depth: pretend the web let it through (pinned qcow2) and run the job.
    evil = backed_qcow2(tmp_path)
    src = env.state_dir / "imports" / "img-x"
    src.parent.mkdir()
    shutil.copyfile(evil, src)
    with pytest.raises(imagejobs.ImportFailed, match="backing file"):
        imagejobs.process(src, "qcow2", env.settings)
    assert not (env.state_dir / "images").exists() or \
        list((env.state_dir / "images").iterdir()) == []
    env.assert_marker_absent()


@needs_qemu_img
def test_a_lost_import_file_and_a_redelivered_job(env: Env, tmp_path: Path) -> None:
    img = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    image_id = env.upload("base", img).get_json()["id"]
    calls = list(env.dispatcher.calls)
    env.run_jobs()
    assert env.image(image_id)["status"] == "active"
    env.dispatcher.calls = calls
    env.run_jobs()  # redelivered: nothing changes
    assert env.image(image_id)["status"] == "active"
    image_id = env.upload("lost", b"\1" * MIB).get_json()["id"]
    (env.state_dir / "imports" / image_id).unlink()
    env.run_jobs()
    assert env.image(image_id)["status"] == "error"
    assert "register the image again" in env.image(image_id)["status_reason"]


@needs_qemu_img
def test_the_runner_works_off_the_caller_and_resumes_interrupted_imports(env: Env) -> None:
    first = env.upload("one", b"\1" * MIB).get_json()["id"]
    second = env.upload("two", b"\2" * MIB).get_json()["id"]
    published: list[Event] = []
    runner = imagejobs.Runner(env.store, env.settings, published.append)
    try:
        runner.submit(first)
        runner.resume()  # finds both importing; `first` is not run twice
        deadline = time.monotonic() + 60
        while len(published) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.shutdown()
    assert sorted(ev.data["image_id"] for ev in published) == sorted([first, second])
    assert {env.image(i)["status"] for i in (first, second)} == {"active"}


def test_leftovers_of_cut_off_uploads_are_removed_after_a_day(env: Env) -> None:
    keep = env.upload("keep", b"\1" * MIB).get_json()["id"]
    imports = env.state_dir / "imports"
    old = time.time() - 2 * 86400
    for name in (".partial-upload", "orphan-id", "fresh-orphan"):
        (imports / name).write_bytes(b"x")
    for name in (keep, ".partial-upload", "orphan-id"):
        os.utime(imports / name, (old, old))
    removed = imagejobs.remove_leftovers(imports, {keep})
    assert sorted(removed) == [".partial-upload", "orphan-id"]
    assert sorted(p.name for p in imports.iterdir()) == sorted([keep, "fresh-orphan"])


def test_broker_down_keeps_nothing(env: Env) -> None:
    env.dispatcher.fail = True
    resp = env.upload("x", b"\1" * MIB)
    assert resp.status_code == 503
    assert env.stored_files() == []
    with env.store.sessions() as s:
        assert s.scalars(select(Image).where(Image.name == "x")).first() is None


# -- uploads stream -----------------------------------------------------------------------


class LazyBody:
    """A request body made on the fly, recording how it is read."""

    def __init__(self, size: int) -> None:
        self.size, self.pos, self.sent, self.largest_read = size, 0, 0, 0

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        n = left if n is None or n < 0 else min(n, left)
        self.largest_read = max(self.largest_read, n)
        self.pos += n
        self.sent += n
        return b"\x5a" * n

    # The test client measures the body by seeking to its end and back: nothing is made.
    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self.size + offset if whence == 2 else offset
        return self.pos


def test_upload_streams_past_max_content_length_in_bounded_memory(env: Env) -> None:
    size = 48 * MIB  # three times the app's 16 MiB MAX_CONTENT_LENGTH for JSON bodies
    assert env.app.config["MAX_CONTENT_LENGTH"] < size
    body = LazyBody(size)
    tracemalloc.start()
    try:
        resp = env.call("POST", "/api/v1/images/upload?name=big", input_stream=body,
                        headers={"Content-Type": "application/octet-stream"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status_code == 202, resp.get_json()
    assert body.sent == size and body.largest_read <= MIB
    assert peak < 8 * MIB, f"peak {peak} bytes: the body was held in memory"
    stored = env.state_dir / "imports" / resp.get_json()["id"]
    assert stored.stat().st_size == size and resp.get_json()["size_bytes"] == size


def test_upload_above_max_image_bytes_is_413_and_stops_reading(tmp_path: Path,
                                                              migrated_db: Path) -> None:
    env = make_env(tmp_path, migrated_db, VIRTFLEET_MAX_IMAGE_BYTES=str(4 * MIB))
    try:
        # A declared length above the limit: refused before a byte is read.
        body = LazyBody(64 * MIB)
        resp = env.call("POST", "/api/v1/images/upload?name=big", input_stream=body)
        assert resp.status_code == 413 and body.sent == 0
        assert "larger than the limit" in resp.get_json()["message"]
        # A chunked body (no length) that goes on and on: reading stops at the limit.
        body = LazyBody(64 * MIB)
        resp = env.call("POST", "/api/v1/images/upload?name=big", input_stream=body,
                        environ_overrides={"wsgi.input_terminated": True,
                                           "HTTP_TRANSFER_ENCODING": "chunked"})
        assert resp.status_code == 413, resp.get_json()
        assert resp.get_json()["message"] == \
            f"the image is larger than the limit of {4 * MIB} bytes"
        assert body.sent <= 5 * MIB
        assert env.stored_files() == []
        assert env.upload("fits", b"\1" * (4 * MIB)).status_code == 202
    finally:
        env.store.dispose()


def test_upload_checks_name_and_rights_before_reading(env: Env) -> None:
    body = LazyBody(8 * MIB)
    resp = env.call("POST", "/api/v1/images/upload?name=debian", who="alice",
                    input_stream=body)
    assert resp.status_code == 409 and body.sent == 0
    resp = env.call("POST", "/api/v1/images/upload?name=pub&visibility=public", who="alice",
                    input_stream=body)
    assert resp.status_code == 409 and "admins" in resp.get_json()["message"]
    resp = env.call("POST", "/api/v1/images/upload?name=Bad&extra=1", input_stream=body)
    assert resp.status_code == 422 and body.sent == 0
    assert env.call("POST", "/api/v1/images/upload?name=x", who=None).status_code == 401
    assert env.upload("empty", b"").status_code == 422


# -- URLs: http(s) only, public addresses only, every redirect checked ----------------------


class Hop(http.server.BaseHTTPRequestHandler):
    hits = 0
    location = ""
    body = b""
    hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        type(self).hits += 1
        type(self).hosts = [*type(self).hosts, str(self.headers.get("Host", ""))]
        if self.location:
            self.send_response(302)
            self.send_header("Location", self.location)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[Any]:
    """Local HTTP servers on 127.0.0.1; `make(...)` returns (port, handler class)."""
    started = []

    def make(location: str = "", body: bytes = b"") -> tuple[int, type[Hop]]:
        handler = type("H", (Hop,), {"hits": 0, "location": location, "body": body})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server.server_address[1], handler

    yield make
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def first_hop_allowed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The address check lets exactly one host through once: the test's own first hop on
    127.0.0.1. Every later hop meets the real check."""
    real = download.check_public
    seen: list[str] = []

    def check(host: str) -> list[str]:
        seen.append(host)
        if len(seen) == 1:
            assert host == "127.0.0.1"
            return ["127.0.0.1"]
        return real(host)

    monkeypatch.setattr(download, "check_public", check)
    return seen


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
    "http://100.100.100.200/latest/meta-data", "http://[fe80::1]/", "http://0.0.0.0:{port}/",
    "http://localhost:{port}/", "http://127.0.0.1:{port}/", "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/", "http://2130706433:{port}/",
])
def test_urls_to_refused_addresses_are_never_contacted(env: Env, servers: Any,
                                                       url: str) -> None:
    port, handler = servers()
    resp = env.call("POST", "/api/v1/images", who="alice",
                    json={"name": "x", "source": url.format(port=port)})
    assert resp.status_code == 400, resp.get_json()
    assert "not allowed" in resp.get_json()["message"]
    assert handler.hits == 0
    assert env.stored_files() == []


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://example.org/x.qcow2",
                                    "gopher://example.org/", "FILE:///etc/hostname"])
def test_only_http_and_https(env: Env, source: str) -> None:
    resp = env.call("POST", "/api/v1/images", json={"name": "x", "source": source})
    assert resp.status_code == 400 and "http" in resp.get_json()["message"]


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/secret",
                                    "http://169.254.169.254/latest/meta-data/",
                                    "http://[::1]:{port}/", "file:///etc/passwd"])
def test_a_redirect_to_a_refused_address_is_refused_without_contacting_it(
        env: Env, servers: Any, first_hop_allowed: list[str], target: str) -> None:
    inner_port, inner = servers(body=MARKER * 1000)
    outer_port, outer = servers(location=target.format(port=inner_port))
    resp = env.call("POST", "/api/v1/images", who="alice",
                    json={"name": "x", "source": f"http://127.0.0.1:{outer_port}/img"})
    assert resp.status_code == 400, resp.get_json()
    assert "not allowed" in resp.get_json()["message"] or "http" in resp.get_json()["message"]
    assert outer.hits == 1 and inner.hits == 0
    env.assert_nothing_stored()


def test_the_fetch_goes_to_the_checked_address_not_a_second_answer(
        servers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name is resolved once, by the check, and the connection goes to
    that address; the request still names the host. A resolver asked again is never
    consulted for it (here it would answer 127.0.0.2, where nothing listens: the test stays
    on loopback even if that ever regressed)."""
    port, handler = servers(body=MARKER)
    monkeypatch.setattr(download, "check_public",
                        lambda host: ["127.0.0.1"] if host == "rebind.test" else [])
    asked: list[str] = []
    real = socket.getaddrinfo

    def resolver(host: Any, *args: Any, **kw: Any) -> Any:
        asked.append(str(host))
        if host == "rebind.test":
            return real("127.0.0.2", *args, **kw)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    body = b"".join(download.stream(f"http://rebind.test:{port}/img"))
    assert body == MARKER and handler.hits == 1
    assert handler.hosts == [f"rebind.test:{port}"]
    assert "rebind.test" not in asked


@needs_qemu_img
def test_a_url_import_that_passes_every_check(env: Env, servers: Any,
                                              first_hop_allowed: list[str],
                                              tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    port, handler = servers(body=img.read_bytes())
    resp = env.call("POST", "/api/v1/images", who="alice",
                    json={"name": "fromurl", "source": f"http://127.0.0.1:{port}/u.qcow2"})
    assert resp.status_code == 202, resp.get_json()
    env.run_jobs()
    image = env.image(resp.get_json()["id"])
    assert image["status"] == "active"
    assert image["sha256"] == hashlib.sha256(img.read_bytes()).hexdigest()


# -- prewarm and what hosts report ----------------------------------------------------------


def test_prewarm_sends_the_image_to_each_chosen_host(env: Env) -> None:
    resp = env.call("POST", "/api/v1/images/img-a/prewarm",
                    json={"hosts": ["node1", "node2", "node1"]})
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json() == {"image_id": "img-a", "sha256": "ef" * 32,
                               "hosts": ["node1", "node2"]}
    ref = {"id": "img-a", "sha256": "ef" * 32, "disk_format": "qcow2", "size_bytes": 1000,
           "url": "http://ctl.example:8080/api/v1/images/img-a/data"}
    assert env.dispatcher.calls == [("prewarm", "node1", {"image": ref}),
                                    ("prewarm", "node2", {"image": ref})]


def test_prewarm_is_for_admins_known_hosts_and_active_images(env: Env) -> None:
    body = {"hosts": ["node1"]}
    assert env.call("POST", "/api/v1/images/img-a/prewarm", who="alice",
                    json=body).status_code == 403
    resp = env.call("POST", "/api/v1/images/img-a/prewarm", json={"hosts": ["node1", "nope"]})
    assert resp.status_code == 404 and "nope" in resp.get_json()["message"]
    assert env.call("POST", "/api/v1/images/img-a/prewarm",
                    json={"hosts": []}).status_code == 422
    image_id = env.upload("later", b"\1" * MIB).get_json()["id"]
    resp = env.call("POST", f"/api/v1/images/{image_id}/prewarm", json=body)
    assert resp.status_code == 409 and "importing" in resp.get_json()["message"]
    assert [x for x in env.dispatcher.calls if x[0] == "prewarm"] == []


def test_image_cached_events_update_the_host(env: Env) -> None:
    event = c.make_event(c.EV_IMAGE_CACHED, host="node1", image_id="img-a", sha256="ef" * 32)
    with env.store.session() as s:
        imagejobs.HANDLERS[c.EV_IMAGE_CACHED](s, event)
        imagejobs.HANDLERS[c.EV_IMAGE_CACHED](s, event)  # twice: listed once
    hosts = {h["name"]: h for h in env.call("GET", "/api/v1/hosts").get_json()}
    assert hosts["node1"]["cached_images"] == ["ef" * 32]
    assert hosts["node2"]["cached_images"] == []


# -- the subprocess memory limit and the settings -------------------------------------------


def test_memory_limit_caps_the_child() -> None:
    grab = ["python3", "-c", "b = bytearray(768 * 1024 * 1024); print(len(b))"]
    with pytest.raises(ProcError) as err:
        run(grab, timeout=30, memory_limit=256 * MIB)
    assert err.value.cmd == "python3"
    assert run(grab, timeout=30, memory_limit=2048 * MIB).stdout.strip() == b"805306368"
    with pytest.raises(ValueError):
        run(["true"], timeout=5, memory_limit=0)


def test_image_settings_defaults_and_checks(tmp_path: Path) -> None:
    cfg = empty_config(tmp_path)
    s = load_settings(env={}, path=cfg)
    assert (s.max_virtual_bytes, s.cache_max_bytes, s.cache_gc_interval) == \
        (2 * 1024**4, 20 * 1024**3, 300.0)
    for name, value in (("MAX_VIRTUAL_BYTES", "0"), ("CACHE_MAX_BYTES", "-1"),
                        ("CACHE_GC_INTERVAL", "0"), ("CACHE_MAX_BYTES", "lots")):
        with pytest.raises(ConfigError, match=name.lower()):
            load_settings(env={f"VIRTFLEET_{name}": value}, path=cfg)


# -- the host cache clean-up, with real overlays ----------------------------------------------


def make_cached_base(storage: Path, tag: str, mib: int, age: float) -> tuple[str, Path]:
    """A real qcow2 base of about `mib` MiB of data in the cache, last used `age` s ago."""
    sha = hashlib.sha256(tag.encode()).hexdigest()
    bases = cache.bases_dir(storage)
    bases.mkdir(parents=True, exist_ok=True)
    raw = storage / f"{tag}.raw"
    raw.write_bytes(os.urandom(mib * MIB))
    base = cache.base_path(storage, sha)
    images.convert(raw, "raw", base, "qcow2")
    raw.unlink()
    cache.base_virtual_size(base)  # writes the .size memo
    t = time.time() - age
    os.utime(base, (t, t))
    return sha, base


def make_overlay(storage: Path, vm: str, base: Path, name: str = "disk.qcow2") -> Path:
    inst = cache.instances_dir(storage) / vm
    inst.mkdir(parents=True, exist_ok=True)
    disk = inst / name
    run(["qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk)],
        timeout=30)
    return disk


@needs_qemu_img
def test_builds_reading_a_new_bases_size_at_once_all_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's builds are threads of one process: several starting on a base just
    fetched each read its size and write the memo; none may fail for another's write."""
    base = tmp_path / "base.qcow2"
    images.create_empty_qcow2(base, 3 * MIB)
    read = images.virtual_size
    start = threading.Barrier(6)

    def slow_read(path: Path, fmt: str) -> int:
        size = read(path, fmt)
        time.sleep(0.05)  # all six have read before any writes the memo
        return size

    monkeypatch.setattr(images, "virtual_size", slow_read)
    sizes: list[int] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            start.wait()
            sizes.append(cache.base_virtual_size(base))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sizes == [3 * MIB] * 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "base.size"]


def test_gc_removes_unused_bases_least_recently_used_first_until_under_the_limit(
        tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    oldest_used, b_old = make_cached_base(storage, "used-by-vm", 2, age=5000)
    old, _ = make_cached_base(storage, "old", 2, age=4000)
    mid, _ = make_cached_base(storage, "mid", 2, age=3000)
    new, _ = make_cached_base(storage, "new", 2, age=2000)
    creating, b_creating = make_cached_base(storage, "creating", 2, age=1000)
    make_overlay(storage, "vm-1", b_old)
    make_overlay(storage, "vm-2", b_creating, ".disk.qcow2.tmp")  # an overlay being made
    size = cache.cache_size(storage)
    one = size // 5
    partial = cache.bases_dir(storage) / ".0123456789ab-partial"
    partial.write_bytes(b"x")  # a download in progress: neither counted nor touched

    # Above the limit by a bit more than one base: the least recently used unused base
    # goes ("used-by-vm" is older but in use), and then one more.
    report = cache.collect_garbage(storage, size - one - 1)
    assert report.removed == [old, mid]
    assert report.kept_in_use == [oldest_used]
    assert sorted(cache.cached(storage)) == sorted([oldest_used, new, creating])
    assert not (cache.bases_dir(storage) / f"{old}.size").exists()
    assert not (cache.bases_dir(storage) / f"{mid}.size").exists()
    assert (cache.bases_dir(storage) / f"{oldest_used}.size").exists()
    assert partial.exists()
    assert report.size_after <= size - one - 1

    # Under the limit: nothing more goes. At 0, every unused base goes, in-use ones stay.
    assert cache.collect_garbage(storage, report.size_after).removed == []
    assert cache.collect_garbage(storage, 0).removed == [new]
    assert sorted(cache.cached(storage)) == sorted([oldest_used, creating])
    # The VMs' disks still read through their bases.
    for vm in ("vm-1",):
        run(["qemu-img", "check", "-f", "qcow2",
             str(cache.instances_dir(storage) / vm / "disk.qcow2")], timeout=30)


@needs_qemu_img
def test_gc_keeps_recently_used_bases_and_refuses_to_guess(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    recent, base = make_cached_base(storage, "recent", 1, age=10)
    assert cache.collect_garbage(storage, 0).removed == []  # within the grace period
    # ensure_base of a cached base touches it (what "least recently used" is made of)
    t = time.time() - 9000
    os.utime(base, (t, t))
    assert cache.ensure_base(storage, {"sha256": recent, "url": "http://unused"}, "") == base
    assert time.time() - base.stat().st_mtime < 60
    os.utime(base, (t, t))
    # An instance disk that cannot be read: no clean-up rather than a guess.
    inst = cache.instances_dir(storage) / "vm-x"
    inst.mkdir(parents=True)
    (inst / "disk.qcow2").write_bytes(b"not a qcow2 image")
    with pytest.raises(ProcError):
        cache.collect_garbage(storage, 0)
    assert cache.cached(storage) == [recent]
    shutil.rmtree(inst)
    assert cache.collect_garbage(storage, 0).removed == [recent]
    assert cache.cached(storage) == []


# -- sparse storing: zero blocks are holes, the bytes read back the same ---------------------


BLOCK = imports.SPARSE_BLOCK


@pytest.mark.parametrize("chunk, end, runs", [
    (bytes(imports.CHUNK), None, []),
    (b"\1" * imports.CHUNK, None, [(0, imports.CHUNK)]),
    (bytes(BLOCK) + b"\1" + bytes(BLOCK - 1) + bytes(BLOCK), None, [(BLOCK, 2 * BLOCK)]),
    (bytes(BLOCK - 1), None, [(0, BLOCK - 1)]),  # a zero block cut short is data
    (b"\1" * 10 + bytes(2 * BLOCK - 10), None, [(0, BLOCK)]),
    (b"\1" * 10 + bytes(2 * BLOCK + 10), None, [(0, BLOCK), (2 * BLOCK, 2 * BLOCK + 20)]),
    (b"\1" * 10 + bytes(2 * BLOCK + 10), 2 * BLOCK, [(0, BLOCK)]),
    (b"", None, []),
])
def test_data_runs(chunk: bytes, end: int | None, runs: list[tuple[int, int]]) -> None:
    assert imports.data_runs(chunk, end) == runs


def sparse_file(path: Path, size: int, data: dict[int, bytes]) -> Path:
    """A sparse file of `size` with `data` at offsets (holes elsewhere)."""
    with path.open("wb") as fh:
        fh.truncate(size)
        for off, blob in data.items():
            fh.seek(off)
            fh.write(blob)
    return path


def sparse_disk(path: Path, size: int, data: dict[int, bytes]) -> bytes:
    """:func:`sparse_file`'s whole content."""
    return sparse_file(path, size, data).read_bytes()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_zero_blocks_are_stored_as_holes_and_read_back_the_same(tmp_path: Path) -> None:
    data = {0: b"\xeb\x63" + os.urandom(5000), 3 * MIB + 7: os.urandom(70_000),
            9 * MIB: bytes(BLOCK) + b"x", 16 * MIB - 3: b"end"}
    content = sparse_disk(tmp_path / "src", 16 * MIB, data)

    def chunks() -> Iterator[bytes]:  # every byte sent, holes included, in uneven chunks
        for i in range(0, len(content), 300_001):
            yield content[i:i + 300_001]

    stored = store_stream(chunks(), tmp_path / "imports" / "a", Limits(10**12, 10**12))
    assert stored.path.read_bytes() == content
    assert (stored.size_bytes, stored.disk_format) == (16 * MIB, "raw")
    assert allocated(stored.path) <= 8 * BLOCK  # five runs of data, not 16 MiB


def test_a_sparse_qcow2_keeps_its_sha256(tmp_path: Path) -> None:
    content = qcow2_header() + bytes(3 * MIB) + b"\1" * 100 + bytes(MIB)
    stored = store_stream(iter([content[:1000], content[1000:]]), tmp_path / "q",
                          Limits(10**12, 10**12))
    assert stored.sha256 == hashlib.sha256(content).hexdigest()
    assert stored.path.read_bytes() == content
    assert allocated(stored.path) < MIB


@pytest.mark.parametrize("layout", ["holes", "dense", "ends-in-a-hole", "all-hole-but-head"])
def test_a_local_file_is_read_without_its_holes(tmp_path: Path, layout: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    size = 8 * MIB + 123
    data = {"holes": {0: b"\1" * 10, 2 * MIB: os.urandom(3 * MIB), size - 5: b"\2" * 5},
            "dense": {0: os.urandom(size)},
            "ends-in-a-hole": {0: b"\1" * 10, MIB: b"\3" * MIB},
            "all-hole-but-head": {0: b"\4"}}[layout]
    src = tmp_path / "disk.raw"
    content = sparse_disk(src, size, data)
    read = []
    real_read = imports._sparse_read

    def counting(fh: Any) -> Iterator[bytes]:
        real = fh.read

        def read_and_count(n: int = -1) -> bytes:
            out = real(n)
            read.append(len(out))
            return out

        fh.read = read_and_count
        return real_read(fh)

    monkeypatch.setattr(imports, "_sparse_read", counting)
    chunks = list(imports.source_chunks(str(src), allow_local=True))
    assert all(len(c) <= imports.CHUNK for c in chunks)
    assert b"".join(chunks) == content
    written = sum(len(b) for b in data.values())
    assert written <= sum(read) < written + 2 * imports.CHUNK  # the holes were not read


@needs_qemu_img
def test_a_conversion_the_store_already_has_is_removed_after_the_image_is_active(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"\1" * MIB
    first = env.upload("one", body).get_json()["id"]
    env.run_jobs()
    sha = env.image(first)["sha256"]
    seen: dict[str, Any] = {}
    real_finish = imagejobs._finish

    def finish(store: Store, image_id: str, result: Any, reason: str) -> Any:
        seen["twin_at_finish"] = result.twin_copy is not None and result.twin_copy.exists()
        return real_finish(store, image_id, result, reason)

    monkeypatch.setattr(imagejobs, "_finish", finish)
    second = env.upload("two", body).get_json()["id"]
    env.run_jobs()
    assert env.image(second)["status"] == "active" and env.image(second)["sha256"] == sha
    assert seen == {"twin_at_finish": True}  # not removed on the way to active ...
    assert [p.name for p in (env.state_dir / "images").iterdir()] == [sha]  # ... but after


def test_leftover_conversions_in_the_store_are_removed_after_a_day(env: Env) -> None:
    store_dir = env.state_dir / "images"
    store_dir.mkdir()
    names = [".convert-old.qcow2", ".convert-busy.qcow2", "ab" * 32]
    for name in names:
        (store_dir / name).write_bytes(b"x")
        old = time.time() - 2 * 86400
        os.utime(store_dir / name, (old, old))
    removed = imagejobs.remove_leftovers(store_dir, {".convert-busy.qcow2"},
                                         prefix=imagejobs.CONVERT_PREFIX)
    assert removed == [".convert-old.qcow2"]
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(names[1:])


@needs_qemu_img
def test_gc_removes_a_base_with_its_overlay_templates(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    sha, base = make_cached_base(storage, "templated", 1, age=5000)
    inst = cache.instances_dir(storage) / "vm-gone"
    inst.mkdir(parents=True)
    images.create_overlay(base, inst / "disk.qcow2", MIB, base_size=cache.base_virtual_size(base))
    assert len(images.overlay_templates(base)) == 1
    shutil.rmtree(inst)  # the VM was deleted: the base is unused
    t = time.time() - 5000
    os.utime(base, (t, t))
    assert cache.collect_garbage(storage, 0).removed == [sha]
    assert images.overlay_templates(base) == []
    assert sorted(p.name for p in cache.bases_dir(storage).iterdir()
                  if not p.name.endswith(".lock")) == []


# -- an upload's body straight from gunicorn's socket, hashed and written back behind --------


def gunicorn_body(length: int, read_ahead: bytes) -> tuple[Any, Any, Any, Any]:
    """gunicorn's own Body over a LengthReader over a SocketUnreader of one end of a socket
    pair, `read_ahead` already held by the unreader (as after parsing the headers)."""
    import socket

    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader
    server, client = socket.socketpair()
    unreader = SocketUnreader(server)
    if read_ahead:
        unreader.unread(read_ahead)
    reader = LengthReader(unreader, length)
    return Body(reader), reader, server, client


def test_a_gunicorn_body_is_received_straight_from_the_socket() -> None:
    body_bytes = os.urandom(3 * imports.CHUNK + 12345)
    pipelined = b"GET /next HTTP/1.1\r\n\r\n"
    head = body_bytes[:5000]
    body, reader, server, client = gunicorn_body(len(body_bytes), head)
    sender = threading.Thread(target=client.sendall, args=(body_bytes[5000:] + pipelined,))
    try:
        sender.start()
        chunks = imports.request_body({"wsgi.input": body, "gunicorn.socket": server})
        got = list(chunks)
        sender.join()
        assert b"".join(got) == body_bytes
        assert got[0] == head and all(len(c) <= imports.CHUNK for c in got)
        assert reader.length == 0 and not body.failed  # gunicorn sees the body read
        # What came behind the body is the next request's: still there for gunicorn.
        assert reader.unreader.read(len(pipelined)) == pipelined
    finally:
        server.close()
        client.close()


def test_read_ahead_past_a_small_body_is_given_back() -> None:
    body, reader, server, client = gunicorn_body(10, b"0123456789NEXT")
    try:
        assert list(imports.request_body({"wsgi.input": body, "gunicorn.socket": server})) \
            == [b"0123456789"]
        assert reader.length == 0 and reader.unreader.read(4) == b"NEXT"
    finally:
        server.close()
        client.close()


def test_a_body_cut_short_is_refused_and_the_connection_marked_failed() -> None:
    body, reader, server, client = gunicorn_body(2 * MIB, b"")
    client.sendall(b"\1" * 1000)
    client.close()
    try:
        with pytest.raises(imports.BodyCutShort):
            list(imports.request_body({"wsgi.input": body, "gunicorn.socket": server}))
        assert body.failed and reader.length == 2 * MIB - 1000
    finally:
        server.close()


def test_a_body_left_unread_marks_the_connection_failed_so_gunicorn_closes_it() -> None:
    """An upload refused part way (too large, a bad header or frame) stops reading: the
    connection must not be kept, or gunicorn would receive and drop the rest of the body
    (its drain) before serving anything else on it."""
    from gunicorn.http.parser import RequestParser
    body, reader, server, client = gunicorn_body(8 * MIB, b"")

    def send() -> None:
        with contextlib.suppress(OSError):  # the test closes the connection mid-way
            client.sendall(b"\2" * (2 * imports.CHUNK))

    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        chunks = imports.request_body({"wsgi.input": body, "gunicorn.socket": server})
        assert len(next(chunks)) == imports.CHUNK
        assert not body.failed
        chunks.close()  # what the upload route does when it refuses the image
        assert body.failed and reader.length == 8 * MIB - imports.CHUNK
        parser = RequestParser.__new__(RequestParser)
        parser.mesg = type("Message", (), {"body": body})()
        assert parser.finish_body() is False  # gunicorn: close, do not drain
    finally:
        client.close()
        server.close()
        sender.join(timeout=10)


def test_other_inputs_take_the_generic_reader() -> None:
    import io
    body, _, server, client = gunicorn_body(3, b"abc")
    try:
        assert imports._socket_body({"wsgi.input": body}) is None  # no socket given
        body.read(1)  # something read already: gunicorn's reader goes on
        assert imports._socket_body({"wsgi.input": body, "gunicorn.socket": server}) is None
        environ = {"wsgi.input": io.BytesIO(b"xyz"), "CONTENT_LENGTH": "3",
                   "wsgi.input_terminated": True}
        assert list(imports.request_body(environ)) == [b"xyz"]
    finally:
        server.close()
        client.close()


def test_the_hash_behind_matches_and_leaves_no_thread() -> None:
    pieces = [os.urandom(n) for n in (1, 4096, imports.CHUNK, 77, imports.CHUNK)] * 5
    before = threading.active_count()
    h = imports.HashBehind()
    for piece in pieces:
        h.update(piece)
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()  # asked again
    h.close()
    stopped = imports.HashBehind()
    stopped.update(b"x" * 10)
    stopped.close()  # a failed upload: stopped without a result
    stopped.close()
    assert threading.active_count() == before


def test_writeback_is_asked_for_every_step_behind_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[int, int]] = []
    real = writeback.start_writeback

    def record(fd: int, offset: int, length: int) -> bool:
        asked.append((offset, length))
        assert threading.current_thread().name == "upload-writeback"
        return real(fd, offset, length)

    monkeypatch.setattr(writeback, "start_writeback", record)
    monkeypatch.setattr(imports, "WRITEBACK_STEP", 2 * MIB)
    content = os.urandom(5 * MIB) + bytes(3 * MIB) + b"tail"
    before = threading.active_count()
    stored = store_stream((content[i:i + imports.CHUNK]
                           for i in range(0, len(content), imports.CHUNK)),
                          tmp_path / "imports" / "w", Limits(10**12, 10**12))
    assert stored.path.read_bytes() == content
    assert threading.active_count() == before
    # Contiguous, in order, the whole file, in steps of at least WRITEBACK_STEP.
    assert asked[0][0] == 0 and sum(n for _, n in asked) == len(content)
    assert all(a + n == b for (a, n), (b, _) in zip(asked, asked[1:], strict=False))
    assert all(n >= 2 * MIB for _, n in asked[:-1])
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert real(fd, 0, 0) is False  # nothing to write: not even asked
    finally:
        os.close(fd)


def test_a_refused_upload_stops_the_threads_it_started(tmp_path: Path) -> None:
    before = threading.active_count()
    content = qcow2_header() + os.urandom(3 * MIB)
    with pytest.raises(imports.ImageTooLarge):
        store_stream(iter([content[:MIB], content[MIB:2 * MIB], content[2 * MIB:]]),
                     tmp_path / "imports" / "big", Limits(2 * MIB, 10**12))
    assert threading.active_count() == before
    assert list((tmp_path / "imports").iterdir()) == []


# -- an admin's raw file on the controller: linked, converted from where it is -----------------


@needs_qemu_img
def test_an_admins_raw_file_is_linked_not_copied_and_converted_from_there(
        env: Env, tmp_path: Path) -> None:
    raw = tmp_path / "admin" / "disk.raw"
    raw.parent.mkdir()
    content = sparse_disk(raw, 16 * MIB, {0: os.urandom(MIB), 9 * MIB: b"end" * 1000})
    resp = env.call("POST", "/api/v1/images", json={"name": "linked", "source": str(raw)})
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    assert (body["original_format"], body["size_bytes"]) == ("raw", 16 * MIB)
    link = env.state_dir / "imports" / body["id"]
    assert link.is_symlink() and os.readlink(link) == str(raw.resolve())
    env.run_jobs()
    image = env.image(body["id"])
    assert (image["status"], image["disk_format"]) == ("active", "qcow2"), image
    stored = env.state_dir / "images" / image["sha256"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == image["sha256"]
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(stored)], timeout=60)
    assert raw.read_bytes() == content  # the admin's file as it was, where it was
    assert list((env.state_dir / "imports").iterdir()) == []  # link and lock gone
    assert str(raw) not in str(image)  # a controller path is never shown


@needs_qemu_img
def test_two_imports_of_one_file_each_get_their_own_lock(env: Env, tmp_path: Path) -> None:
    raw = tmp_path / "shared.raw"
    raw.write_bytes(os.urandom(MIB))
    ids = [env.call("POST", "/api/v1/images", json={"name": n, "source": str(raw)})
           .get_json()["id"] for n in ("one", "two")]
    lock = imagejobs.lock_path(env.state_dir / "imports" / ids[0])
    with lock.open("ab") as held:  # another scheduler process has the first one in hand
        import fcntl
        fcntl.flock(held, fcntl.LOCK_EX)
        assert imagejobs.inspect_image(env.store, env.settings, ids[0]) is None
        assert imagejobs.inspect_image(env.store, env.settings, ids[1]) is not None
    assert env.image(ids[0])["status"] == "importing"
    assert env.image(ids[1])["status"] == "active"
    assert imagejobs.inspect_image(env.store, env.settings, ids[0]) is not None
    assert env.image(ids[0])["sha256"] == env.image(ids[1])["sha256"]
    assert list((env.state_dir / "imports").iterdir()) == []


@needs_qemu_img
def test_a_linked_file_gone_before_the_job_ends_in_error(env: Env, tmp_path: Path) -> None:
    raw = tmp_path / "gone.raw"
    raw.write_bytes(b"\1" * MIB)
    image_id = env.call("POST", "/api/v1/images",
                        json={"name": "gone", "source": str(raw)}).get_json()["id"]
    raw.unlink()
    env.run_jobs()
    image = env.image(image_id)
    assert image["status"] == "error"
    assert "no longer on the controller" in image["status_reason"]
    assert str(tmp_path) not in image["status_reason"]
    assert list((env.state_dir / "imports").iterdir()) == []


def test_a_local_source_must_be_a_regular_file_within_the_limits(tmp_path: Path) -> None:
    dest = tmp_path / "imports" / "x"
    for bad, message in ((str(tmp_path), "cannot be read"), (os.devnull, "regular file")):
        with pytest.raises(imports.BadRequest, match=message):
            imports.store_local(bad, dest, Limits(10**12, 10**12))
    raw = tmp_path / "big.raw"
    raw.write_bytes(b"\1" * (2 * MIB))
    with pytest.raises(imports.ImageTooLarge):
        imports.store_local(str(raw), dest, Limits(MIB, 10**12))
    with pytest.raises(ImageRefused, match="above the limit"):
        imports.store_local(str(raw), dest, Limits(10**12, MIB))
    with pytest.raises(ImageRefused, match="not qcow2 as declared"):
        imports.store_local(str(raw), dest, Limits(10**12, 10**12), "qcow2")
    with pytest.raises(imports.BadRequest, match="absolute"):
        imports.store_local("big.raw", dest, Limits(10**12, 10**12))
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_a_local_qcow2_is_copied_with_its_sha256(tmp_path: Path) -> None:
    src = tmp_path / "q.qcow2"
    content = qcow2_header() + os.urandom(MIB)
    src.write_bytes(content)
    stored = imports.store_local(str(src), tmp_path / "imports" / "q", Limits(10**12, 10**12))
    assert not stored.path.is_symlink() and stored.path.read_bytes() == content
    assert (stored.disk_format, stored.sha256) == ("qcow2", hashlib.sha256(content).hexdigest())


@needs_qemu_img
def test_the_job_names_a_file_durably(env: Env, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    real = imagejobs.sync_dir

    def record(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(imagejobs, "sync_dir", record)
    img = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "16M")
    qcow2_id = env.upload("q", img).get_json()["id"]
    raw_id = env.upload("r", b"\3" * MIB).get_json()["id"]
    env.run_jobs()
    assert synced == [env.state_dir / "images"] * 2
    with env.store.sessions() as s:
        timings = {ev.data["image_id"]: set(ev.data["timings"]) for ev in
                   s.scalars(select(Event).where(Event.type == c.EV_IMAGE_ACTIVE))}
    assert timings[qcow2_id] == {"inspect_s", "sync_s", "publish_s"}
    assert timings[raw_id] == {"inspect_s", "convert_s", "hash_s", "sync_wait_s", "publish_s"}


def test_an_old_dangling_link_in_imports_is_a_leftover(env: Env, tmp_path: Path) -> None:
    imports_dir = env.state_dir / "imports"
    imports_dir.mkdir()
    (imports_dir / "dangling").symlink_to(tmp_path / "nowhere")
    (imports_dir / ".busy.lock").write_bytes(b"")
    old = time.time() - 2 * 86400
    for name in ("dangling", ".busy.lock"):
        os.utime(imports_dir / name, (old, old), follow_symlinks=False)
    assert imagejobs.remove_leftovers(imports_dir, {".busy.lock"}) == ["dangling"]
    assert [p.name for p in imports_dir.iterdir()] == [".busy.lock"]


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A certificate for `name` (and its key), signed by itself: its own CA."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.parametrize("cert_name, fetched", [("rebind.test", True), ("other.test", False)])
def test_https_to_the_checked_address_verifies_the_hosts_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cert_name: str, fetched: bool) -> None:
    """Over TLS the pinned connection still sends the URL's host as SNI and checks the
    certificate against that name (not the address): a certificate for another name fails."""
    import ssl
    cert, key = _self_signed(tmp_path, cert_name)
    handler = type("H", (Hop,), {"hits": 0, "location": "", "body": MARKER, "hosts": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        monkeypatch.setattr(download, "check_public",
                            lambda host: ["127.0.0.1"] if host == "rebind.test" else [])
        monkeypatch.setattr(download.requests.certs, "where", lambda: str(cert))
        url = f"https://rebind.test:{port}/img"
        if fetched:
            assert b"".join(download.stream(url)) == MARKER
            assert handler.hosts == [f"rebind.test:{port}"]
        else:
            with pytest.raises(BadRequest, match="could not be fetched"):
                b"".join(download.stream(url))
            assert handler.hits == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("size", [0, 1, imagejobs.HASH_STEP, 2 * imagejobs.HASH_STEP + 3])
def test_the_jobs_sha256_is_the_files(tmp_path: Path, size: int) -> None:
    """The job hashes through a mapping of the file: the same digest as sha256sum's."""
    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    assert imagejobs.sha256_of(path) == hashlib.sha256(data).hexdigest()
