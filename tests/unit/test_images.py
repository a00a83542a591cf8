"""qemu-img wrapper against the real qemu-img: overlays, info, growth, never shrink."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from fleet.proc import ProcError, run
from worker import images

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MIB = 1024 * 1024


def make_base(path: Path, size: int = 16 * MIB, fmt: str = "qcow2") -> Path:
    run(["qemu-img", "create", "-f", fmt, str(path), str(size)], timeout=30)
    return path


def test_info_and_virtual_size(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.qcow2")
    data = images.info(base, "qcow2")
    assert data["format"] == "qcow2"
    assert data["virtual-size"] == 16 * MIB
    assert images.virtual_size(base, "qcow2") == 16 * MIB


def test_overlay_backed_and_grown(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.qcow2")
    overlay = tmp_path / "disk.qcow2"
    images.create_overlay(base, overlay, 64 * MIB)
    data = images.info(overlay, "qcow2")
    assert data["format"] == "qcow2"
    assert data["backing-filename"] == str(base.absolute())
    assert data["backing-filename-format"] == "qcow2"
    assert data["virtual-size"] == 64 * MIB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "disk.qcow2"]


@pytest.mark.parametrize("requested", [None, 1 * MIB, 16 * MIB - 512])
def test_overlay_never_smaller_than_base(tmp_path: Path, requested: int | None) -> None:
    base = make_base(tmp_path / "base.qcow2")
    overlay = tmp_path / "disk.qcow2"
    images.create_overlay(base, overlay, requested)
    assert images.virtual_size(overlay, "qcow2") == 16 * MIB


def test_overlay_size_rounded_up_to_sector(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.qcow2")
    overlay = tmp_path / "disk.qcow2"
    images.create_overlay(base, overlay, 32 * MIB + 1)
    assert images.virtual_size(overlay, "qcow2") == 32 * MIB + 512


def test_overlay_refuses_to_overwrite(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.qcow2")
    overlay = tmp_path / "disk.qcow2"
    overlay.write_bytes(b"guest data")
    with pytest.raises(FileExistsError):
        images.create_overlay(base, overlay, None)
    assert overlay.read_bytes() == b"guest data"


def test_overlay_of_raw_base(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.raw", fmt="raw")
    overlay = tmp_path / "disk.qcow2"
    images.create_overlay(base, overlay, 20 * MIB, base_fmt="raw")
    data = images.info(overlay, "qcow2")
    assert data["backing-filename-format"] == "raw"
    assert data["virtual-size"] == 20 * MIB


def test_resize_grows_and_refuses_to_shrink(tmp_path: Path) -> None:
    disk = make_base(tmp_path / "disk.qcow2")
    images.resize(disk, "qcow2", 48 * MIB)
    assert images.virtual_size(disk, "qcow2") == 48 * MIB
    images.resize(disk, "qcow2", 48 * MIB)  # same size: no-op
    with pytest.raises(ValueError, match="shrink"):
        images.resize(disk, "qcow2", 16 * MIB)
    assert images.virtual_size(disk, "qcow2") == 48 * MIB


def test_convert(tmp_path: Path) -> None:
    src = make_base(tmp_path / "src.raw", 8 * MIB, fmt="raw")
    dst = tmp_path / "dst.qcow2"
    images.convert(src, "raw", dst)
    data = images.info(dst, "qcow2")
    assert data["format"] == "qcow2" and data["virtual-size"] == 8 * MIB


def test_wrong_format_is_an_error_not_a_probe(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base.qcow2")
    assert images.info(base, "raw")["format"] == "raw"  # read as named, never probed
    with pytest.raises(ValueError):
        images.info(base, "iso")


def test_missing_image_raises_proc_error(tmp_path: Path) -> None:
    with pytest.raises(ProcError) as excinfo:
        images.info(tmp_path / "missing.qcow2", "qcow2")
    err = excinfo.value
    assert err.cmd == "qemu-img" and err.returncode != 0
    assert "missing.qcow2" in err.stderr
    assert str(err).startswith("qemu-img failed with exit code")
    assert "--output=json" not in str(err) and "--output=json" in err.argv


def test_overlays_with_the_base_size_known_are_copies_of_a_template(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_base(tmp_path / "base.qcow2")
    asked = tmp_path / "asked.qcow2"
    images.create_overlay(base, asked, 8 * MIB)  # qemu-img create, as ever
    calls: list[list[str]] = []
    real_run = images.run

    def counting(argv: list[str], **kw: Any) -> Any:
        calls.append(list(argv))
        return real_run(argv, **kw)

    monkeypatch.setattr(images, "run", counting)
    disks = [tmp_path / f"vm{i}.qcow2" for i in range(3)]
    for disk in disks:
        images.create_overlay(base, disk, 8 * MIB, base_size=16 * MIB)
    # One qemu-img run, for the template (-u: the base left unopened, no info); then copies.
    assert len(calls) == 1 and calls[0][:2] == ["qemu-img", "create"] and "-u" in calls[0]
    template = images.overlay_template(base, "qcow2", 16 * MIB)
    assert images.overlay_templates(base) == [template]
    for disk in disks:
        assert disk.read_bytes() == asked.read_bytes()  # byte for byte what qemu-img makes
    data = images.info(disks[0], "qcow2")
    assert (data["backing-filename"], data["backing-filename-format"]) == \
        (str(base.absolute()), "qcow2")
    assert data["virtual-size"] == 16 * MIB
    run(["qemu-img", "check", "-f", "qcow2", str(disks[0])], timeout=30)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileExistsError):
        images.create_overlay(base, disks[0], 8 * MIB, base_size=16 * MIB)


def test_a_template_naming_another_base_is_made_again(tmp_path: Path) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_base = make_base(old_dir / "base.qcow2")
    images.create_overlay(old_base, old_dir / "vm.qcow2", MIB, base_size=16 * MIB)
    base = make_base(new_dir / "base.qcow2")
    # The cache moved: its template still names the base where it was.
    stale = images.overlay_template(old_base, "qcow2", 16 * MIB)
    stale.rename(images.overlay_template(base, "qcow2", 16 * MIB))
    disk = new_dir / "vm.qcow2"
    images.create_overlay(base, disk, MIB, base_size=16 * MIB)
    assert images.info(disk, "qcow2")["backing-filename"] == str(base.absolute())
    # A template of another size is another file.
    images.create_overlay(base, new_dir / "big.qcow2", 32 * MIB, base_size=16 * MIB)
    assert images.virtual_size(new_dir / "big.qcow2", "qcow2") == 32 * MIB
    assert len(images.overlay_templates(base)) == 2
