"""NoCloud seed ISO: label, names and contents read back with pycdlib."""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib
import pytest
import yaml

from worker.seed import build_seed_iso, read_seed_iso, start_seed_iso

USER_DATA = "#cloud-config\nhostname: web1\nfinal_message: done\n"
NETWORK = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"


def _open(path: Path) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    return iso


def test_seed_layout_and_contents(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    out = build_seed_iso(
        dest, instance_id="i-123", hostname="web1", user_data=USER_DATA, network_config=NETWORK
    )
    assert out == dest and dest.is_file()
    iso = _open(dest)
    try:
        assert iso.pvd.volume_identifier.decode().rstrip() == "cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        rr = sorted(
            c.rock_ridge.name().decode()
            for c in iso.list_children(rr_path="/")
            if not (c.is_dot() or c.is_dotdot())
        )
        assert rr == ["meta-data", "network-config", "user-data"]
        joliet = sorted(
            c.file_identifier().decode("utf-16_be")
            for c in iso.list_children(joliet_path="/")
            if not (c.is_dot() or c.is_dotdot())
        )
        assert joliet == ["meta-data", "network-config", "user-data"]
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, joliet_path="/user-data")
        assert buf.getvalue() == USER_DATA.encode()
    finally:
        iso.close()

    files = read_seed_iso(dest)
    assert files["user-data"] == USER_DATA.encode()
    assert files["network-config"] == NETWORK.encode()
    meta = yaml.safe_load(files["meta-data"])
    assert meta == {"instance-id": "i-123", "local-hostname": "web1"}
    assert "vendor-data" not in files
    assert list(tmp_path.iterdir()) == [dest]  # no temp file left behind


def test_vendor_data_only_when_given(tmp_path: Path) -> None:
    dest = build_seed_iso(
        tmp_path / "seed.iso",
        instance_id="i-1",
        hostname="h",
        user_data="#cloud-config\n",
        vendor_data="#cloud-config\npackages: [htop]\n",
    )
    files = read_seed_iso(dest)
    assert set(files) == {"meta-data", "user-data", "network-config", "vendor-data"}
    assert files["vendor-data"] == b"#cloud-config\npackages: [htop]\n"
    assert files["network-config"] == b""


@pytest.mark.parametrize(
    "user_data",
    [
        "#cloud-config\nwrite_files:\n- content: \"h\u00e9llo \u2603 \u65e5\u672c\"\n",
        bytes(range(256)) * 3,
        b"\x1f\x8b\x08\x00gzip-ish\x00\xff",
    ],
)
def test_user_data_byte_exact(tmp_path: Path, user_data: str | bytes) -> None:
    dest = build_seed_iso(tmp_path / "s.iso", instance_id="i", hostname="h", user_data=user_data)
    expected = user_data.encode("utf-8") if isinstance(user_data, str) else user_data
    assert read_seed_iso(dest)["user-data"] == expected


def test_rebuild_replaces_atomically(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    build_seed_iso(dest, instance_id="i-1", hostname="old", user_data="a")
    build_seed_iso(dest, instance_id="i-1", hostname="new", user_data="b")
    files = read_seed_iso(dest)
    assert yaml.safe_load(files["meta-data"])["local-hostname"] == "new"
    assert files["user-data"] == b"b"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_instance_id_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_seed_iso(tmp_path / "s.iso", instance_id="", hostname="h", user_data="")
    assert not any(tmp_path.iterdir())


def test_a_seed_written_on_its_own_thread(tmp_path: Path) -> None:
    seeding = start_seed_iso(tmp_path / "seed.iso", instance_id="i-9", hostname="bg",
                             user_data=USER_DATA, network_config=NETWORK)
    assert seeding.wait() == tmp_path / "seed.iso"
    files = read_seed_iso(tmp_path / "seed.iso")
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "i-9", "local-hostname": "bg"}
    assert (files["user-data"], files["network-config"]) == (USER_DATA.encode(),
                                                             NETWORK.encode())
    with pytest.raises(ValueError):  # refused at once, nothing started
        start_seed_iso(tmp_path / "s.iso", instance_id="", hostname="h", user_data="")


def test_a_failed_background_seed_raises_in_wait_and_settle_never_raises(
        tmp_path: Path) -> None:
    seeding = start_seed_iso(tmp_path / "missing-dir" / "seed.iso", instance_id="i",
                             hostname="h", user_data="")
    seeding.settle()  # the caller giving up: waits, does not raise
    with pytest.raises(FileNotFoundError):
        seeding.wait()
    assert list(tmp_path.iterdir()) == []
