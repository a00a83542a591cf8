"""HTTP downloads, the one module that fetches files over the network.

Streams a URL in chunks. With `public_only`, only http(s) URLs whose host resolves to
addresses outside loopback, link-local, multicast and the shared/metadata ranges are fetched,
every redirect is checked again, and the connection goes to the very address that was checked
(the name is resolved once per hop: a DNS answer that changes between the check and the
connection, "DNS rebinding", cannot point the fetch at a refused address). The request still
names the host (Host header, TLS SNI and certificate check against the name). Hosts use it
without that check to fetch bases from their own control plane.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

import requests
import requests.certs
import urllib3

from fleet.exceptions import BadRequest

CHUNK = 1024 * 1024
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
BLOCKED_NETWORKS = (ipaddress.ip_network("100.64.0.0/10"),
                    ipaddress.ip_network("169.254.0.0/16"),
                    ipaddress.ip_network("fd00:ec2::/32"))


def check_public(host: str) -> list[str]:
    """The addresses `host` resolves to (in the resolver's order), every one of them allowed;
    raises BadRequest (a message safe to show) when one is not, or it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise BadRequest("the URL's host name does not resolve") from None
    out: list[str] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
                or ip.is_reserved or any(ip in net for net in BLOCKED_NETWORKS
                                         if net.version == ip.version)):
            raise BadRequest("the URL points at an address that is not allowed")
        if str(ip) not in out:
            out.append(str(ip))
    if not out:
        raise BadRequest("the URL's host name does not resolve")
    return out


@dataclass
class _Answer:
    status: int
    location: str
    chunks: Callable[[], Iterator[bytes]]
    close: Callable[[], None]


def _get(url: str, headers: Mapping[str, str], timeout: tuple[float, float]) -> _Answer:
    resp = requests.get(url, stream=True, allow_redirects=False, timeout=timeout,
                        headers=dict(headers))
    return _Answer(resp.status_code, resp.headers.get("Location", ""),
                   lambda: resp.iter_content(CHUNK), resp.close)


def _get_pinned(parts: SplitResult, address: str, headers: Mapping[str, str],
                timeout: tuple[float, float]) -> _Answer:
    """GET `parts` from `address` (already checked), naming the URL's host in the request
    and, over TLS, in SNI and the certificate check."""
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = port == (443 if https else 80)
    name = f"[{host}]" if ":" in host else host
    wanted = {**headers, "Host": name if default_port else f"{name}:{port}"}
    limits = urllib3.Timeout(connect=timeout[0], read=timeout[1])
    pool: urllib3.HTTPConnectionPool
    if https:
        pool = urllib3.HTTPSConnectionPool(
            address, port, timeout=limits, retries=False, maxsize=1,
            cert_reqs="CERT_REQUIRED", ca_certs=requests.certs.where(),
            server_hostname=host, assert_hostname=host)
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=limits, retries=False,
                                          maxsize=1)
    try:
        resp = pool.urlopen("GET", target, headers=wanted, redirect=False, retries=False,
                            preload_content=False, assert_same_host=False)
    except Exception:
        pool.close()
        raise

    def close() -> None:
        resp.release_conn()
        pool.close()

    return _Answer(resp.status, resp.headers.get("Location", ""),
                   lambda: resp.stream(CHUNK), close)


def stream(url: str, *, headers: Mapping[str, str] | None = None, public_only: bool = True,
           timeout: tuple[float, float] = (10, 60)) -> Iterator[bytes]:
    """Yield the body of `url` in chunks; raises BadRequest with a message safe to show."""
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("URLs must be http:// or https://")
        try:
            if public_only:
                address = check_public(parts.hostname)[0]
                answer = _get_pinned(parts, address, headers or {}, timeout)
            else:
                answer = _get(url, headers or {}, timeout)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                ValueError):
            raise BadRequest("the URL could not be fetched") from None
        if answer.status in REDIRECTS and answer.location:
            url = urljoin(url, answer.location)
            answer.close()
            continue
        if answer.status != 200:
            answer.close()
            raise BadRequest(f"the URL answered HTTP {answer.status}")
        try:
            yield from answer.chunks()
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            raise BadRequest("the URL could not be fetched completely") from None
        finally:
            answer.close()
        return
    raise BadRequest("the URL redirects too many times")
