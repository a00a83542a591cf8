"""User-data: what a tenant may send, and the final user-data virtfleet puts in a NoCloud seed.

Owns: checking a tenant's user-data before a VM is accepted (:func:`validate`: empty,
``#cloud-config``, ``#!`` script or MIME multipart, at most 64 KiB, with messages that point
at the broken line), composing the seed's user-data (:func:`compose`: one MIME multipart that
carries the tenant's content unchanged, then virtfleet's own cloud-config and the ready signal
script), and reading the ready signal back from a console line (:func:`parse_ready_line`).

Must not: touch files, the network, the store or libvirt (it is pure: text in, text out), nor
rewrite the tenant's content. The seed ISO itself is ``worker.seed``'s job.

How the parts merge in cloud-init (verified against cloud-init 22.4, Debian 12): cloud-config
parts are merged in order, each with its own merge rules; without any, a part *replaces* the
keys it shares with earlier parts. virtfleet's part comes last and carries ``merge_how``
(``list(append)`` + ``dict(no_replace, recurse_list)``), so every key the tenant set wins
(``hostname`` included) and lists the tenant also has (``ssh_authorized_keys``) get virtfleet's
items appended. virtfleet adds no ``users`` list: ``ssh_authorized_keys`` go to the image's
default user, which exists unless the tenant's own ``users`` list leaves out ``default`` (as on
any cloud whose metadata keys go to the default user).
"""

from __future__ import annotations

import base64
import email
import email.message
import hashlib
import json
import textwrap
from email.generator import Generator
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from io import StringIO
from typing import Any

import yaml

from fleet.contract import READY_MARKER
from fleet.exceptions import BadRequest
from fleet.scrub import scrub

MAX_BYTES = 65536
"""The largest user-data accepted, in bytes of UTF-8 (64 KiB)."""

KINDS = ("empty", "cloud-config", "script", "multipart")
"""What :func:`validate` can answer."""

ACCEPTED = ("empty, a '#cloud-config' YAML document, a shell script starting with '#!', "
            "or a MIME multipart (MIME-Version / Content-Type: multipart/... headers)")
"""The accepted kinds, as the 400 for anything else lists them."""

READY_REASON_LIMIT = 2048
"""The longest reason :func:`parse_ready_line` returns (the guest's errors, joined)."""

MERGE_HOW: list[dict[str, Any]] = [
    {"name": "list", "settings": ["append"]},
    {"name": "dict", "settings": ["no_replace", "recurse_list"]},
]
"""cloud-init merge rules of virtfleet's cloud-config part: the tenant's keys win, lists
append."""

NO_CLOUD_INIT_RESULT = '{"v1": {"datasource": null, "errors": []}}'
"""What the ready part prints in a guest without cloud-init (the busybox demo image)."""

_EXCERPT = 40
_CLOUD_CONFIG = "#cloud-config"
_CLOUD_CONFIG_PART_TYPES = ("text/cloud-config",)
_DETECTED_PART_TYPES = ("text/plain", "text/x-not-multipart")
"""Parts cloud-init types by their first line, as it does a whole user-data."""

READY_SCRIPT = textwrap.dedent(f"""\
    #!/bin/sh
    # virtfleet ready signal: once cloud-init has finished, print ONE line on the serial
    # console: '{READY_MARKER}' + /run/cloud-init/result.json without its newlines.
    # It runs detached from cloud-final (it waits for cloud-init, which waits for it).
    # cloud-init writes result.json (atomically, on /run) when its final stage has ended:
    # what `cloud-init status --wait` waits for, without a Python start (~20 s under TCG).
    if ! command -v cloud-init >/dev/null 2>&1; then
        line='{READY_MARKER}{NO_CLOUD_INIT_RESULT}'
        {{ printf '\\n%s\\n' "$line" >/dev/ttyS0; }} 2>/dev/null \\
            || printf '\\n%s\\n' "$line" >/dev/console
        exit 0
    fi
    job='trap "" HUP
    n=0
    while [ ! -e /run/cloud-init/result.json ] && [ "$n" -lt 18000 ]; do
        sleep 0.2; n=$((n + 1))
    done
    r=$(tr -d "\\r\\n" </run/cloud-init/result.json 2>/dev/null)
    [ -n "$r" ] ||
        r="{{\\"v1\\": {{\\"datasource\\": null, \\"errors\\": [\\"no result.json\\"]}}}}"
    {{ printf "\\n%s%s\\n" "{READY_MARKER}" "$r" >/dev/ttyS0; }} 2>/dev/null \\
        || printf "\\n%s%s\\n" "{READY_MARKER}" "$r" >/dev/console'
    if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ] \\
            && systemd-run --no-block --collect --quiet --unit=virtfleet-ready \\
                /bin/sh -c "$job" >/dev/null 2>&1; then
        exit 0
    fi
    if command -v setsid >/dev/null 2>&1; then
        setsid /bin/sh -c "$job" </dev/null >/dev/null 2>&1 &
    else
        /bin/sh -c "$job" </dev/null >/dev/null 2>&1 &
    fi
    exit 0
    """)
"""The ready part: a POSIX sh script (dash in Debian, busybox ash in the demo image)."""


# --------------------------------------------------------------------------- validate


def _excerpt(text: str) -> str:
    """The start of ``text``'s first line, short enough to echo back."""
    first = text.lstrip().split("\n", 1)[0].rstrip("\r")
    return repr(first[:_EXCERPT] + ("..." if len(first) > _EXCERPT else ""))


def _first_line(text: str) -> str:
    return text.lstrip().split("\n", 1)[0].rstrip().lower()


def _is_cloud_config(text: str) -> bool:
    """``#cloud-config`` on the first line (cloud-init's test, minus the -archive/-jsonp kinds)."""
    return _first_line(text) == _CLOUD_CONFIG


def _is_mime(text: str) -> bool:
    head = text[:200].lower()
    return head.startswith("mime-version:") or (
        head.startswith("content-type:")
        and head.removeprefix("content-type:").lstrip().startswith("multipart/")
    )


def _check_cloud_config(text: str, where: str) -> None:
    """Raise BadRequest unless ``text`` is YAML holding a mapping (or nothing)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise BadRequest(f"user_data: {where}{at}: {scrub(problem, 200)}") from None
    except RecursionError:
        raise BadRequest(f"user_data: {where}: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - constructors raise ValueError & co. (bad dates)
        raise BadRequest(f"user_data: {where}: {scrub(str(exc), 200)}") from None
    if doc is not None and not isinstance(doc, dict):
        raise BadRequest(
            f"user_data: {where} must be a mapping of keys to values, not a "
            f"{type(doc).__name__}"
        )


def _part_text(part: email.message.Message) -> str | None:
    """A leaf part's content as text (transfer encoding undone), None if it is not text."""
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    payload = part.get_payload()
    if not isinstance(payload, str):
        return None
    if cte in ("7bit", "8bit", "binary"):
        return payload
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return None
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return None


def _part_name(index: int, part: email.message.Message) -> str:
    name = part.get_filename()
    label = f"{part.get_content_type()}, {name!r}" if name else part.get_content_type()
    return f"part {index} ({scrub(label, 80)})"


def _parse_mime(text: str) -> tuple[email.message.Message, list[email.message.Message]]:
    """The parsed message and its top-level parts; BadRequest if it is not sound MIME."""
    msg = email.message_from_string(text)
    if not msg.is_multipart():
        if msg.get_content_maintype() == "multipart":
            raise BadRequest("user_data: MIME multipart has no parts (boundary not found)")
        return msg, [msg]
    parts = msg.get_payload()
    if msg.defects or not isinstance(parts, list) or not parts:
        what = ", ".join(type(d).__name__ for d in msg.defects) or "no parts"
        raise BadRequest(f"user_data: MIME multipart does not parse ({what})")
    return msg, parts


def _check_multipart(text: str) -> None:
    msg, _ = _parse_mime(text)
    index = 0
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            if part.defects:
                what = ", ".join(type(d).__name__ for d in part.defects)
                raise BadRequest(f"user_data: MIME multipart does not parse ({what})")
            continue
        index += 1
        ctype = part.get_content_type()
        if ctype not in _CLOUD_CONFIG_PART_TYPES and ctype not in _DETECTED_PART_TYPES:
            continue
        content = _part_text(part)
        if content is None:
            raise BadRequest(f"user_data: {_part_name(index, part)} is not readable text")
        if ctype in _CLOUD_CONFIG_PART_TYPES or _is_cloud_config(content):
            _check_cloud_config(content, f"{_part_name(index, part)} #cloud-config")


def validate(text: str) -> str:
    """Return the kind of ``text`` (one of KINDS); raise BadRequest (400) if virtfleet refuses it.

    At most MAX_BYTES of UTF-8; ``#cloud-config`` must be a YAML mapping (or empty); a script
    starts with ``#!``; a MIME multipart must parse, and each cloud-config part in it is checked
    like a ``#cloud-config``. Messages quote at most a short excerpt of the input.
    """
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("user_data: not valid UTF-8 text") from None
    if size > MAX_BYTES:
        raise BadRequest(f"user_data: {size} bytes, the limit is {MAX_BYTES} bytes (64 KiB)")
    if not text.strip():
        return "empty"
    if _is_cloud_config(text):
        _check_cloud_config(text, _CLOUD_CONFIG)
        return "cloud-config"
    if text.startswith("#!"):
        return "script"
    if _is_mime(text):
        _check_multipart(text)
        return "multipart"
    raise BadRequest(f"user_data must be {ACCEPTED}; it starts with {_excerpt(text)}")


# --------------------------------------------------------------------------- compose


class _VerbatimGenerator(Generator):
    """Writes every header and text body exactly as the message holds it.

    The stdlib generator re-folds headers (RFC 2047-encoding non-ASCII ones) and rewrites the
    line endings of bodies; a tenant's parts must reach the guest unchanged.
    """

    def _write_headers(self, msg: email.message.Message) -> None:
        for name, value in msg.raw_items():
            self.write(f"{name}: {value}{self._NL}")
        self.write(self._NL)

    def _write_lines(self, lines: str) -> None:
        self.write(lines)


def _text_part(text: str, subtype: str) -> MIMENonMultipart:
    """A text/<subtype> part: 7bit when ASCII (readable as is, e.g. by the demo's busybox),
    else base64 of UTF-8 (cloud-init 22.4 mangles non-ASCII 8bit parts: it decodes them with
    raw-unicode-escape)."""
    part = MIMENonMultipart("text", subtype)
    if text.isascii():
        part.set_param("charset", "us-ascii")
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(text)
    else:
        part.set_param("charset", "utf-8")
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(base64.encodebytes(text.encode("utf-8")).decode("ascii"))
    return part


def _user_parts(user_data: str) -> list[email.message.Message]:
    kind = validate(user_data)
    if kind == "empty":
        return []
    if kind == "cloud-config":
        return [_text_part(user_data, "cloud-config")]
    if kind == "script":
        return [_text_part(user_data, "x-shellscript")]
    return _parse_mime(user_data)[1]


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's safe dumper when PyYAML has it (the same text, a tenth of the CPU: this runs for
every VM created), else PyYAML's own."""


def virtfleet_cloud_config(*, hostname: str, ssh_keys: list[str], fqdn: str | None = None) -> str:
    """virtfleet's own ``#cloud-config`` part (ASCII: non-ASCII is escaped by the YAML dump)."""
    doc: dict[str, Any] = {"merge_how": MERGE_HOW, "hostname": hostname}
    if fqdn:
        doc["fqdn"] = fqdn
    if ssh_keys:
        doc["ssh_authorized_keys"] = [str(k).strip() for k in ssh_keys]
    body = yaml.dump(doc, Dumper=_DUMPER, default_flow_style=False, sort_keys=False,
                     allow_unicode=False, width=1 << 16)
    return f"{_CLOUD_CONFIG}\n{body}"


def _boundary(texts: list[str]) -> str:
    """A boundary derived from the content (same input, same seed) that none of it contains."""
    digest = hashlib.sha256("\0".join(texts).encode("utf-8", "surrogateescape")).hexdigest()
    for n in range(100):
        boundary = f"==virtfleet-{digest[:32]}-{n}=="
        if not any(boundary in t for t in texts):
            return boundary
    raise RuntimeError("no MIME boundary found")  # unreachable: a hash of the content


def _flatten(msg: email.message.Message) -> str:
    out = StringIO()
    _VerbatimGenerator(out, mangle_from_=False, maxheaderlen=0).flatten(msg, linesep="\n")
    return out.getvalue()


def compose(user_data: str, *, hostname: str, ssh_keys: list[str],
            fqdn: str | None = None) -> str:
    """The final user-data for the NoCloud seed: one MIME multipart (``multipart/mixed``).

    Parts, in order: the tenant's content unchanged (a cloud-config becomes one
    text/cloud-config part, a script one text/x-shellscript part, a multipart's parts are
    carried over as they are), then virtfleet's text/cloud-config (hostname, fqdn, the SSH
    keys, ``merge_how`` so the tenant's keys win), then the ready signal (text/x-shellscript,
    READY_SCRIPT). Raises BadRequest as :func:`validate` does.
    """
    parts = _user_parts(user_data)
    parts.append(_text_part(virtfleet_cloud_config(hostname=hostname, ssh_keys=ssh_keys,
                                                   fqdn=fqdn), "cloud-config"))
    parts.append(_text_part(READY_SCRIPT, "x-shellscript"))
    outer = MIMEMultipart(boundary=_boundary([_flatten(p) for p in parts]))
    for part in parts:
        outer.attach(part)
    return _flatten(outer)


# --------------------------------------------------------------------------- ready signal


def parse_ready_line(line: str) -> tuple[bool, str, dict[str, Any]]:
    """Read the ready part's console line: (ok, reason, result).

    ``result`` is the JSON the guest printed after READY_MARKER (cloud-init's result.json,
    ``{"v1": {"datasource": ..., "errors": [...]}}``), or {} if it is unreadable. ``ok`` is
    True when ``result["v1"]["errors"]`` is empty; otherwise ``reason`` is those errors joined
    (scrubbed, at most READY_REASON_LIMIT characters). Text after the JSON on the same line
    (another process writing to the console) is ignored. Raises ValueError if the line has no
    READY_MARKER.
    """
    at = line.find(READY_MARKER)
    if at < 0:
        raise ValueError("no ready marker in the line")
    rest = line[at + len(READY_MARKER):].strip()
    try:
        result, _ = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        return False, scrub(f"unreadable cloud-init result on the console: {rest[:80]!r}",
                            READY_REASON_LIMIT), {}
    v1 = result.get("v1") if isinstance(result, dict) else None
    if not isinstance(v1, dict):
        return False, "cloud-init result on the console has no v1 object", {}
    errors = v1.get("errors")
    if errors is None:
        errors = []
    if not isinstance(errors, list):
        errors = [errors]
    if not errors:
        return True, "", result
    reason = "; ".join(str(e) for e in errors)
    return False, scrub(reason, READY_REASON_LIMIT), result
