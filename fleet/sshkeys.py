"""SSH public keys as users import them: one line checked, normalised and fingerprinted.

Owns what a keypair may contain: `<type> <base64> [comment]` on one line, with the type one
of ALLOWED_TYPES, the base64 blob in SSH wire format whose inner type is the line's type,
and (through `cryptography`) a key that really is one of that type: an RSA key of at least
MIN_RSA_BITS, an ECDSA point on its named curve. Refused, each with a message that says why:
private keys, RFC 4716 blocks, authorized_keys options, several lines, other key types.

Must not: store anything, or echo the key material back in an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from fleet.exceptions import BadRequest

ALLOWED_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521")
"""Key types accepted, as the first word of the line and inside the blob."""

MIN_RSA_BITS = 2048
"""Smallest RSA modulus accepted."""

MAX_LINE = 8192
"""Longest line accepted (a 16384-bit RSA key is about 2,800 characters)."""

MAX_COMMENT = 255
"""Longest comment kept after the key."""

ALLOWED_TEXT = "ssh-ed25519, ssh-rsa (at least 2048 bits) or ecdsa-sha2-nistp256/384/521"

OPTION_WORDS = ("command=", "from=", "environment=", "permitopen=", "permitlisten=",
                "principals=", "tunnel=", "expiry-time=", "no-", "restrict", "cert-authority",
                "agent-forwarding", "port-forwarding", "pty", "user-rc", "x11-forwarding",
                "verify-required", "touch-required")
"""Starts of authorized_keys options: refused, a keypair is a key and nothing else."""


@dataclass(frozen=True)
class PublicKey:
    """A validated public key."""

    type: str
    blob: bytes
    comment: str
    bits: int

    @property
    def line(self) -> str:
        """The normalised one-line form stored and handed to guests."""
        b64 = base64.b64encode(self.blob).decode()
        return f"{self.type} {b64} {self.comment}" if self.comment else f"{self.type} {b64}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)


def fingerprint(blob: bytes) -> str:
    """`SHA256:<base64, no padding>` of the key blob, as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _bad(message: str) -> BadRequest:
    return BadRequest(f"public_key: {message}", {"public_key": [message]})


def _wire_type(blob: bytes) -> str:
    """The key type at the start of an SSH wire-format blob (a uint32-length string)."""
    if len(blob) < 4:
        raise _bad("the key data is too short to be an SSH public key")
    (length,) = struct.unpack(">I", blob[:4])
    if length == 0 or length > 64 or len(blob) < 4 + length:
        raise _bad("the key data is not in SSH public key format")
    try:
        return blob[4:4 + length].decode("ascii")
    except UnicodeDecodeError:
        raise _bad("the key data is not in SSH public key format") from None


def _refuse_first_word(first: str, text: str) -> BadRequest:
    lowered = first.lower()
    if lowered.startswith(OPTION_WORDS) or any(f" {t} " in f" {text} " for t in ALLOWED_TYPES):
        return _bad("options before the key (such as command=\"...\" or no-pty) are not "
                    "allowed: send only '<type> <base64> [comment]'")
    if first in ("ssh-dss",) or first.startswith("sk-") or "-cert-" in first:
        return _bad(f"key type '{first[:64]}' is not accepted: use {ALLOWED_TEXT}")
    return _bad(f"the line must start with the key type ({ALLOWED_TEXT})")


def parse(text: str) -> PublicKey:
    """Check one public key line and return it normalised; BadRequest (400) says what is
    wrong, under errors.public_key."""
    if not isinstance(text, str):
        raise _bad("must be a string")
    text = text.strip()
    if not text:
        raise _bad("is empty: paste the one line of your .pub file")
    if "PRIVATE KEY" in text or text.startswith("-----BEGIN OPENSSH"):
        raise _bad("this is a private key: never send it anywhere; send the public key "
                   "(the one line of the .pub file) instead")
    if text.startswith("---- BEGIN SSH2 PUBLIC KEY") or text.startswith("-----BEGIN"):
        raise _bad("only the OpenSSH one-line format is accepted (convert an RFC 4716 key "
                   "with `ssh-keygen -i -f key.pub`)")
    if len(text) > MAX_LINE:
        raise _bad(f"is longer than {MAX_LINE} characters")
    if "\n" in text or "\r" in text:
        raise _bad("must be a single line holding one key")
    if any(ord(ch) < 32 and ch != "\t" or ord(ch) == 127 for ch in text):
        raise _bad("contains control characters")
    parts = text.split(maxsplit=2)
    first = parts[0]
    if first not in ALLOWED_TYPES:
        raise _refuse_first_word(first, text)
    if len(parts) < 2:
        raise _bad("the base64 key data after the type is missing")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the key data is not valid base64") from None
    inner = _wire_type(blob)
    if inner != first:
        raise _bad(f"the line says {first} but the key data holds a key of type "
                   f"'{inner[:64]}'")
    try:
        key = load_ssh_public_key(f"{first} {parts[1]}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise _bad(f"the key data is not a valid {first} key") from None
    bits = getattr(key, "key_size", 256)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise _bad(f"RSA keys need at least {MIN_RSA_BITS} bits; this one has {key.key_size}")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if len(comment) > MAX_COMMENT:
        raise _bad(f"the comment after the key is longer than {MAX_COMMENT} characters")
    return PublicKey(type=first, blob=blob, comment=comment, bits=int(bits))
