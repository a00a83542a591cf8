"""Facts about this host that are read from the kernel, not from libvirt.

Owns: choosing the domain type (``kvm`` only when the CPU advertises vmx/svm *and*
``/dev/kvm`` exists — libvirt's capabilities list ``kvm`` even where guests hang), the
host architecture, and free disk space under a path.

Must not: talk to libvirt, run programs, or cache answers across calls.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

VIRT_TYPES = ("kvm", "qemu")
"""Domain types a host may use: hardware-assisted ``kvm`` or emulated ``qemu`` (TCG)."""

_PROBE = (None, "", "auto")
_HW_FLAGS = frozenset({"vmx", "svm"})


def cpu_has_virt_flags(cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """True when a ``flags`` line in ``cpuinfo_path`` lists ``vmx`` (Intel) or ``svm`` (AMD)."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags" and _HW_FLAGS.intersection(value.split()):
            return True
    return False


def detect_virt_type(
    override: str | None = None,
    cpuinfo_path: str | os.PathLike[str] = "/proc/cpuinfo",
    kvm_path: str | os.PathLike[str] = "/dev/kvm",
) -> str:
    """Return ``'kvm'`` or ``'qemu'`` for this host.

    ``override`` ``'kvm'``/``'qemu'`` wins; ``None``/``'auto'`` probes the CPU flags and
    ``kvm_path``. Any other value raises ``ValueError`` naming the ``virt_type`` setting.
    """
    choice = override.strip().lower() if isinstance(override, str) else override
    if choice in VIRT_TYPES:
        return choice
    if choice not in _PROBE:
        raise ValueError(
            f"virt_type must be one of 'auto', 'kvm', 'qemu' (got {override!r})"
        )
    if cpu_has_virt_flags(cpuinfo_path) and os.path.exists(kvm_path):
        return "kvm"
    return "qemu"


def host_arch() -> str:
    """Return this machine's architecture as libvirt names it (e.g. ``x86_64``)."""
    return platform.machine()


def disk_free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
