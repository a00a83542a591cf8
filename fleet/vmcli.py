"""`virtfleet vm`: create, list, show, act on and delete VMs from a shell.

Owns the commands' options and what they print; the requests go through
fleet.apiclient to the REST API, so a VM made here is made exactly as the web page and the
API make it (placement, quotas, the 409 that names the filters). A VM is named by its id
or, within what the token sees, its name. Where to send: fleet.apicli (options, env, this
machine's `virtfleet up`). Every failure ends with a one-line message
(click.ClickException), never a traceback.

Must not: judge a request (the server does), or print a token.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from fleet.apicli import connect, json_option, token_option, url_option
from fleet.apiclient import ApiClient, ApiError, segment, table, wait_until

SETTLED = {"ready": ("ready", "error"), "running": ("running", "ready", "error")}
"""What --wait waits for: the VM ready (cloud-init finished), or merely running."""


def _api(url: str | None, token: str | None) -> ApiClient:
    return connect(url, token, ApiClient)


def _fail(exc: ApiError) -> click.ClickException:
    return click.ClickException(str(exc))


def find(api: ApiClient, ref: str) -> dict[str, Any]:
    """The VM `ref` names: its id, else its name among the VMs the token sees."""
    try:
        return api.get(f"/vms/{segment(ref)}")  # type: ignore[no-any-return]
    except ApiError as exc:
        if exc.status != 404:
            raise
    named = [vm for vm in api.get("/vms") if vm["name"] == ref]
    if not named:
        raise ApiError(f"404: VM '{ref}' not found", 404)
    if len(named) > 1:
        raise ApiError(f"{len(named)} VMs are named '{ref}' (in projects "
                       f"{', '.join(sorted({vm['project'] for vm in named}))}): give its id")
    return api.get(f"/vms/{named[0]['id']}")  # type: ignore[no-any-return]


def wait_vm(api: ApiClient, vm: dict[str, Any], until: str, timeout: float) -> dict[str, Any]:
    """Poll `vm` until its state is one `until` settles on ("gone": deleted)."""
    def look() -> dict[str, Any]:
        try:
            return api.get(f"/vms/{vm['id']}")  # type: ignore[no-any-return]
        except ApiError as exc:
            if exc.status == 404:
                return {**vm, "state": "gone"}
            raise

    targets = ("gone",) if until == "gone" else SETTLED[until]
    return wait_until(look, lambda seen: seen["state"] in targets, timeout,
                      f"VM {vm['name']} ({vm['state']})")  # type: ignore[no-any-return]


def _line(vm: dict[str, Any]) -> str:
    reason = f" ({vm['state_reason']})" if vm.get("state_reason") else ""
    return f"{vm['id']}  {vm['name']}  {vm['state']}{reason}  {vm.get('host') or '-'}"


def _addresses(vm: dict[str, Any]) -> str:
    return ",".join(a["ip"] for a in vm.get("addresses") or []) or "-"


def _constraints(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--constraint")
        out[key] = value
    return out


wait_option = click.option("--wait", "until", type=click.Choice(["ready", "running"]),
                           default=None, help="wait until each VM is ready (cloud-init "
                                              "finished) or running, or in error")
timeout_option = click.option("--timeout", default=1800.0, show_default=True,
                              type=click.FloatRange(min=1), help="seconds --wait waits")


@click.group("vm")
def vm() -> None:
    """VMs: create, list, show, start/stop/reboot, console, delete."""


@vm.command("create")
@click.argument("name")
@click.option("--image", required=True, help="image id or name")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--memory-mb", type=int, default=256, show_default=True)
@click.option("--disk-gb", type=int, default=1, show_default=True)
@click.option("--count", type=int, default=1, show_default=True,
              help="N VMs named NAME-1..NAME-N, all or nothing")
@click.option("--user-data", type=click.File("r"), default=None,
              help="a file (- for stdin): #cloud-config, a #! script or MIME multipart")
@click.option("--keypair", "keypairs", multiple=True, help="a keypair of the project (again "
                                                           "for more)")
@click.option("--network", default=None, help="a fleet network (default: the host's own)")
@click.option("--static", is_flag=True, help="a static address from the network's pool")
@click.option("--constraint", "constraints", multiple=True, metavar="KEY=VALUE",
              help="a host label the VM needs (again for more)")
@click.option("--server-group", default=None, help="server group id or name")
@wait_option
@timeout_option
@url_option
@token_option
@json_option
def create(name: str, image: str, vcpus: int, memory_mb: int, disk_gb: int, count: int,
           user_data: Any, keypairs: tuple[str, ...], network: str | None, static: bool,
           constraints: tuple[str, ...], server_group: str | None, until: str | None,
           timeout: float, url: str | None, token: str | None, as_json: bool) -> None:
    """Create VM NAME (placed at once: a host with no room is a 409 that says which
    filters removed the hosts). Prints each VM's id, name, state and host; with --wait,
    exits 1 if one ends in error."""
    body: dict[str, Any] = {"name": name, "image": image, "vcpus": vcpus,
                            "memory_mb": memory_mb, "disk_gb": disk_gb, "count": count,
                            "constraints": _constraints(constraints),
                            "keypairs": list(keypairs)}
    if user_data is not None:
        body["user_data"] = user_data.read()
    if network:
        body["network"] = network
    if static:
        body["address"] = "static"
    if server_group:
        body["server_group"] = server_group
    api = _api(url, token)
    try:
        vms = api.request("POST", "/vms", body)["vms"]
        if until:
            vms = [wait_vm(api, one, until, timeout) for one in vms]
    except ApiError as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(vms, indent=2) if as_json else "\n".join(_line(v) for v in vms))
    if until and any(v["state"] == "error" for v in vms):
        sys.exit(1)


@vm.command("list")
@url_option
@token_option
@json_option
def list_vms(url: str | None, token: str | None, as_json: bool) -> None:
    """List the VMs the token sees (its project's; an admin's: all)."""
    try:
        vms = _api(url, token).get("/vms")
    except ApiError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(vms, indent=2))
        return
    click.echo(table([("ID", "NAME", "STATE", "HOST", "VCPUS", "MEMORY", "DISK", "ADDRESSES",
                       "PROJECT")] +
                     [(v["id"], v["name"], v["state"], v.get("host") or "-", str(v["vcpus"]),
                       f"{v['memory_mb']} MiB", f"{v['disk_gb']} GiB", _addresses(v),
                       v.get("project") or "") for v in vms]))


@vm.command("show")
@click.argument("ref", metavar="VM")
@url_option
@token_option
def show(ref: str, url: str | None, token: str | None) -> None:
    """Show VM (id or name) as the API does: its state, host, addresses, each state's
    duration and each build step's timing."""
    try:
        found = find(_api(url, token), ref)
    except ApiError as exc:
        raise _fail(exc) from None
    click.echo(json.dumps(found, indent=2))


def _act(ref: str, url: str | None, token: str | None, action: dict[str, Any]) -> None:
    api = _api(url, token)
    try:
        found = find(api, ref)
        job = api.request("POST", f"/vms/{found['id']}/actions", action)
    except ApiError as exc:
        raise _fail(exc) from None
    click.echo(f"{found['name']}: {action['action']} accepted (job {job['id']})")


@vm.command("start")
@click.argument("ref", metavar="VM")
@url_option
@token_option
def start(ref: str, url: str | None, token: str | None) -> None:
    """Start a stopped VM."""
    _act(ref, url, token, {"action": "start"})


@vm.command("stop")
@click.argument("ref", metavar="VM")
@click.option("--timeout", type=click.IntRange(min=1), default=None,
              help="seconds of ACPI shutdown before it is forced off (server default: 60)")
@url_option
@token_option
def stop(ref: str, timeout: int | None, url: str | None, token: str | None) -> None:
    """Shut a VM down (ACPI; forced off after the timeout)."""
    _act(ref, url, token, {"action": "stop", **({"timeout": timeout} if timeout else {})})


@vm.command("reboot")
@click.argument("ref", metavar="VM")
@click.option("--hard", is_flag=True, help="power off at once, then start")
@url_option
@token_option
def reboot(ref: str, hard: bool, url: str | None, token: str | None) -> None:
    """Reboot a VM."""
    _act(ref, url, token, {"action": "reboot", **({"hard": True} if hard else {})})


@vm.command("force-off")
@click.argument("ref", metavar="VM")
@url_option
@token_option
def force_off(ref: str, url: str | None, token: str | None) -> None:
    """Power a VM off at once."""
    _act(ref, url, token, {"action": "force_off"})


@vm.command("console")
@click.argument("ref", metavar="VM")
@click.option("--bytes", "max_bytes", type=click.IntRange(1, 1024 * 1024), default=65536,
              show_default=True, help="how much of the log's end")
@url_option
@token_option
def console(ref: str, max_bytes: int, url: str | None, token: str | None) -> None:
    """Print the end of VM's serial console log."""
    api = _api(url, token)
    try:
        found = find(api, ref)
        out = api.get(f"/vms/{found['id']}/console", max_bytes=max_bytes)
    except ApiError as exc:
        raise _fail(exc) from None
    click.echo(out["output"], nl=False)


@vm.command("delete")
@click.argument("refs", metavar="VM...", nargs=-1, required=True)
@click.option("--wait", is_flag=True, help="wait until each is gone")
@timeout_option
@url_option
@token_option
def delete(refs: tuple[str, ...], wait: bool, timeout: float, url: str | None,
           token: str | None) -> None:
    """Delete VMs (their disks, claims and addresses go with them)."""
    api = _api(url, token)
    try:
        found = [find(api, ref) for ref in refs]
        for one in found:
            api.request("DELETE", f"/vms/{one['id']}")
            click.echo(f"{one['name']}: deleting")
        for one in found if wait else ():
            wait_vm(api, one, "gone", timeout)
            click.echo(f"{one['name']}: gone")
    except ApiError as exc:
        raise _fail(exc) from None
