"""`virtfleet image`: upload a disk image file to a virtfleet, list its images.

Owns the commands' options and output only; the requests are fleet.imageclient's (a raw
file goes sparse: its data only); where they go, fleet.apicli says (options, env, this
machine's `virtfleet up`). Every failure ends with a one-line message
(click.ClickException), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fleet.apicli import connect, json_option, token_option, url_option
from fleet.apiclient import ApiError, table
from fleet.imageclient import ImageClient


def client(url: str | None, token: str | None) -> ImageClient:
    return connect(url, token, ImageClient)


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def _line(image: dict[str, Any]) -> str:
    reason = f" ({image['status_reason']})" if image.get("status_reason") else ""
    return f"{image['id']}  {image['name']}  {image['status']}{reason}"


@click.group("image")
def image() -> None:
    """Images: upload a disk image file, list them."""


@image.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True,
                                        path_type=Path))
@click.option("--name", required=True, help="the image's name in its project")
@click.option("--visibility", type=click.Choice(["private", "public"]), default="private",
              show_default=True, help="public: every project may use it (admins only)")
@click.option("--format", "disk_format", type=click.Choice(["raw", "qcow2"]), default=None,
              help="what the file is (default: qcow2 if it starts like one, else raw); the "
                   "server checks it")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="wait until the image is active (or error)")
@url_option
@token_option
@json_option
def upload(file: Path, name: str, visibility: str, disk_format: str | None, wait: bool,
           url: str | None, token: str | None, as_json: bool) -> None:
    """Upload FILE as a new image: a raw disk is sent sparse (its data only, converted to
    qcow2 on the controller as it arrives), a qcow2 as it is. Prints the image's id, name
    and status; with --wait, exits 1 when the import ends in error."""
    api = client(url, token)
    try:
        found = api.upload(file, name, visibility, disk_format)
        if wait:
            found = api.wait(found)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(found, indent=2) if as_json else _line(found))
    if wait and found.get("status") != "active":
        raise SystemExit(1)


@image.command("list")
@url_option
@token_option
@json_option
def list_images(url: str | None, token: str | None, as_json: bool) -> None:
    """List the images this token's project may use."""
    try:
        found = client(url, token).list()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(table([("ID", "NAME", "STATUS", "FORMAT", "VIRTUAL", "VISIBILITY", "PROJECT"),
                      *((i["id"], i["name"], i["status"], i.get("disk_format", ""),
                         _size(i.get("virtual_size_bytes")), i.get("visibility", ""),
                         i.get("project", "")) for i in found)]))
