"""Console tokens: short-lived, single-use permission to open one VM's serial console on one host.

Owns the token format, shared by the web (which signs, ``sign``) and each host's console server
(which verifies, ``verify``, and refuses replays with a ``NonceCache``). Must not know about
HTTP, websockets or libvirt, and never logs a token.

A token is ``<payload>.<signature>``, both base64url without padding. The payload is compact
JSON ``{"v": 1, "vm": <VM id>, "host": <host name>, "exp": <unix seconds>, "nonce": <128 random
bits>}``. The signature is HMAC-SHA256 over the payload's base64url text, keyed with a key
derived from the host credential (``settings.host_token``, which the control plane and every
host know): the credential itself is never the MAC key, so a console token's signature is
worth nothing anywhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

TOKEN_VERSION = 1
"""The ``v`` of the payload; a host refuses any other."""

MAX_TTL = 3600
"""Longest lifetime (seconds) a host accepts, so remembered nonces stay bounded in time."""

MAX_TOKEN_CHARS = 1024
"""Longer strings are refused before any decoding."""

_KEY_LABEL = b"virtfleet console token v1"


class TokenError(ValueError):
    """A token was refused; the message says why and is safe to show (it holds no secret)."""


@dataclass(frozen=True)
class ConsoleClaims:
    """What a valid token allows: the console of ``vm_id`` on ``host`` until ``exp``."""

    vm_id: str
    host: str
    exp: int
    nonce: str


def _key(secret: str) -> bytes:
    if not secret:
        raise TokenError("console tokens need the host credential (setting 'host_token')")
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload_b64: str) -> bytes:
    return hmac.new(_key(secret), payload_b64.encode("ascii"), hashlib.sha256).digest()


def sign(secret: str, vm_id: str, host: str, ttl: float, *, now: float | None = None,
         nonce: str | None = None) -> tuple[str, ConsoleClaims]:
    """Return ``(token, claims)`` for ``vm_id`` on ``host``, valid ``ttl`` seconds from now."""
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be in (0, {MAX_TTL}] seconds")
    now = time.time() if now is None else now
    claims = ConsoleClaims(vm_id=vm_id, host=host, exp=int(now + ttl),
                           nonce=nonce or secrets.token_urlsafe(16))
    payload = json.dumps({"v": TOKEN_VERSION, "vm": claims.vm_id, "host": claims.host,
                          "exp": claims.exp, "nonce": claims.nonce},
                         separators=(",", ":"), sort_keys=True).encode()
    payload_b64 = _b64(payload)
    return f"{payload_b64}.{_b64(_mac(secret, payload_b64))}", claims


def verify(secret: str, token: str, host: str, *, now: float | None = None) -> ConsoleClaims:
    """Check signature, version, host and expiry; return the claims or raise TokenError.

    Replays are the caller's to refuse (see ``NonceCache``): only the host knows which
    nonces it has seen.
    """
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        raise TokenError("malformed token")
    payload_b64, sig_b64 = token.split(".")
    try:
        sig = _unb64(sig_b64)
        payload_b64.encode("ascii")
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None
    # The signature first: nothing of an unsigned payload is even parsed.
    if not hmac.compare_digest(sig, _mac(secret, payload_b64)):
        raise TokenError("bad token signature")
    try:
        data = json.loads(_unb64(payload_b64))
        claims = ConsoleClaims(vm_id=str(data["vm"]), host=str(data["host"]),
                               exp=int(data["exp"]), nonce=str(data["nonce"]))
        version = data["v"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise TokenError("malformed token") from None
    if version != TOKEN_VERSION:
        raise TokenError("unsupported token version")
    if not claims.nonce:
        raise TokenError("malformed token")
    if claims.host != host:
        raise TokenError("token is for another host")
    now = time.time() if now is None else now
    if now >= claims.exp:
        raise TokenError("token expired")
    if claims.exp > now + MAX_TTL:
        raise TokenError("token lifetime too long")
    return claims


class NonceCache:
    """Nonces of tokens already used, each remembered until its token expires (thread-safe)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._purged = 0.0

    def _purge(self, now: float) -> None:
        self._seen = {n: exp for n, exp in self._seen.items() if exp > now}
        self._purged = now

    def use(self, claims: ConsoleClaims, *, now: float | None = None) -> None:
        """Mark ``claims.nonce`` used; raise TokenError if it was used before."""
        now = time.time() if now is None else now
        with self._lock:
            if now - self._purged > 30 or len(self._seen) >= self.max_entries:
                self._purge(now)
            if claims.nonce in self._seen:
                raise TokenError("token already used")
            if len(self._seen) >= self.max_entries:
                raise TokenError("too many console tokens in flight; try again shortly")
            self._seen[claims.nonce] = claims.exp

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
