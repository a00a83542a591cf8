"""The REST API through Flask's test client: auth, validation, placement answers, tenancy,
images, and that a failure leaves nothing half-made. Hosts are reached through a recording
dispatcher; the store is a migrated SQLite file in the test's directory."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fleet.config import load_settings
from fleet.proc import run
from fleet.store.models import VM, Claim, Event, Host, Image, Job, Project
from fleet.store.session import Store
from scheduler.imagejobs import inspect_image
from web import create_app
from web.auth import create_token

SHA = "ef" * 32
HOST_MEMORY = 4096


@dataclass
class Recorder:
    """A dispatcher that records what would have been sent to hosts (or fails on demand)."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    fail: bool = False
    console: str = "login: "

    def build(self, host: str, payload: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append(("build", host, payload))

    def delete(self, host: str, payload: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append(("delete", host, payload))

    def console_log(self, host: str, vm_id: str, max_bytes: int) -> str:
        self.calls.append(("console_log", host, (vm_id, max_bytes)))
        return self.console

    def inspect_image(self, image_id: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append(("inspect_image", "control", image_id))

    def prewarm(self, host: str, payload: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.calls.append(("prewarm", host, payload))


@dataclass
class Env:
    app: Flask
    client: FlaskClient
    store: Store
    dispatcher: Recorder
    state_dir: Path
    tokens: dict[str, str]

    def call(self, method: str, path: str, who: str | None = "alice", **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        return self.client.open(path, method=method, headers=headers, **kw)

    def count(self, model: Any) -> int:
        with self.store.sessions() as s:
            return s.scalar(select(func.count()).select_from(model))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_db: Path) -> Iterator[Env]:
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    state = tmp_path / "state"
    settings = load_settings(env={"VIRTFLEET_STATE_DIR": str(state), "VIRTFLEET_CONFIG": "",
                                  "VIRTFLEET_HOST_NAME": "controller",
                                  "VIRTFLEET_PUBLIC_URL": "http://ctl.example:8080"})
    state.mkdir()
    shutil.copyfile(migrated_db, state / "virtfleet.db")
    assert settings.db_url == f"sqlite:///{state / 'virtfleet.db'}"
    store = Store(settings.db_url)
    with store.session() as s:
        tokens = {"alice": create_token(s, "alice", "team-a"),
                  "bob": create_token(s, "bob", "team-b"),
                  "root": create_token(s, "root", "ops", admin=True)}
        team_a = s.scalars(select(Project).where(Project.name == "team-a")).one()
        s.add(Image(id="img-a", name="debian", project_id=team_a.id, sha256=SHA,
                    size_bytes=1000, disk_format="qcow2"))
        s.add(Host(name="node1", vcpus=4, memory_mb=HOST_MEMORY, disk_gb=100, cpu_ratio=1.0,
                   ram_ratio=1.0, disk_ratio=1.0, labels={}, cached_images=[]))
    recorder = Recorder()
    app = create_app(test_config={"TESTING": True, "STORE": store, "DISPATCHER": recorder,
                                  "BUS": None}, settings=settings)
    yield Env(app, app.test_client(), store, recorder, state, tokens)
    store.dispose()


def vm_body(**kw: Any) -> dict[str, Any]:
    body = {"name": "web1", "image": "debian", "vcpus": 1, "memory_mb": 512, "disk_gb": 2}
    body.update(kw)
    return body


def assert_error_body(resp: Any, code: int) -> dict[str, Any]:
    assert resp.status_code == code, resp.get_data(as_text=True)
    assert resp.is_json
    body = resp.get_json()
    assert set(body) == {"code", "status", "message", "errors"}, body
    assert body["code"] == code
    assert isinstance(body["status"], str) and body["status"]
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


def assert_nothing_stored(env: Env) -> None:
    assert env.count(VM) == 0
    assert env.count(Claim) == 0
    assert env.count(Job) == 0
    with env.store.sessions() as s:
        host = s.scalars(select(Host).where(Host.name == "node1")).one()
        assert (host.used_vcpus, host.used_memory_mb, host.used_disk_gb) == (0, 0, 0)


# -- auth ---------------------------------------------------------------------------------


def test_missing_token_is_401_json(env: Env) -> None:
    body = assert_error_body(env.call("GET", "/api/v1/vms", who=None), 401)
    assert "token" in body["message"]
    body = assert_error_body(env.call("POST", "/api/v1/vms", who=None, json=vm_body()), 401)
    assert env.count(VM) == 0


@pytest.mark.parametrize("header", ["Bearer vf_not-a-real-token", "Bearer ", "Basic abc",
                                    "vf_token-without-scheme"])
def test_bad_token_is_401(env: Env, header: str) -> None:
    resp = env.call("GET", "/api/v1/vms", who=None, headers={"Authorization": header})
    assert_error_body(resp, 401)


# -- validation ---------------------------------------------------------------------------


def test_unknown_field_is_422_naming_it(env: Env) -> None:
    resp = env.call("POST", "/api/v1/vms", json=vm_body(flavour="large"))
    body = assert_error_body(resp, 422)
    assert "flavour" in str(body["errors"])
    assert "flavour" in body["message"]
    assert_nothing_stored(env)


@pytest.mark.parametrize("name", ["Web1", "-web", "a" * 64, "web 1", "", "web_1", "wéb",
                                  "web1\n"])
def test_bad_names_are_422(env: Env, name: str) -> None:
    body = assert_error_body(env.call("POST", "/api/v1/vms", json=vm_body(name=name)), 422)
    assert "name" in str(body["errors"])
    assert_nothing_stored(env)


@pytest.mark.parametrize("key", ["Zone", "zone 1", "-zone", "z" * 64])
def test_bad_host_label_keys_are_422(env: Env, key: str) -> None:
    resp = env.call("PATCH", "/api/v1/hosts/node1", who="root", json={"labels": {key: "a"}})
    body = assert_error_body(resp, 422)
    assert "label keys must match" in body["message"]
    resp = env.call("PATCH", "/api/v1/hosts/node1", who="root", json={"labels": {"zone": "a"}})
    assert resp.status_code == 200 and resp.get_json()["labels"] == {"zone": "a"}


def test_longest_name_is_accepted(env: Env) -> None:
    resp = env.call("POST", "/api/v1/vms", json=vm_body(name="a" * 63))
    assert resp.status_code == 202, resp.get_json()


@pytest.mark.parametrize("field_name", ["vcpus", "memory_mb", "disk_gb"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "2", None, True])
def test_bad_sizes_are_422(env: Env, field_name: str, value: Any) -> None:
    body = assert_error_body(env.call("POST", "/api/v1/vms", json=vm_body(**{field_name: value})),
                             422)
    assert field_name in str(body["errors"])
    assert_nothing_stored(env)


def test_missing_required_fields_are_422(env: Env) -> None:
    body = assert_error_body(env.call("POST", "/api/v1/vms", json={}), 422)
    assert "name" in str(body["errors"]) and "image" in str(body["errors"])


def test_non_json_body_is_rejected(env: Env) -> None:
    resp = env.call("POST", "/api/v1/vms", data="name=web1",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert 400 <= resp.status_code < 500
    assert_nothing_stored(env)


def test_unknown_image_is_404(env: Env) -> None:
    body = assert_error_body(env.call("POST", "/api/v1/vms", json=vm_body(image="nope")), 404)
    assert "nope" in body["message"]
    assert_nothing_stored(env)


def test_another_projects_private_image_is_404(env: Env) -> None:
    assert_error_body(env.call("POST", "/api/v1/vms", who="bob", json=vm_body()), 404)
    assert_nothing_stored(env)


# -- create -------------------------------------------------------------------------------


def test_a_project_lists_and_finds_its_own_images_and_the_public_ones(env: Env) -> None:
    with env.store.session() as s:
        team_b = s.scalars(select(Project).where(Project.name == "team-b")).one()
        s.add(Image(id="img-b", name="bobs", project_id=team_b.id, sha256=SHA))
        s.add(Image(id="img-p", name="shared", project_id=team_b.id, sha256=SHA,
                    visibility="public"))

    def names(who: str) -> list[str]:
        return sorted(i["name"] for i in env.call("GET", "/api/v1/images", who=who).get_json())

    assert names("alice") == ["debian", "shared"]
    assert names("bob") == ["bobs", "shared"]
    assert names("root") == ["bobs", "debian", "shared"]
    assert env.call("GET", "/api/v1/images/shared", who="alice").status_code == 200
    assert env.call("GET", "/api/v1/images/img-b", who="alice").status_code == 404
    assert env.call("GET", "/api/v1/images/bobs", who="root").status_code == 200


def test_valid_create_is_202_and_sends_the_build(env: Env) -> None:
    resp = env.call("POST", "/api/v1/vms", json=vm_body(user_data="#cloud-config\n"))
    assert resp.status_code == 202, resp.get_json()
    body = resp.get_json()
    vm, job = body["vm"], body["job"]
    assert vm["name"] == "web1" and vm["state"] == "building" and vm["project"] == "team-a"
    assert (vm["vcpus"], vm["memory_mb"], vm["disk_gb"]) == (1, 512, 2)
    assert job["vm_id"] == vm["id"] and job["kind"] == "build" and job["state"] == "queued"

    assert len(env.dispatcher.calls) == 1
    kind, host, payload = env.dispatcher.calls[0]
    assert (kind, host) == ("build", "node1")
    assert payload["vm"]["id"] == vm["id"]
    assert payload["vm"]["name"] == "web1"
    # The user's part unchanged, inside virtfleet's MIME multipart (fleet.userdata.compose).
    assert payload["vm"]["user_data"].startswith("Content-Type: multipart/mixed")
    assert "\n#cloud-config\n" in payload["vm"]["user_data"]
    assert payload["vm"]["network"] is None and payload["vm"]["network_config"] == ""
    assert payload["job_id"] == job["id"]
    assert payload["image"]["id"] == "img-a"
    assert payload["image"]["sha256"] == SHA
    assert payload["image"]["url"] == "http://ctl.example:8080/api/v1/images/img-a/data"

    with env.store.sessions() as s:
        row = s.get(VM, vm["id"])
        assert row.state == "building" and row.host.name == "node1"
        claim = s.scalars(select(Claim).where(Claim.vm_id == row.id)).one()
        assert (claim.vcpus, claim.memory_mb, claim.disk_gb) == (1, 512, 2)
        host_row = row.host
        assert (host_row.used_vcpus, host_row.used_memory_mb, host_row.used_disk_gb) == \
            (1, 512, 2)

    shown = env.call("GET", f"/api/v1/vms/{vm['id']}").get_json()
    assert shown["state"] == "building"
    assert [st["state"] for st in shown["steps"]] == ["building"]
    listed = env.call("GET", "/api/v1/vms").get_json()
    assert [v["id"] for v in listed] == [vm["id"]]
    assert env.call("GET", f"/api/v1/jobs/{job['id']}").get_json()["state"] == "queued"


def test_duplicate_name_is_409(env: Env) -> None:
    assert env.call("POST", "/api/v1/vms", json=vm_body()).status_code == 202
    body = assert_error_body(env.call("POST", "/api/v1/vms", json=vm_body()), 409)
    assert "web1" in body["message"]
    assert env.count(VM) == 1 and env.count(Claim) == 1 and len(env.dispatcher.calls) == 1
    # Another project may use the same name.
    with env.store.session() as s:
        team_b = s.scalars(select(Project).where(Project.name == "team-b")).one()
        s.add(Image(id="img-b", name="debian", project_id=team_b.id, sha256=SHA))
    assert env.call("POST", "/api/v1/vms", who="bob", json=vm_body()).status_code == 202


def test_no_host_with_room_is_409_with_reasons_and_stores_nothing(env: Env) -> None:
    resp = env.call("POST", "/api/v1/vms", json=vm_body(memory_mb=HOST_MEMORY + 1))
    body = assert_error_body(resp, 409)
    assert body["errors"]["hosts"] == 1
    assert body["errors"]["filters"]["resources"] == 1
    assert sum(body["errors"]["filters"].values()) == 1
    assert "resources" in body["message"]
    assert_nothing_stored(env)
    assert env.count(Event) == 0
    assert env.dispatcher.calls == []


def test_room_for_exactly_one_more(env: Env) -> None:
    big = HOST_MEMORY // 2
    assert env.call("POST", "/api/v1/vms", json=vm_body(name="a", memory_mb=big)).status_code \
        == 202
    assert env.call("POST", "/api/v1/vms", json=vm_body(name="b", memory_mb=big)).status_code \
        == 202
    assert_error_body(env.call("POST", "/api/v1/vms", json=vm_body(name="c", memory_mb=64)),
                      409)
    assert env.count(VM) == 2 and env.count(Claim) == 2


def test_dispatcher_failure_is_503_and_leaves_nothing(env: Env) -> None:
    env.dispatcher.fail = True
    body = assert_error_body(env.call("POST", "/api/v1/vms", json=vm_body()), 503)
    assert "nothing was created" in body["message"]
    assert_nothing_stored(env)
    assert env.count(Event) == 0  # no "building" event for a VM that never was
    assert env.call("GET", "/api/v1/vms").get_json() == []
    # The name is free again once the broker is back.
    env.dispatcher.fail = False
    assert env.call("POST", "/api/v1/vms", json=vm_body()).status_code == 202


# -- tenancy ------------------------------------------------------------------------------


def test_other_projects_see_nothing(env: Env) -> None:
    created = env.call("POST", "/api/v1/vms", json=vm_body()).get_json()
    vm_id, job_id = created["vm"]["id"], created["job"]["id"]
    assert env.call("GET", "/api/v1/vms", who="bob").get_json() == []
    assert_error_body(env.call("GET", f"/api/v1/vms/{vm_id}", who="bob"), 404)
    assert_error_body(env.call("GET", f"/api/v1/jobs/{job_id}", who="bob"), 404)
    assert_error_body(env.call("GET", f"/api/v1/vms/{vm_id}/console", who="bob"), 404)
    assert_error_body(env.call("DELETE", f"/api/v1/vms/{vm_id}", who="bob"), 404)
    assert env.call("GET", "/api/v1/events", who="bob").get_json() == []
    assert [c[0] for c in env.dispatcher.calls] == ["build"]  # bob caused nothing
    with env.store.sessions() as s:
        assert s.get(VM, vm_id).state == "building"
    # The owner and an admin do see it.
    assert env.call("GET", f"/api/v1/vms/{vm_id}").status_code == 200
    assert env.call("GET", f"/api/v1/vms/{vm_id}", who="root").status_code == 200
    assert env.call("GET", f"/api/v1/vms/{vm_id}/console").get_json() == \
        {"vm_id": vm_id, "output": "login: "}


# -- delete -------------------------------------------------------------------------------


def test_delete_is_202_and_sends_the_delete(env: Env) -> None:
    vm_id = env.call("POST", "/api/v1/vms", json=vm_body()).get_json()["vm"]["id"]
    resp = env.call("DELETE", f"/api/v1/vms/{vm_id}")
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["kind"] == "delete" and job["vm_id"] == vm_id and job["host"] == "node1"
    assert env.dispatcher.calls[-1] == ("delete", "node1", {"vm_id": vm_id, "job_id": job["id"]})
    with env.store.sessions() as s:
        assert s.get(VM, vm_id).state == "deleting"
        assert s.scalars(select(Claim).where(Claim.vm_id == vm_id)).first() is not None
    # Asking again returns the same job and sends nothing more.
    again = env.call("DELETE", f"/api/v1/vms/{vm_id}")
    assert again.status_code == 202 and again.get_json()["id"] == job["id"]
    assert [c[0] for c in env.dispatcher.calls] == ["build", "delete"]


def test_delete_unknown_vm_is_404(env: Env) -> None:
    assert_error_body(env.call("DELETE", "/api/v1/vms/does-not-exist"), 404)


def test_delete_with_broker_down_is_503_and_leaves_the_vm(env: Env) -> None:
    vm_id = env.call("POST", "/api/v1/vms", json=vm_body()).get_json()["vm"]["id"]
    env.dispatcher.fail = True
    assert_error_body(env.call("DELETE", f"/api/v1/vms/{vm_id}"), 503)
    with env.store.sessions() as s:
        assert s.get(VM, vm_id).state == "building"
        assert s.scalars(select(Job).where(Job.kind == "delete")).first() is None
        assert s.scalars(select(Event).where(Event.data["state"].as_string() == "deleting")
                         ).first() is None


# -- images -------------------------------------------------------------------------------

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qcow2(path: Path, size: str = "16M", backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    run([*args, str(path), size], timeout=30)
    return path


def image_files(env: Env) -> list[str]:
    images = env.state_dir / "images"
    return sorted(p.name for p in images.iterdir()) if images.exists() else []


@needs_qemu_img
def test_admin_registers_a_local_qcow2(env: Env, tmp_path: Path) -> None:
    src = qcow2(tmp_path / "base.qcow2")
    resp = env.call("POST", "/api/v1/images", who="root",
                    json={"name": "base", "source": str(src)})
    # Registration is asynchronous: 202 with the image `importing`, its inspection sent to
    # the control plane; run that job here as the scheduler would.
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["status"] == "importing"
    image_id = resp.get_json()["id"]
    assert env.dispatcher.calls == [("inspect_image", "control", image_id)]
    inspect_image(env.store, env.app.extensions["virtfleet.settings"], image_id)
    resp = env.call("GET", f"/api/v1/images/{image_id}", who="root")
    body = resp.get_json()
    assert body["status"] == "active"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert body["sha256"] == digest
    assert body["disk_format"] == "qcow2"
    assert body["virtual_size_bytes"] == 16 * 1024 * 1024
    assert body["size_bytes"] == src.stat().st_size
    assert body["project"] == "ops"
    assert image_files(env) == [digest]
    assert str(src) not in resp.get_data(as_text=True)  # the controller path is not shown
    listed = env.call("GET", "/api/v1/images", who="root").get_json()
    assert [i["name"] for i in listed if i["project"] == "ops"] == ["base"]
    # Hosts (and users) can download exactly those bytes.
    data = env.call("GET", f"/api/v1/images/{body['id']}/data", who="root")
    assert data.status_code == 200 and hashlib.sha256(data.data).hexdigest() == digest


@needs_qemu_img
def test_non_admin_may_not_read_controller_paths(env: Env, tmp_path: Path) -> None:
    src = qcow2(tmp_path / "secret-place.qcow2")
    resp = env.call("POST", "/api/v1/images", json={"name": "base", "source": str(src)})
    body = assert_error_body(resp, resp.status_code)
    assert resp.status_code in (400, 403)
    assert "admin" in body["message"]
    assert str(src) not in resp.get_data(as_text=True)
    assert "secret-place" not in resp.get_data(as_text=True)
    assert image_files(env) == []
    assert env.count(Image) == 1


@needs_qemu_img
def test_qcow2_with_a_backing_file_is_refused(env: Env, tmp_path: Path) -> None:
    base = qcow2(tmp_path / "base.qcow2")
    over = qcow2(tmp_path / "over.qcow2", backing=base)
    resp = env.call("POST", "/api/v1/images", who="root",
                    json={"name": "over", "source": str(over)})
    body = assert_error_body(resp, 422)
    assert "backing" in body["message"]
    assert str(over) not in resp.get_data(as_text=True)
    assert str(tmp_path) not in resp.get_data(as_text=True)
    assert image_files(env) == []  # neither the file nor a partial copy is left
    assert env.count(Image) == 1


def test_missing_local_file_is_400_without_the_path(env: Env, tmp_path: Path) -> None:
    missing = tmp_path / "hidden-dir" / "nothing.qcow2"
    resp = env.call("POST", "/api/v1/images", who="root",
                    json={"name": "x", "source": str(missing)})
    assert_error_body(resp, 400)
    assert "hidden-dir" not in resp.get_data(as_text=True)
    resp = env.call("POST", "/api/v1/images", who="root",
                    json={"name": "x", "source": "relative/path.qcow2"})
    assert_error_body(resp, 400)
    assert "relative/path" not in resp.get_data(as_text=True)


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"QFI\xfb" + b"\0" * 508)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def local_http() -> Iterator[tuple[str, type[_CountingHandler]]]:
    handler = type("Handler", (_CountingHandler,), {"hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("who", ["alice", "root"])
@pytest.mark.parametrize("host_part", ["127.0.0.1", "localhost", "[::1]"])
def test_http_url_to_loopback_is_refused_without_fetching(
        env: Env, local_http: tuple[str, type[_CountingHandler]], who: str,
        host_part: str) -> None:
    addr, handler = local_http
    port = addr.rsplit(":", 1)[1]
    url = f"http://{host_part}:{port}/base.qcow2"
    body = assert_error_body(env.call("POST", "/api/v1/images", who=who,
                                      json={"name": "x", "source": url}), 400)
    assert "not allowed" in body["message"] or "resolve" in body["message"]
    assert handler.hits == 0  # the controller never connected
    assert image_files(env) == []


@pytest.mark.parametrize("source", ["file:///etc/passwd", "ftp://example.org/base.qcow2",
                                    "gopher://example.org/x", "FILE:///etc/hostname"])
@pytest.mark.parametrize("who", ["alice", "root"])
def test_non_http_schemes_are_400(env: Env, source: str, who: str) -> None:
    resp = env.call("POST", "/api/v1/images", who=who, json={"name": "x", "source": source})
    body = assert_error_body(resp, 400)
    assert "http" in body["message"]
    assert "/etc/" not in resp.get_data(as_text=True)
    assert image_files(env) == []


def test_image_unknown_field_and_bad_name(env: Env) -> None:
    body = assert_error_body(env.call("POST", "/api/v1/images", who="root",
                                      json={"name": "x", "source": "https://e.org/x",
                                            "checksum": "abc"}), 422)
    assert "checksum" in str(body["errors"])
    body = assert_error_body(env.call("POST", "/api/v1/images", who="root",
                                      json={"name": "Bad Name", "source": "https://e.org/x"}),
                             422)
    assert "name" in str(body["errors"])


# -- the API description ------------------------------------------------------------------


def test_openapi_is_served(env: Env) -> None:
    resp = env.client.get("/api/v1/openapi.json")
    assert resp.status_code == 200
    spec = resp.get_json()
    assert spec["info"]["title"] == "virtfleet"
    assert "/api/v1/vms" in spec["paths"]
    assert {"get", "post"} <= set(spec["paths"]["/api/v1/vms"])
    assert "/api/v1/images" in spec["paths"]


def test_unknown_api_path_is_404_json(env: Env) -> None:
    assert_error_body(env.call("GET", "/api/v1/nothing-here"), 404)
