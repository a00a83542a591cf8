"""HTTP downloads, the one module that fetches files over the network.

Streams a URL in chunks. With `public_only`, only http(s) URLs whose host resolves to an
address outside loopback, link-local, multicast and the shared/metadata ranges are fetched,
and every redirect is checked again. Hosts use it without that check to fetch bases from
their own control plane.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator, Mapping
from urllib.parse import urljoin, urlsplit

import requests

from fleet.exceptions import BadRequest

CHUNK = 1024 * 1024
MAX_REDIRECTS = 5
BLOCKED_NETWORKS = (ipaddress.ip_network("100.64.0.0/10"),
                    ipaddress.ip_network("169.254.0.0/16"),
                    ipaddress.ip_network("fd00:ec2::/32"))


def check_public(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise BadRequest("the URL's host name does not resolve") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip.is_reserved or any(ip in net for net in BLOCKED_NETWORKS
                                         if net.version == ip.version)):
            raise BadRequest("the URL points at an address that is not allowed")


def stream(url: str, *, headers: Mapping[str, str] | None = None, public_only: bool = True,
           timeout: tuple[float, float] = (10, 60)) -> Iterator[bytes]:
    """Yield the body of `url` in chunks; raises BadRequest with a message safe to show."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("URLs must be http:// or https://")
        if public_only:
            check_public(parts.hostname)
        try:
            resp = requests.get(url, stream=True, allow_redirects=False, timeout=timeout,
                                headers=dict(headers or {}))
        except requests.RequestException:
            raise BadRequest("the URL could not be fetched") from None
        if resp.is_redirect:
            url = urljoin(url, resp.headers.get("Location", ""))
            resp.close()
            continue
        if resp.status_code != 200:
            resp.close()
            raise BadRequest(f"the URL answered HTTP {resp.status_code}")
        with resp:
            yield from resp.iter_content(CHUNK)
        return
    raise BadRequest("the URL redirects too many times")
