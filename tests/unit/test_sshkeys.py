"""SSH public key checks (fleet.sshkeys): accepted types, fingerprints as ssh-keygen prints
them, and a clear 400 for everything refused, never echoing the key material."""

from __future__ import annotations

import base64
import shutil
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fleet import sshkeys
from fleet.exceptions import BadRequest
from fleet.proc import run

OPENSSH = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def ed25519_line() -> str:
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*OPENSSH).decode()


def rsa_line(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.public_key().public_bytes(*OPENSSH).decode()


def ecdsa_line(curve: ec.EllipticCurve) -> str:
    return ec.generate_private_key(curve).public_key().public_bytes(*OPENSSH).decode()


def wire(*fields: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(f)) + f for f in fields)).decode()


def refused(text: str) -> str:
    with pytest.raises(BadRequest) as err:
        sshkeys.parse(text)
    assert err.value.http_status == 400
    assert set(err.value.errors) == {"public_key"}
    return str(err.value)


@pytest.mark.parametrize("make, type_", [
    (ed25519_line, "ssh-ed25519"),
    (lambda: rsa_line(2048), "ssh-rsa"),
    (lambda: rsa_line(3072), "ssh-rsa"),
    (lambda: ecdsa_line(ec.SECP256R1()), "ecdsa-sha2-nistp256"),
    (lambda: ecdsa_line(ec.SECP384R1()), "ecdsa-sha2-nistp384"),
    (lambda: ecdsa_line(ec.SECP521R1()), "ecdsa-sha2-nistp521"),
])
def test_accepted_types(make, type_: str) -> None:  # type: ignore[no-untyped-def]
    line = make()
    key = sshkeys.parse(f"  {line} alice@laptop \n")  # surrounding blanks and a final newline
    assert key.type == type_
    assert key.line == f"{line} alice@laptop"
    assert key.fingerprint.startswith("SHA256:") and not key.fingerprint.endswith("=")
    assert len(key.fingerprint) == len("SHA256:") + 43
    assert sshkeys.parse(line).line == line  # the comment is optional


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
@pytest.mark.parametrize("make", [ed25519_line, lambda: rsa_line(2048),
                                  lambda: ecdsa_line(ec.SECP384R1())])
def test_fingerprint_is_ssh_keygens(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    line = make() + " test"
    (tmp_path / "k.pub").write_text(line + "\n")
    out = run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "k.pub")],
              timeout=30).stdout.decode()
    assert out.split()[1] == sshkeys.parse(line).fingerprint


def test_short_rsa_is_refused_with_its_size() -> None:
    msg = refused(rsa_line(1024))
    assert "2048" in msg and "1024" in msg


def test_private_keys_are_refused_without_echo() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption()).decode()
    msg = refused(pem)
    assert "private key" in msg
    assert pem.splitlines()[1][:20] not in msg
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    assert "private key" in refused(pkcs8)


@pytest.mark.parametrize("prefix", ['command="/bin/true" ', "no-pty ", "restrict,no-agent ",
                                    'from="10.0.0.0/8" '])
def test_options_are_refused(prefix: str) -> None:
    assert "options" in refused(prefix + ed25519_line())


def test_several_lines_are_refused() -> None:
    assert "single line" in refused(ed25519_line() + "\n" + ed25519_line())
    assert "single line" in refused(ed25519_line() + "\r" + "x")


def test_inner_type_must_match() -> None:
    blob = base64.b64decode(ed25519_line().split()[1])
    msg = refused("ssh-rsa " + base64.b64encode(blob).decode())
    assert "ssh-rsa" in msg and "ssh-ed25519" in msg
    p256 = ecdsa_line(ec.SECP256R1()).split()[1]
    assert "nistp256" in refused("ecdsa-sha2-nistp384 " + p256)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("   \n", "empty"),
    ("ssh-ed25519", "missing"),
    ("ssh-ed25519 not*base64!", "base64"),
    ("ssh-ed25519 " + base64.b64encode(b"\x00\x00").decode(), "too short"),
    ("ssh-ed25519 " + wire(b"ssh-ed25519", b"\x01" * 31), "not a valid ssh-ed25519"),
    ("ssh-ed25519 " + wire(b"ssh-ed25519", b"\x01" * 32, b"extra"), "not a valid"),
    ("ssh-dss " + wire(b"ssh-dss", b"x"), "not accepted"),
    ("sk-ssh-ed25519@openssh.com " + wire(b"sk-ssh-ed25519@openssh.com"), "not accepted"),
    ("ssh-ed25519-cert-v01@openssh.com AAAA", "not accepted"),
    ("hello world", "must start with the key type"),
    ("---- BEGIN SSH2 PUBLIC KEY ----", "ssh-keygen -i"),
])
def test_malformed_keys_say_why(text: str, words: str) -> None:
    assert words in refused(text)


def test_control_characters_and_size_limits() -> None:
    assert "control characters" in refused(ed25519_line() + " a\x00b")
    assert "longer than" in refused("ssh-rsa " + "A" * (sshkeys.MAX_LINE + 1))
    assert "comment" in refused(ed25519_line() + " " + "c" * (sshkeys.MAX_COMMENT + 1))
