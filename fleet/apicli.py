"""What the CLI's API commands (`virtfleet vm`, `virtfleet image`) share: where to send.

Owns the ``--url``/``--token``/``--json`` options and turning them into a client: the
options, else ``$VIRTFLEET_URL``/``$VIRTFLEET_TOKEN``, else this machine's virtfleet as
``virtfleet up`` runs it (its settings' base URL and the admin token it wrote in the state
directory). A missing token or a bad URL is a one-line message (click.ClickException).
"""

from __future__ import annotations

from typing import TypeVar

import click

from fleet.apiclient import ApiClient, ApiError

TOKEN_FILE = "admin-token"
"""The admin token `virtfleet up` writes into the state directory."""

C = TypeVar("C", bound=ApiClient)

url_option = click.option("--url", envvar="VIRTFLEET_URL", default=None,
                          help="the virtfleet's base URL [env VIRTFLEET_URL; default: this "
                               "machine's, as `virtfleet up` runs it]")
token_option = click.option("--token", envvar="VIRTFLEET_TOKEN", default=None,
                            help="an API token [env VIRTFLEET_TOKEN; default: the admin "
                                 "token `virtfleet up` wrote]")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="print the server's JSON")


def connect(url: str | None, token: str | None, cls: type[C]) -> C:
    """A `cls` client for these options (or their defaults: see the module's docstring)."""
    if not url or not token:
        from fleet.config import load_settings
        from fleet.exceptions import ConfigError
        try:
            settings = load_settings()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        url = url or settings.base_url
        if not token:
            try:
                token = (settings.state_dir / TOKEN_FILE).read_text().strip()
            except OSError:
                raise click.ClickException(
                    "no API token: give --token or set VIRTFLEET_TOKEN (or run this where "
                    "`virtfleet up` keeps its admin token)") from None
    try:
        return cls(url, token)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
