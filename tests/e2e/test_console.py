"""The interactive serial console through the whole system: a token from the web, a websocket
to the host's console server (the worker, on 127.0.0.1 in one-machine mode), libvirt's console
stream to the demo guest's root shell on ttyS0, and back. Never a connection to a guest."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from bench.cluster import Api, Cluster, free_port
from fleet.config import load_settings
from fleet.consoletoken import sign
from fleet.store.session import Store

pytestmark = pytest.mark.e2e

COMMAND = b"echo console-$((40+2))\n"
ANSWER = b"console-42"


@pytest.fixture
def cluster(demo_image: Path) -> Iterator[Cluster]:
    """The conftest cluster, with the worker's console server on a free port of its own."""
    port = free_port()
    with Cluster(workers={"local": {"VIRTFLEET_VIRT_TYPE": "qemu",
                                    "VIRTFLEET_CONSOLE_BIND": f"127.0.0.1:{port}"}}) as c:
        image = c.register_image("demo", demo_image)
        deadline = time.monotonic() + 300
        while image.get("status", "active") == "importing" and time.monotonic() < deadline:
            time.sleep(0.5)
            image = c.api.get(f"/images/{image['id']}").json()
        assert image.get("status", "active") == "active", image
        c.console_port = port  # type: ignore[attr-defined]
        yield c


def wait_console_log(cluster: Cluster, vm_id: str, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        r = cluster.api.get(f"/vms/{vm_id}/console")
        assert r.status_code == 200, r.text
        text = r.json()["output"]
        if needle in text:
            return
        time.sleep(1)
    raise AssertionError(f"{needle!r} never appeared in the console log:\n{text[-2000:]}")


def open_ws(url: str) -> ClientConnection:
    return connect(url, proxy=None, open_timeout=10, close_timeout=5)


def read_until(ws: ClientConnection, needle: bytes, resend: bytes, timeout: float = 90) -> bytes:
    """Read the console until `needle` shows; type `resend` again now and then, in case the
    guest's shell was not reading yet."""
    seen = b""
    deadline = time.monotonic() + timeout
    next_send = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_send:
            ws.send(resend)
            next_send = time.monotonic() + 10
        try:
            data = ws.recv(timeout=1)
        except TimeoutError:
            continue
        seen += data if isinstance(data, bytes) else data.encode()
        if needle in seen:
            return seen
    raise AssertionError(f"{needle!r} never came back; the console showed:\n"
                         f"{seen[-2000:].decode(errors='replace')}")


def close_of(ws: ClientConnection, timeout: float = 15) -> tuple[int | None, str]:
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            try:
                ws.recv(timeout=1)
            except TimeoutError:
                continue
        raise AssertionError("the console server did not close the connection")
    return ws.close_code, ws.close_reason or ""


def get_token(cluster: Cluster, vm_id: str) -> dict[str, str]:
    r = cluster.api.post(f"/vms/{vm_id}/console/token")
    assert r.status_code == 200, r.text
    return r.json()


def tampered(url: str) -> str:
    """The same signature over a payload naming another VM."""
    head, _, token = url.partition("?token=")
    payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["vm"] = "00000000-0000-0000-0000-000000000000"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{head}?token={forged}.{sig}"


def test_interactive_console_over_a_websocket(cluster: Cluster) -> None:
    r = cluster.api.post("/vms", json={"name": "console-one", "image": "demo", "vcpus": 1,
                                       "memory_mb": 192, "disk_gb": 1})
    assert r.status_code == 202, r.text
    vm_id = r.json()["vm"]["id"]
    running = cluster.api.wait_vm(vm_id, ("running", "error"), timeout=120)
    assert running["state"] == "running", running
    wait_console_log(cluster, vm_id, "virtfleet-demo: ready")

    grant = get_token(cluster, vm_id)
    url = urlsplit(grant["url"])
    port = cluster.console_port  # type: ignore[attr-defined]
    assert (url.scheme, url.netloc, url.path) == ("ws", f"127.0.0.1:{port}", "/console")
    assert grant["host"] == "local" and grant["vm_id"] == vm_id

    with open_ws(grant["url"]) as ws:
        read_until(ws, ANSWER, COMMAND)  # only the shell turns $((40+2)) into 42
        # Text frames are typed too.
        ws.send("echo text-$((6*7))\n")
        read_until(ws, b"text-42", b"")

    # A token is good once.
    with open_ws(grant["url"]) as ws:
        assert close_of(ws) == (1008, "token already used")

    # Expired: signed with the real host credential, but its time is over.
    expired, _ = sign(cluster.settings_env["VIRTFLEET_HOST_TOKEN"], vm_id, "local", 5,
                      now=time.time() - 60)
    with open_ws(f"ws://127.0.0.1:{port}/console?token={expired}") as ws:
        assert close_of(ws) == (1008, "token expired")

    # Tampered: a fresh token's signature over another VM's payload.
    with open_ws(tampered(get_token(cluster, vm_id)["url"])) as ws:
        assert close_of(ws) == (1008, "bad token signature")

    # The first session let go of the console: a new one works, and a newer one takes over.
    with open_ws(get_token(cluster, vm_id)["url"]) as first:
        read_until(first, ANSWER, COMMAND)
        with open_ws(get_token(cluster, vm_id)["url"]) as second:
            assert close_of(first) == (4001, "a newer console session for this VM took over")
            read_until(second, ANSWER, COMMAND)

    # Nothing of this leaked into the worker's log.
    log = cluster.log_path("worker-local").read_text(errors="replace")
    assert grant["url"].split("token=")[1] not in log
    assert "console refused for 127.0.0.1: token expired" in log

    # Another tenant's user cannot even get a token for it.
    settings = load_settings(env=cluster.settings_env)
    store = Store(settings.db_url)
    from web.auth import create_token
    with store.session() as s:
        other = create_token(s, "mallory", "team-m")
    store.dispose()
    r = Api(cluster.api.base, other).post(f"/vms/{vm_id}/console/token")
    assert r.status_code == 404, r.text

    # Once the VM is gone there is no console to get.
    assert cluster.api.delete(f"/vms/{vm_id}").status_code == 202
    cluster.api.wait_vm(vm_id, ("gone",), timeout=60)
    assert cluster.api.post(f"/vms/{vm_id}/console/token").status_code == 404
