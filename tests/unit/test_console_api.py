"""POST /api/v1/vms/<id>/console/token through Flask's test client: who may get one, when,
and that what it returns is a URL with a token the VM's host accepts."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from fleet.consoletoken import verify
from fleet.store.models import VM, Host
from tests.unit.test_api import Env, assert_error_body, env, vm_body  # noqa: F401

HOST_TOKEN = "host-credential-for-tests"


@pytest.fixture
def console_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:  # noqa: F811
    settings = env.app.extensions["virtfleet.settings"]
    monkeypatch.setitem(env.app.extensions, "virtfleet.settings",
                        type(settings)(**{**settings.__dict__, "host_token": HOST_TOKEN}))
    env.dispatcher.info = {"url": "ws://node1.example:6081", "state": "running"}  # type: ignore[attr-defined]

    def console_info(host: str, vm_id: str) -> dict[str, Any]:
        env.dispatcher.calls.append(("console_info", host, vm_id))
        info = env.dispatcher.info  # type: ignore[attr-defined]
        if isinstance(info, Exception):
            raise info
        return dict(info)

    env.dispatcher.console_info = console_info  # type: ignore[attr-defined]
    return env


def make_vm(api: Env, state: str = "running") -> str:
    resp = api.call("POST", "/api/v1/vms", json=vm_body())
    assert resp.status_code == 202, resp.get_json()
    vm_id = resp.get_json()["vm"]["id"]
    with api.store.session() as s:
        s.get(VM, vm_id).state = state
    return vm_id


def token_url(api: Env, vm_id: str, who: str = "alice") -> Any:
    return api.call("POST", f"/api/v1/vms/{vm_id}/console/token", who=who)


def test_owner_gets_a_url_with_a_token_the_host_accepts(console_env: Env) -> None:
    vm_id = make_vm(console_env)
    resp = token_url(console_env, vm_id)
    assert resp.status_code == 200, resp.get_json()
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.get_json()
    assert set(body) == {"url", "expires_at", "vm_id", "host"}
    assert body["vm_id"] == vm_id and body["host"] == "node1"
    url = urlsplit(body["url"])
    assert (url.scheme, url.netloc, url.path) == ("ws", "node1.example:6081", "/console")
    claims = verify(HOST_TOKEN, parse_qs(url.query)["token"][0], "node1")
    assert claims.vm_id == vm_id
    assert body["expires_at"].startswith("20")
    assert ("console_info", "node1", vm_id) in console_env.dispatcher.calls


def test_admin_gets_one_for_any_vm(console_env: Env) -> None:
    vm_id = make_vm(console_env, state="ready")
    assert token_url(console_env, vm_id, who="root").status_code == 200


def test_another_tenant_gets_404(console_env: Env) -> None:
    vm_id = make_vm(console_env)
    assert_error_body(token_url(console_env, vm_id, who="bob"), 404)
    assert_error_body(token_url(console_env, "no-such-vm"), 404)
    assert_error_body(console_env.call("POST", f"/api/v1/vms/{vm_id}/console/token",
                                       who=None), 401)
    assert not [c for c in console_env.dispatcher.calls if c[0] == "console_info"]


@pytest.mark.parametrize("state", ["building", "stopped", "error", "unknown", "deleting"])
def test_vm_not_running_is_409(console_env: Env, state: str) -> None:
    vm_id = make_vm(console_env, state=state)
    body = assert_error_body(token_url(console_env, vm_id), 409)
    assert state in body["message"]


def test_host_down_or_without_console_or_vm_stopped_there_is_409(console_env: Env) -> None:
    vm_id = make_vm(console_env)
    console_env.dispatcher.info = {"url": "", "state": "running"}  # type: ignore[attr-defined]
    assert "no console server" in assert_error_body(token_url(console_env, vm_id),
                                                    409)["message"]
    console_env.dispatcher.info = {"url": "ws://x:1", "state": "shutoff"}  # type: ignore[attr-defined]
    assert "not running on host" in assert_error_body(token_url(console_env, vm_id),
                                                      409)["message"]
    with console_env.store.session() as s:
        s.scalars(select(Host).where(Host.name == "node1")).one().alive = False
    assert "down" in assert_error_body(token_url(console_env, vm_id), 409)["message"]


def test_silent_host_is_504(console_env: Env) -> None:
    vm_id = make_vm(console_env)
    console_env.dispatcher.info = TimeoutError("no answer")  # type: ignore[attr-defined]
    assert_error_body(token_url(console_env, vm_id), 504)


def test_without_host_credential_is_503(env: Env) -> None:  # noqa: F811
    vm_id = make_vm(env)
    body = assert_error_body(token_url(env, vm_id), 503)
    assert "host_token" in body["message"]
