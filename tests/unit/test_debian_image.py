"""The Debian image builder's pure parts: cache paths, the guest configuration, cleanup."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from demo import debian


def test_cache_dir_from_env_and_image_name_carries_the_recipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(debian.CACHE_ENV, str(tmp_path / "c"))
    assert debian.default_cache_dir() == tmp_path / "c"
    assert debian.image_path() == tmp_path / "c" / f"debian12-{debian.IMAGE_TAG}.qcow2"
    assert debian.image_path(tmp_path) == tmp_path / f"debian12-{debian.IMAGE_TAG}.qcow2"
    assert len(debian.IMAGE_TAG) == 12


def test_a_cached_image_is_returned_without_building(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = debian.image_path(tmp_path)
    cached.write_bytes(b"qcow2")

    def no_build(*_: object) -> None:
        raise AssertionError("must not build")

    monkeypatch.setattr(debian, "_build", no_build)
    assert debian.ensure_debian_image(tmp_path) == cached


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("etc/ssh", "etc/systemd/system/timers.target.wants", "var/lib/dbus",
              "usr/share/doc/pkg", "usr/share/man/man1", "var/cache/apt/archives"):
        (root / d).mkdir(parents=True)
    (root / "etc/ssh/ssh_host_rsa_key").write_text("secret")
    (root / "etc/ssh/sshd_config").write_text("# keep")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("x")
    (root / "etc/resolv.conf").write_text("nameserver 10.255.255.53\n")
    (root / "etc/systemd/system/timers.target.wants/apt-daily.timer").symlink_to(
        "/lib/systemd/system/apt-daily.timer")
    (root / "usr/share/doc/pkg/copyright").write_text("c")
    (root / "usr/share/doc/pkg/changelog.gz").write_text("x")
    (root / "usr/share/man/man1/ls.1.gz").write_text("x")
    (root / "var/cache/apt/archives/a.deb").write_text("x")
    return root


def test_configure_rootfs(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    outside = tmp_path / "host-hostname"
    outside.write_text("build-host\n")
    (root / "etc/hostname").symlink_to(outside)  # an absolute link must not be followed

    debian.configure_rootfs(root, debian.ROOT_UUID)

    etc = root / "etc"
    assert outside.read_text() == "build-host\n"
    assert (etc / "hostname").read_text() == "debian\n"
    cfg = (etc / "cloud/cloud.cfg.d/90_virtfleet.cfg").read_text()
    assert "datasource_list: [ NoCloud, None ]" in cfg
    assert (etc / "fstab").read_text().startswith(f"UUID={debian.ROOT_UUID} / ext4 ")
    assert (etc / "machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert (etc / "resolv.conf").read_text() == ""
    assert not list((etc / "ssh").glob("ssh_host_*"))
    assert (etc / "ssh/sshd_config").exists()
    assert "MODULES=list" in (etc / "initramfs-tools/conf.d/virtfleet").read_text()
    assert "sr_mod" in (etc / "initramfs-tools/modules").read_text().split()
    for unit in debian.MASKED_UNITS:
        assert os.readlink(etc / "systemd/system" / unit) == "/dev/null"
    assert not (etc / "systemd/system/timers.target.wants/apt-daily.timer").is_symlink()
    debian.configure_rootfs(root, debian.ROOT_UUID)  # idempotent


def test_slim_rootfs_keeps_copyright_files(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    debian.slim_rootfs(root)
    assert (root / "usr/share/doc/pkg/copyright").exists()
    assert not (root / "usr/share/doc/pkg/changelog.gz").exists()
    assert not (root / "usr/share/man/man1").exists()
    assert not (root / "var/cache/apt/archives/a.deb").exists()


def test_copy_sparse_skips_zero_blocks(tmp_path: Path) -> None:
    block = 1024**2
    src = tmp_path / "src"
    src.write_bytes(b"a" * 10 + bytes(block * 2) + b"b" * 5)
    out = io.BytesIO(bytes(block * 4))
    debian._copy_sparse(src, out, 100)
    data = out.getvalue()
    assert data[100:110] == b"a" * 10
    assert data[100 + 10 + 2 * block:100 + 15 + 2 * block] == b"b" * 5
    assert data[:100] == bytes(100)


def test_remove_tree_refuses_a_folder_with_a_mount_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    (work / "root/proc").mkdir(parents=True)
    monkeypatch.setattr(debian, "_mounts_under", lambda path: [str(path / "root/proc")])
    monkeypatch.setattr(debian, "_run", lambda *a, **k: None)  # umount "fails" silently
    with pytest.raises(debian.DebianImageError, match="still mounted"):
        debian._remove_tree(work)
    assert work.exists()
    monkeypatch.setattr(debian, "_mounts_under", lambda path: [])
    debian._remove_tree(work)
    assert not work.exists()
