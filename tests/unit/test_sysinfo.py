"""Choosing kvm vs qemu (TCG) from CPU flags, /dev/kvm and the override."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.sysinfo import detect_virt_type, disk_free_bytes, host_arch

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae {extra} sse sse2 hypervisor
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae {extra} sse sse2 hypervisor
"""


@pytest.fixture
def kvm_dev(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.touch()
    return dev


def _cpuinfo(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    return path


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_kvm_when_flags_and_device(tmp_path: Path, kvm_dev: Path, flag: str) -> None:
    assert detect_virt_type(None, _cpuinfo(tmp_path, flag), kvm_dev) == "kvm"
    assert detect_virt_type("auto", _cpuinfo(tmp_path, flag), kvm_dev) == "kvm"


def test_qemu_without_flags_even_with_dev_kvm(tmp_path: Path, kvm_dev: Path) -> None:
    # The situation on these machines: /dev/kvm exists, the CPU lacks vmx/svm.
    assert detect_virt_type(None, _cpuinfo(tmp_path, "nx lm"), kvm_dev) == "qemu"


def test_qemu_without_dev_kvm(tmp_path: Path) -> None:
    assert detect_virt_type(None, _cpuinfo(tmp_path, "vmx"), tmp_path / "no-kvm") == "qemu"


def test_flag_must_be_a_whole_word(tmp_path: Path, kvm_dev: Path) -> None:
    assert detect_virt_type(None, _cpuinfo(tmp_path, "vmxfoo svmbar"), kvm_dev) == "qemu"


def test_flags_only_count_on_flags_lines(tmp_path: Path, kvm_dev: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("model name\t: vmx svm\nflags\t\t: fpu sse\n")
    assert detect_virt_type(None, path, kvm_dev) == "qemu"


def test_missing_cpuinfo_means_qemu(tmp_path: Path, kvm_dev: Path) -> None:
    assert detect_virt_type(None, tmp_path / "nope", kvm_dev) == "qemu"


@pytest.mark.parametrize("override", ["kvm", "qemu", "KVM", " qemu "])
def test_override_wins(tmp_path: Path, override: str) -> None:
    cpu = _cpuinfo(tmp_path, "")
    assert detect_virt_type(override, cpu, tmp_path / "no-kvm") == override.strip().lower()


@pytest.mark.parametrize("bad", ["xen", "hvf", "tcg", "1"])
def test_bad_override_names_the_setting(bad: str) -> None:
    with pytest.raises(ValueError, match="virt_type"):
        detect_virt_type(bad)


def test_host_arch_and_disk_free(tmp_path: Path) -> None:
    assert host_arch()
    assert disk_free_bytes(tmp_path / "not" / "yet" / "there") > 0
    assert disk_free_bytes(tmp_path / "missing") > 0
