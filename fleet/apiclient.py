"""A small client of the virtfleet REST API: JSON requests with a bearer token.

Owns the connection to one virtfleet (http or https, a timeout per request), sending a JSON
body, and turning the answer into data, or into :class:`ApiError` carrying the server's own
message (``<status>: <message>``) — never a traceback for a refusal. ``virtfleet vm``
(fleet/vmcli.py) uses it; fleet/imageclient.py adds uploads on top of it.

Must not: decide anything the server decides (it only sends and reads), or keep state
between requests beyond where to send them.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

TIMEOUT = 600.0
"""Seconds a request may go without progress."""

POLL_S = 1.0
"""Pause between two looks at something that is changing (a VM being built)."""


class ApiError(Exception):
    """The request could not be made or was refused; the message says why (the server's
    message when it answered). `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """The API of one virtfleet (``url``: its base URL) with one API token."""

    def __init__(self, url: str, token: str, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(f"not an http(s) URL: {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self._parts = parts

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        """`method` on ``/api/v1<path>`` with `body` as JSON; the answer's JSON (None when it
        has none). Raises ApiError."""
        target = "/api/v1" + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self.connection()
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            return self.answer(resp.status, resp.read())
        except OSError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:
            raise ApiError(f"bad answer from {self.url}: {exc!r}") from None
        finally:
            conn.close()

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname or "", self._parts.port
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    @staticmethod
    def answer(status: int, body: bytes) -> Any:
        """The JSON of an answer; ApiError with the server's message for a 4xx or 5xx."""
        try:
            data = json.loads(body or b"null")
        except ValueError:
            data = None
        if status >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            raise ApiError(f"{status}: {message or body[:200].decode(errors='replace')}",
                           status)
        return data


def segment(value: str) -> str:
    """`value` as one path segment (an id or a name: nothing in it can reach another
    path)."""
    return quote(value, safe="")


def wait_until(look: Callable[[], Any], done: Callable[[Any], bool], timeout: float,
               what: str, poll: float = POLL_S) -> Any:
    """Call `look` until `done` says yes about what it returned (or `timeout` seconds
    pass: ApiError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = look()
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            raise ApiError(f"{what}: still not done after {timeout:.0f} s")
        time.sleep(poll)


def table(rows: Iterable[tuple[str, ...]]) -> str:
    """Rows as left-aligned columns (the first row is the header)."""
    rows = list(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
                     .rstrip() for r in rows)
