"""fleet.userdata: what a tenant may send, the seed's MIME multipart, the ready line."""

from __future__ import annotations

import base64
import email
import email.message
import json

import pytest
import yaml

from fleet import userdata
from fleet.contract import READY_MARKER
from fleet.exceptions import BadRequest
from fleet.userdata import MAX_BYTES, compose, parse_ready_line, validate

KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0 alice@laptop", "ssh-rsa AAAAB3Nza bob@desk"]

USER_MULTIPART = (
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="XBOUNDX"\n'
    "\n"
    "preamble, ignored\n"
    "--XBOUNDX\n"
    'Content-Type: text/cloud-config; charset="us-ascii"\n'
    'Content-Disposition: attachment; filename="mine.yaml"\n'
    "\n"
    "#cloud-config\n"
    "runcmd: [[echo, from-part]]\n"
    "--XBOUNDX\n"
    "Content-Type: text/x-shellscript\n"
    'Content-Disposition: attachment; filename="r\u00e9sum\u00e9.sh"\n'
    "X-Long: " + "a" * 120 + " b\n"
    "\n"
    "#!/bin/sh\n"
    "echo 'h\u00e9llo'\n"
    "\n"
    "--XBOUNDX--\n"
)


def _parts(text: str) -> list[email.message.Message]:
    msg = email.message_from_string(text)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg["MIME-Version"] == "1.0"
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return parts


def _text(part: email.message.Message) -> str:
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data.decode(part.get_content_charset() or "utf-8")


def _bad(text: str) -> str:
    with pytest.raises(BadRequest) as info:
        validate(text)
    assert info.value.http_status == 400
    return str(info.value)


def _ours_ok(parts: list[email.message.Message], n_user: int) -> dict:
    """virtfleet's two parts come after the tenant's n_user parts; return our cloud-config."""
    assert len(parts) == n_user + 2
    cfg_part, ready_part = parts[n_user], parts[n_user + 1]
    assert cfg_part.get_content_type() == "text/cloud-config"
    assert ready_part.get_content_type() == "text/x-shellscript"
    for part in (cfg_part, ready_part):
        assert part["Content-Transfer-Encoding"] == "7bit"  # readable as is by busybox
    assert _text(ready_part) == userdata.READY_SCRIPT
    text = _text(cfg_part)
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("", "empty"),
        ("  \n\n", "empty"),
        ("#cloud-config\n", "cloud-config"),
        ("#cloud-config\nruncmd: [[ls]]\n", "cloud-config"),
        ("#Cloud-Config  \r\npackages: [htop]\r\n", "cloud-config"),
        ("#!/bin/sh\necho hi\n", "script"),
        ("#!/usr/bin/env python3\nprint(1)\n", "script"),
        (USER_MULTIPART, "multipart"),
        ("Content-Type: multipart/mixed; boundary=b\n\n--b\n\nhi\n--b--\n", "multipart"),
    ],
)
def test_validate_kinds(text: str, kind: str) -> None:
    assert validate(text) == kind


def test_bad_yaml_points_at_line_and_column() -> None:
    text = "#cloud-config\nruncmd:\n  - ls\n  bad: value: here\n"
    message = _bad(text)
    assert message == ("user_data: #cloud-config line 4, column 3: "
                       "expected <block end>, but found '?'")


def test_bad_yaml_example_from_the_issue() -> None:
    message = _bad("#cloud-config\nusers:\n  a: b: c\n")
    assert message == ("user_data: #cloud-config line 3, column 7: "
                       "mapping values are not allowed here")


def test_yaml_constructor_error_is_a_400() -> None:
    assert "month must be in 1..12" in _bad("#cloud-config\nwhen: 2024-13-01\n")


@pytest.mark.parametrize("body", ["- a\n- b\n", "just a string\n", "42\n"])
def test_cloud_config_must_be_a_mapping(body: str) -> None:
    message = _bad("#cloud-config\n" + body)
    assert "must be a mapping" in message


def test_size_limit_is_64_kib_of_utf8() -> None:
    head = "#!/bin/sh\n# "
    at_limit = head + "x" * (MAX_BYTES - len(head))
    assert len(at_limit.encode()) == MAX_BYTES
    assert validate(at_limit) == "script"
    message = _bad(at_limit + "x")
    assert "65537 bytes" in message and "65536" in message
    # Counted in bytes, not characters: 2-byte characters reach the limit at half the length.
    wide = head + "\u00e9" * ((MAX_BYTES - len(head)) // 2 + 1)
    assert len(wide) < MAX_BYTES and "bytes" in _bad(wide)


def test_unknown_kind_lists_the_accepted_kinds_with_a_short_excerpt() -> None:
    secret = "password=hunter2-" + "s" * 500
    message = _bad(f"just some text {secret}\nmore\n")
    for kind in ("#cloud-config", "#!", "MIME"):
        assert kind in message
    assert "hunter2" in message  # the excerpt is the start of line 1 ...
    assert "s" * 100 not in message and len(message) < 400  # ... and only a short one


@pytest.mark.parametrize(
    "text",
    ["#cloud-config-archive\n- content: x\n", "#include\nhttp://x\n", " #!/bin/sh\necho\n",
     "## template: jinja\n#cloud-config\n", "#cloud-boothook\necho\n"],
)
def test_other_cloud_init_kinds_are_refused(text: str) -> None:
    assert "user_data must be" in _bad(text)


def test_not_utf8_encodable_is_refused() -> None:
    assert "UTF-8" in _bad("#!/bin/sh\necho \ud800\n")


def test_multipart_with_a_broken_cloud_config_part_names_the_part() -> None:
    text = USER_MULTIPART.replace("runcmd: [[echo, from-part]]\n", "a: b: c\n")
    message = _bad(text)
    assert message.startswith("user_data: part 1 (text/cloud-config, 'mine.yaml') "
                               "#cloud-config line 2, column 5: mapping values")


def test_multipart_cloud_config_part_found_by_its_first_line_and_base64() -> None:
    encoded = base64.b64encode(b"#cloud-config\n- not\n- a mapping\n").decode()
    text = ("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=zz\n\n"
            "--zz\nContent-Type: text/x-shellscript\n\n#!/bin/sh\n"
            f"--zz\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n{encoded}\n"
            "--zz--\n")
    message = _bad(text)
    assert message.startswith("user_data: part 2 (text/plain) #cloud-config must be a mapping")


def test_multipart_without_its_boundary_is_refused() -> None:
    message = _bad("Content-Type: multipart/mixed; boundary=nope\n\n#!/bin/sh\necho\n")
    assert "MIME multipart" in message


# --------------------------------------------------------------------------- compose


@pytest.mark.parametrize(
    ("user", "ctype"),
    [
        ("#cloud-config\nruncmd: [[echo, hi]]\n", "text/cloud-config"),
        ("#!/bin/sh\necho hi\r\nexit 3", "text/x-shellscript"),
        ("#!/bin/sh\necho 'h\u00e9llo \u2192 w\u00f6rld'\n", "text/x-shellscript"),
    ],
)
def test_compose_single_document_becomes_one_part_unchanged(user: str, ctype: str) -> None:
    out = compose(user, hostname="vm-1", ssh_keys=KEYS, fqdn="vm-1.lab.example")
    parts = _parts(out)
    assert parts[0].get_content_type() == ctype
    assert _text(parts[0]).encode() == user.encode()  # byte-identical after transfer decoding
    expected_cte = "7bit" if user.isascii() else "base64"
    assert parts[0]["Content-Transfer-Encoding"] == expected_cte
    ours = _ours_ok(parts, 1)
    assert ours["hostname"] == "vm-1" and ours["fqdn"] == "vm-1.lab.example"
    assert ours["ssh_authorized_keys"] == KEYS
    assert ours["merge_how"] == userdata.MERGE_HOW
    assert "users" not in ours


def test_compose_empty_user_data_has_only_our_parts() -> None:
    out = compose("", hostname="vm-2", ssh_keys=[])
    ours = _ours_ok(_parts(out), 0)
    assert ours == {"merge_how": userdata.MERGE_HOW, "hostname": "vm-2"}


def test_compose_carries_a_multipart_parts_verbatim() -> None:
    out = compose(USER_MULTIPART, hostname="vm-3", ssh_keys=KEYS[:1])
    parts = _parts(out)
    originals = _parts(USER_MULTIPART)
    assert len(originals) == 2
    for mine, original in zip(parts, originals, strict=False):
        assert mine.items() == original.items()  # headers unchanged (no re-folding, no RFC 2047)
        assert mine.get_payload() == original.get_payload()
        assert mine.get_payload(decode=True) == original.get_payload(decode=True)
    # Each carried part appears in the output exactly as it stood in the input.
    for chunk in USER_MULTIPART.split("--XBOUNDX")[1:3]:
        assert chunk.strip("\n") in out
    assert _ours_ok(parts, 2)["ssh_authorized_keys"] == KEYS[:1]


def test_compose_keeps_crlf_bodies_of_a_multipart() -> None:
    crlf = USER_MULTIPART.replace("\n", "\r\n")
    parts = _parts(compose(crlf, hostname="vm-3", ssh_keys=[]))
    assert parts[1].get_payload() == "#!/bin/sh\r\necho 'h\u00e9llo'\r\n"


def test_compose_is_deterministic_and_boundary_is_not_in_content() -> None:
    a = compose("#!/bin/sh\necho hi\n", hostname="vm-4", ssh_keys=KEYS)
    b = compose("#!/bin/sh\necho hi\n", hostname="vm-4", ssh_keys=KEYS)
    assert a == b
    boundary = email.message_from_string(a).get_boundary()
    assert boundary and a.count(boundary) == 1 + 4  # header + 3 delimiters + close
    c = compose("#!/bin/sh\necho hi\n", hostname="vm-5", ssh_keys=KEYS)
    assert email.message_from_string(c).get_boundary() != boundary


def test_compose_non_ascii_key_comment_stays_ascii_in_our_part() -> None:
    key = "ssh-ed25519 AAAA jos\u00e9@laptop"
    parts = _parts(compose("", hostname="vm-6", ssh_keys=[key]))
    assert _ours_ok(parts, 0)["ssh_authorized_keys"] == [key]


def test_compose_refuses_what_validate_refuses() -> None:
    with pytest.raises(BadRequest):
        compose("#cloud-config\n[1, 2]\n", hostname="vm-7", ssh_keys=[])


def test_ready_script_prints_the_contract_marker() -> None:
    script = userdata.READY_SCRIPT
    assert script.startswith("#!/bin/sh\n") and script.isascii()
    assert f"'{READY_MARKER}{userdata.NO_CLOUD_INIT_RESULT}'" in script
    # waits for the file cloud-init writes when its final stage ends (what `cloud-init status
    # --wait` waits for, without starting Python), then prints it
    assert "while [ ! -e /run/cloud-init/result.json ]" in script
    assert "</run/cloud-init/result.json" in script
    assert "systemd-run --no-block" in script and "setsid" in script
    assert json.loads(userdata.NO_CLOUD_INIT_RESULT) == {"v1": {"datasource": None,
                                                                "errors": []}}


# --------------------------------------------------------------------------- ready line


def test_parse_ready_line_ok() -> None:
    result = {"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0]", "errors": []}}
    ok, reason, got = parse_ready_line(f"\r{READY_MARKER}{json.dumps(result)}\r")
    assert (ok, reason, got) == (True, "", result)


def test_parse_ready_line_demo_guest_and_prompt_before_marker() -> None:
    ok, reason, got = parse_ready_line(
        f"debian login: {READY_MARKER}{userdata.NO_CLOUD_INIT_RESULT}[  5.1] kernel noise")
    assert ok and reason == "" and got["v1"]["datasource"] is None


def test_parse_ready_line_with_errors() -> None:
    errors = ["('scripts_user', RuntimeError('Runparts: 1 failures in /var/lib/cloud/x'))",
              "second"]
    line = READY_MARKER + json.dumps({"v1": {"datasource": "x", "errors": errors}})
    ok, reason, got = parse_ready_line(line)
    assert not ok
    assert reason == ("('scripts_user', RuntimeError('Runparts: 1 failures in <path>')); "
                      "second")
    assert got["v1"]["errors"] == errors


def test_parse_ready_line_reason_is_capped() -> None:
    line = READY_MARKER + json.dumps({"v1": {"errors": ["e" * 5000, "f"]}})
    ok, reason, _ = parse_ready_line(line)
    assert not ok and len(reason) == userdata.READY_REASON_LIMIT


@pytest.mark.parametrize("rest", ['{"v1": {"errors": [', "not json", '["v1"]', '{"v2": {}}'])
def test_parse_ready_line_garbage(rest: str) -> None:
    ok, reason, got = parse_ready_line(READY_MARKER + rest)
    assert not ok and reason and got == {}


def test_parse_ready_line_needs_the_marker() -> None:
    with pytest.raises(ValueError):
        parse_ready_line("virtfleet-demo: ready")
