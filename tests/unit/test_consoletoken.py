"""Console tokens (fleet.consoletoken): signed by the web, checked by a host's console server;
and the console settings that go with them (fleet.config)."""

from __future__ import annotations

import base64
import json

import pytest

from fleet.config import load_settings
from fleet.consoletoken import MAX_TTL, NonceCache, TokenError, sign, verify
from fleet.exceptions import ConfigError

SECRET = "host-credential-0123"
VM = "6f1c2a1e-0b7d-4c59-9a55-0d3c7e5b9a10"
NOW = 1_700_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_sign_then_verify_gives_the_claims() -> None:
    token, claims = sign(SECRET, VM, "kvm1", 60, now=NOW)
    assert claims.vm_id == VM and claims.host == "kvm1" and claims.exp == int(NOW) + 60
    assert len(claims.nonce) >= 16
    assert verify(SECRET, token, "kvm1", now=NOW + 59) == claims
    # URL-safe as it is: it goes into a query string untouched.
    assert all(ch.isalnum() or ch in "-_." for ch in token)
    assert SECRET not in token


def test_each_token_has_its_own_nonce() -> None:
    tokens = {sign(SECRET, VM, "kvm1", 60, now=NOW)[1].nonce for _ in range(50)}
    assert len(tokens) == 50


@pytest.mark.parametrize("later", [60, 61, 3600])
def test_expired_token_is_refused(later: float) -> None:
    token, _ = sign(SECRET, VM, "kvm1", 60, now=NOW)
    with pytest.raises(TokenError, match="expired"):
        verify(SECRET, token, "kvm1", now=NOW + later)


def test_token_for_another_host_is_refused() -> None:
    token, _ = sign(SECRET, VM, "kvm1", 60, now=NOW)
    with pytest.raises(TokenError, match="another host"):
        verify(SECRET, token, "kvm2", now=NOW)


def test_token_signed_with_another_key_is_refused() -> None:
    token, _ = sign("some-other-credential", VM, "kvm1", 60, now=NOW)
    with pytest.raises(TokenError, match="signature"):
        verify(SECRET, token, "kvm1", now=NOW)


def _reforge(token: str, **changes: object) -> str:
    """The same signature over a payload with `changes`: what an attacker could do."""
    payload_b64, sig = token.split(".")
    data = json.loads(unb64(payload_b64))
    data.update(changes)
    return f"{b64(json.dumps(data).encode())}.{sig}"


@pytest.mark.parametrize("changes", [{"vm": "00000000-0000-0000-0000-000000000000"},
                                     {"host": "kvm2"}, {"exp": int(NOW) + 10_000},
                                     {"nonce": "replayed"}, {"v": 2}])
def test_tampered_payload_is_refused(changes: dict[str, object]) -> None:
    token, _ = sign(SECRET, VM, "kvm1", 60, now=NOW)
    with pytest.raises(TokenError, match="signature"):
        verify(SECRET, _reforge(token, **changes), "kvm1", now=NOW)


def test_tampered_signature_is_refused() -> None:
    token, _ = sign(SECRET, VM, "kvm1", 60, now=NOW)
    payload_b64, sig = token.split(".")
    flipped = bytearray(unb64(sig))
    flipped[0] ^= 1
    for bad in (f"{payload_b64}.{b64(bytes(flipped))}", f"{payload_b64}.", f"{payload_b64}.AA"):
        with pytest.raises(TokenError, match="signature"):
            verify(SECRET, bad, "kvm1", now=NOW)


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "." * 3, "x" * 2000, "!!!.???",
                                 "é.é"])
def test_malformed_tokens_are_refused(bad: str) -> None:
    with pytest.raises(TokenError):
        verify(SECRET, bad, "kvm1", now=NOW)


def test_a_signed_payload_that_is_not_a_token_is_refused() -> None:
    # Even correctly signed, a payload must be a complete token of a known version.
    from fleet.consoletoken import _mac
    for payload in (b"[]", b"not json", json.dumps({"v": 1, "vm": VM}).encode(),
                    json.dumps({"v": 2, "vm": VM, "host": "kvm1", "exp": int(NOW) + 60,
                                "nonce": "n"}).encode()):
        p = b64(payload)
        with pytest.raises(TokenError):
            verify(SECRET, f"{p}.{b64(_mac(SECRET, p))}", "kvm1", now=NOW)


def test_lifetime_beyond_the_maximum_is_refused() -> None:
    with pytest.raises(ValueError):
        sign(SECRET, VM, "kvm1", MAX_TTL + 1, now=NOW)
    token, _ = sign(SECRET, VM, "kvm1", MAX_TTL, now=NOW + 120)  # a clock far ahead
    with pytest.raises(TokenError, match="too long"):
        verify(SECRET, token, "kvm1", now=NOW)


def test_no_host_credential_means_no_tokens() -> None:
    with pytest.raises(TokenError, match="host_token"):
        sign("", VM, "kvm1", 60, now=NOW)
    token, _ = sign(SECRET, VM, "kvm1", 60, now=NOW)
    with pytest.raises(TokenError, match="host_token"):
        verify("", token, "kvm1", now=NOW)


def test_replayed_token_is_refused_until_it_expires() -> None:
    nonces = NonceCache()
    token, _ = sign(SECRET, VM, "kvm1", 60, now=NOW)
    nonces.use(verify(SECRET, token, "kvm1", now=NOW), now=NOW)
    with pytest.raises(TokenError, match="already used"):
        nonces.use(verify(SECRET, token, "kvm1", now=NOW + 1), now=NOW + 1)
    # Once expired the nonce is forgotten, and the token fails on its expiry instead.
    nonces.use(verify(SECRET, sign(SECRET, VM, "kvm1", 60, now=NOW + 100)[0], "kvm1",
                      now=NOW + 100), now=NOW + 100)
    assert len(nonces) == 1
    with pytest.raises(TokenError, match="expired"):
        verify(SECRET, token, "kvm1", now=NOW + 100)


def test_nonce_cache_is_bounded() -> None:
    nonces = NonceCache(max_entries=3)
    for i in range(3):
        nonces.use(sign(SECRET, VM, "kvm1", 60, now=NOW, nonce=f"n{i}")[1], now=NOW)
    with pytest.raises(TokenError, match="in flight"):
        nonces.use(sign(SECRET, VM, "kvm1", 60, now=NOW, nonce="n3")[1], now=NOW)
    nonces.use(sign(SECRET, VM, "kvm1", 60, now=NOW + 61, nonce="n4")[1], now=NOW + 61)
    assert len(nonces) == 1


# -- settings -----------------------------------------------------------------------------


def settings(**env: str):  # type: ignore[no-untyped-def]
    return load_settings(env={"VIRTFLEET_CONFIG": "", **{f"VIRTFLEET_{k.upper()}": v
                                                          for k, v in env.items()}},
                         path=None)


@pytest.fixture(autouse=True)
def _no_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("fleet.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")


def test_console_defaults() -> None:
    s = settings()
    assert s.console_bind == "127.0.0.1:6081"
    assert s.console_url == "ws://127.0.0.1:6081"
    assert s.console_token_ttl == 60
    assert settings(console_public_url="wss://kvm1.example/console-proxy/").console_url == \
        "wss://kvm1.example/console-proxy"
    assert settings(console_bind="").console_url == ""


@pytest.mark.parametrize("env, name", [
    ({"console_bind": "6081"}, "console_bind"),
    ({"console_bind": "127.0.0.1:0"}, "console_bind"),
    ({"console_bind": "127.0.0.1:70000"}, "console_bind"),
    ({"console_bind": "0.0.0.0:6081"}, "console_public_url"),
    ({"console_bind": "[::]:6081"}, "console_public_url"),
    ({"console_public_url": "http://kvm1:6081"}, "console_public_url"),
    ({"console_public_url": "ws://kvm1:6081/?a=b"}, "console_public_url"),
    ({"console_public_url": "ws://"}, "console_public_url"),
    ({"console_token_ttl": "0"}, "console_token_ttl"),
    ({"console_token_ttl": "3601"}, "console_token_ttl"),
])
def test_bad_console_settings_name_the_setting(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        settings(**env)


def test_every_address_with_a_public_url_is_fine() -> None:
    s = settings(console_bind="0.0.0.0:6081", console_public_url="ws://kvm1.example:6081")
    assert s.console_url == "ws://kvm1.example:6081"
