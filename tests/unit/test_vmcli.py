"""`virtfleet vm` (fleet/vmcli.py over fleet/apiclient.py) against the real app over real HTTP
on loopback: a migrated SQLite store, one host `node1` (4 vCPU, 4 GiB) whose "worker" is a
recording dispatcher that answers as a host would (build done and ready, deleted), so the
CLI's --wait sees the states the API shows. Asserts what a user reads: the lines printed, the
exit codes, the server's own messages (no traceback), and tenancy (another project's VM is
not found, by id or by name). The `env` fixture is test_actions_api's (F811 off, as in
test_keypairs_networks_api)."""
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from fleet import contract as c
from fleet.cli import main as cli
from tests.unit.test_actions_api import Env, Recorder, env  # noqa: F401 - the fixture


class FakeHost(Recorder):
    """Answers builds (done, then ready) and deletes (deleted) the way a host's worker
    does: events applied from another thread, a moment later."""

    env: Env | None = None
    console = "Booting...\nvirtfleet-ready: {\"errors\": []}\n"

    def _later(self, *events: tuple[str, str, str, dict[str, Any]]) -> None:
        def run() -> None:
            time.sleep(0.2)
            assert self.env is not None
            for type_, vm_id, job_id, data in events:
                self.env.apply(type_, vm_id, job_id, **data)

        threading.Thread(target=run, daemon=True).start()

    def build(self, host: str, payload: dict[str, Any]) -> None:
        super().build(host, payload)
        vm_id, job_id = payload["vm"]["id"], payload["job_id"]
        self._later((c.EV_BUILD_DONE, vm_id, job_id, {"state": "running"}),
                    (c.EV_VM_READY, vm_id, "", {"boot_seconds": 1.5}))

    def delete(self, host: str, payload: dict[str, Any]) -> None:
        super().delete(host, payload)
        self._later((c.EV_DELETED, payload["vm_id"], payload.get("job_id", ""),
                     {"state": "deleted"}))

    def console_log(self, host: str, vm_id: str, max_bytes: int) -> str:
        return self.console[-max_bytes:]


@pytest.fixture
def served(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Env, str]]:
    host = FakeHost()
    host.env = env
    app = env.client.application
    app.extensions["virtfleet.dispatcher"] = host
    env.dispatcher = host
    quiet = logging.getLogger("werkzeug")
    was = quiet.disabled
    quiet.disabled = True  # its request lines would land in the CLI's captured output
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("VIRTFLEET_URL", url)
    monkeypatch.setenv("VIRTFLEET_TOKEN", env.tokens["alice"])
    try:
        yield env, url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        quiet.disabled = was


def vm_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["vm", *args])


def test_create_wait_list_show_console_and_delete(served: tuple[Env, str],
                                                  tmp_path: Any) -> None:
    env, _ = served
    user_data = tmp_path / "ud.yaml"
    user_data.write_text("#cloud-config\nruncmd: [[echo, hi]]\n")
    assert env.call("PATCH", "/hosts/node1", who="root",
                    json={"labels": {"zone": "rack1"}}).status_code == 200
    res = vm_cli("create", "web", "--image", "debian", "--memory-mb", "512", "--count", "2",
                 "--constraint", "zone=rack1", "--user-data", str(user_data), "--wait", "ready",
                 "--timeout", "30")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert [ln.split()[1:] for ln in lines] == [["web-1", "ready", "node1"],
                                               ["web-2", "ready", "node1"]]
    build = [p for kind, _h, p in env.dispatcher.calls if kind == "build"][0]
    assert "runcmd: [[echo, hi]]" in build["vm"]["user_data"]  # the file went as user-data

    res = vm_cli("list")
    assert res.exit_code == 0, res.output
    header, *rows = res.output.splitlines()
    assert header.split() == ["ID", "NAME", "STATE", "HOST", "VCPUS", "MEMORY", "DISK",
                              "ADDRESSES", "PROJECT"]
    assert sorted(r.split()[1] for r in rows) == ["web-1", "web-2"]
    assert all("512 MiB" in r and "team-a" in r for r in rows)

    res = vm_cli("show", "web-2")  # by name
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert (shown["name"], shown["state"], shown["boot_seconds"]) == ("web-2", "ready", 1.5)
    assert vm_cli("show", shown["id"]).output == res.output  # by id: the same

    res = vm_cli("console", "web-1", "--bytes", "40")
    assert res.exit_code == 0 and res.output == FakeHost.console[-40:]

    res = vm_cli("reboot", "web-1", "--hard")
    assert res.exit_code == 0 and "web-1: reboot accepted (job " in res.output
    assert env.dispatcher.actions()[-1]["action"] == "reboot"
    assert env.dispatcher.actions()[-1]["args"]["hard"] is True

    res = vm_cli("delete", "web-1", shown["id"], "--wait", "--timeout", "30")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["web-1: deleting", "web-2: deleting", "web-1: gone",
                                       "web-2: gone"]
    assert vm_cli("list").output.splitlines()[1:] == []


def test_refusals_are_the_servers_messages_in_one_line(served: tuple[Env, str]) -> None:
    env, _ = served
    res = vm_cli("create", "big", "--image", "debian", "--memory-mb", "8192")
    assert res.exit_code == 1
    assert res.output.startswith("Error: 409: no host can take this VM (1 hosts: resources "
                                 "removed 1)")
    res = vm_cli("create", "Bad Name", "--image", "debian")
    assert res.exit_code == 1 and res.output.startswith("Error: 4")
    assert "name" in res.output
    res = vm_cli("create", "x", "--image", "debian", "--constraint", "zone")
    assert res.exit_code == 2 and "is not KEY=VALUE" in res.output
    res = vm_cli("show", "nope")
    assert res.exit_code == 1 and res.output == "Error: 404: VM 'nope' not found\n"
    res = vm_cli("list", "--token", "wrong")
    assert res.exit_code == 1 and res.output.startswith("Error: 401")
    res = vm_cli("list", "--url", "http://127.0.0.1:1")
    assert res.exit_code == 1 and res.output.startswith("Error: cannot reach")
    for res in (vm_cli("create", "x", "--image", "debian", "--memory-mb", "8192"),
                vm_cli("show", "nope"), vm_cli("list", "--token", "wrong")):
        assert "Traceback" not in res.output and env.tokens["alice"] not in res.output


def test_another_projects_vm_is_not_found_by_id_or_name(served: tuple[Env, str]) -> None:
    env, _ = served
    res = vm_cli("create", "secret", "--image", "debian", "--json")
    assert res.exit_code == 0, res.output
    vm_id = json.loads(res.output)[0]["id"]
    bob = ["--token", env.tokens["bob"]]
    for ref in (vm_id, "secret"):
        res = vm_cli("show", ref, *bob)
        assert res.exit_code == 1 and res.output == f"Error: 404: VM '{ref}' not found\n"
        res = vm_cli("delete", ref, *bob)
        assert res.exit_code == 1 and "404" in res.output
    assert vm_cli("list", *bob).output.splitlines()[1:] == []
    res = vm_cli("show", "secret", "--token", env.tokens["root"])  # an admin sees it
    assert res.exit_code == 0 and json.loads(res.output)["id"] == vm_id
