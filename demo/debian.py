"""Builder of a real Debian 12 (bookworm) cloud image with cloud-init, cached between runs.

This module owns the recipe of virtfleet's Debian test guest and its cache: ``debootstrap`` of
Debian's own packages (the cloud kernel, cloud-init, the QEMU guest agent, ifupdown + dhclient,
OpenSSH, sudo) into a temporary folder, the guest's configuration (cloud-init's NoCloud-only
datasource list, an initramfs that finds the virtio disk and the virtio-scsi seed cdrom, units
masked so it boots fast under TCG), and the bootable disk: an MBR disk whose first partition is
FAT with SYSLINUX, the kernel and the initrd (as :mod:`demo.image` builds it) and whose second is
the ext4 root, made with ``mkfs.ext4 -d`` from the folder.  Nothing is mounted and no loop
device is used; the guest boots from its own disk (SeaBIOS -> MBR -> SYSLINUX -> kernel, root
``UUID=...`` on ``/dev/vda2``, ``console=ttyS0``, ``net.ifnames=0`` so the NIC is ``eth0`` as
virtfleet's network-config names it).  The guest's own ``/boot`` is not what boots: a kernel
upgraded inside a guest does not reach the FAT partition.  Packages come from the suite's point
release (debootstrap takes one suite); the guest's apt sources also list updates and security.

The finished qcow2 lives in a cache directory outside the repository
(``$VIRTFLEET_DEBIAN_CACHE``, else ``/var/cache/virtfleet/debian12`` for root, else
``~/.cache/virtfleet/debian12``), named by a hash of the recipe (:data:`IMAGE_TAG`), so a changed
recipe builds a new image.  Builds take a lock, happen in a temporary directory next to the
image and end with an atomic rename; the temporary root filesystem is removed even on failure.
Downloaded ``.deb`` files stay in the cache's ``debs/`` folder for the next build.

Must not: mount block devices, use loop devices, install anything on the host, or touch the
image once it is in the cache (guests boot from overlays on it).  Building needs root
(debootstrap and ``chroot``); finding a cached image does not.

Usage: ``virtfleet demo debian-image [--cache-dir DIR]`` or ``python -m demo.debian``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from demo.image import PARTITION_START, SECTOR, SYSLINUX_MBR, DemoImageError, _mtools_env
from fleet.proc import ProcError, run
from worker import images

__all__ = [
    "CACHE_ENV",
    "DebianImageError",
    "IMAGE_TAG",
    "PACKAGES",
    "default_cache_dir",
    "ensure_debian_image",
    "image_path",
    "main",
]

log = logging.getLogger(__name__)

CACHE_ENV = "VIRTFLEET_DEBIAN_CACHE"
"""Environment variable naming the cache directory (overrides the default)."""

MIRROR_ENV = "VIRTFLEET_DEBIAN_MIRROR"
"""Environment variable naming the Debian mirror debootstrap uses (not part of the recipe)."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"
"""The mirror this machine's apt uses too."""

SUITE = "bookworm"
"""Debian 12."""

PACKAGES: tuple[str, ...] = (
    "linux-image-cloud-amd64",
    "cloud-init",
    "python3-cffi-backend",  # cloud-init's crypto imports need it; debootstrap skips Recommends
    "cloud-guest-utils",  # growpart: cloud-init grows the root partition into a larger overlay
    "qemu-guest-agent",
    "ifupdown",  # cloud-init 22.4 on Debian renders network-config to /etc/network/interfaces
    "isc-dhcp-client",
    "openssh-server",
    "sudo",
    "systemd-sysv",
    "udev",
    "iproute2",
    "netbase",
    "ca-certificates",
    "e2fsprogs",
    "zstd",  # initramfs-tools compresses with zstd when it is there
)
"""Packages debootstrap installs on top of the ``minbase`` variant (with their Depends)."""

INITRAMFS_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",  # the root disk (vda)
    "virtio_scsi",
    "sd_mod",
    "sr_mod",  # the cidata seed cdrom (/dev/sr0) exists before cloud-init-local looks for it
    "isofs",
    "ext4",
)
"""Modules the initramfs loads (``MODULES=list``: the build host's hardware is irrelevant)."""

MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily.service",
    "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service",
    "man-db.timer",
    "man-db.service",
    "e2scrub_all.timer",
    "e2scrub_all.service",
    "e2scrub_reap.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-pstore.service",
    "getty-static.service",  # five gettys on tty2-6 when dbus/logind are absent (they are)
)
"""Units masked in the guest (periodic jobs a short-lived test guest never needs)."""

DISK_SIZE = 2 * 1024**3
"""Virtual size of the image (cloud-init's growpart grows the root into a larger overlay)."""

BOOT_START = PARTITION_START
BOOT_SIZE = 63 * 1024**2
ROOT_START = BOOT_START + BOOT_SIZE  # 64 MiB
ROOT_SIZE = DISK_SIZE - ROOT_START
ROOT_LABEL = "vf-root"

COMPRESS = True
"""Write the cached qcow2 compressed (a third of the size to upload; reads stay cheap)."""

CLOUD_CFG = """\
# virtfleet: the seed is a NoCloud cdrom (label cidata); nothing else is probed.
datasource_list: [ NoCloud, None ]
# No locales package in the image: C.UTF-8 (already in /etc/default/locale) needs no locale-gen.
locale: C.UTF-8
grub_dpkg:
  enabled: false
# RSA key generation takes long under TCG.
ssh_genkeytypes: [ed25519, ecdsa]
"""

INITRAMFS_CONF = """\
# virtfleet: the modules listed in /etc/initramfs-tools/modules, not the build host's.
MODULES=list
COMPRESS=zstd
"""

FSTAB_TEMPLATE = "UUID={uuid} / ext4 rw,discard,errors=remount-ro 0 0\n"

SOURCES_LIST = f"""\
deb {DEFAULT_MIRROR} {SUITE} main
deb {DEFAULT_MIRROR} {SUITE}-updates main
deb http://deb.debian.org/debian-security {SUITE}-security main
"""

HOSTS = """\
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""

KERNEL_ARGS = "rw console=ttyS0,115200 net.ifnames=0"
"""Kernel command line after ``root=UUID=...`` (systemd and cloud-init write to ttyS0)."""

SYSLINUX_TEMPLATE = """\
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 1
TOTALTIMEOUT 10
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=UUID={uuid} {args}
"""

BUILDER_REVISION = "1"
"""Bump when the build steps change in a way the texts above do not show."""

IMAGE_TAG = hashlib.sha256(
    "\0".join(
        (
            BUILDER_REVISION,
            SUITE,
            " ".join(PACKAGES),
            " ".join(INITRAMFS_MODULES),
            " ".join(MASKED_UNITS),
            CLOUD_CFG,
            INITRAMFS_CONF,
            FSTAB_TEMPLATE,
            SOURCES_LIST,
            HOSTS,
            KERNEL_ARGS,
            SYSLINUX_TEMPLATE,
            f"{DISK_SIZE} {BOOT_SIZE} {COMPRESS}",
        )
    ).encode()
).hexdigest()[:12]
"""Short hash of the recipe: the cached image's name carries it."""

ROOT_UUID = str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://virtfleet.dev/debian12/{IMAGE_TAG}"))
"""The root filesystem's UUID (derived from the recipe, like the image's name)."""

DEBOOTSTRAP_TIMEOUT = 3600.0
"""Seconds allowed for debootstrap (downloads ~90 MiB, unpacks and configures ~230 packages)."""

STEP_TIMEOUT = 600.0
"""Seconds allowed for every other build step."""

_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}


class DebianImageError(DemoImageError):
    """Building the Debian image failed (not root, a tool missing, or a step failed)."""


def default_cache_dir() -> Path:
    """``$VIRTFLEET_DEBIAN_CACHE``, else ``/var/cache/virtfleet/debian12`` for root, else
    ``~/.cache/virtfleet/debian12``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/cache/virtfleet/debian12")
    return Path.home() / ".cache" / "virtfleet" / "debian12"


def image_path(cache_dir: Path | None = None) -> Path:
    """Where the image of this recipe lives in ``cache_dir`` (its name carries IMAGE_TAG)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"debian12-{IMAGE_TAG}.qcow2"


def ensure_debian_image(cache_dir: Path | None = None, *, mirror: str | None = None) -> Path:
    """Return the cached qcow2 of this recipe, building it first when it is missing.

    ``mirror`` defaults to ``$VIRTFLEET_DEBIAN_MIRROR`` or :data:`DEFAULT_MIRROR`.  Concurrent
    callers wait on one lock, so one image is built once.  Raises :class:`DebianImageError`.
    """
    dest = image_path(cache_dir)
    if dest.is_file():
        return dest
    cache = dest.parent
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o755)  # libvirt's qemu user reads the image as a backing file
    with _locked(cache / ".build.lock"):
        if dest.is_file():
            return dest
        _build(dest, mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR)
    return dest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(args: Sequence[str | os.PathLike[str]], *, timeout: float = STEP_TIMEOUT,
         input: bytes | None = None, env: Mapping[str, str] | None = None) -> None:
    argv = [os.fspath(a) for a in args]
    try:
        run(argv, timeout=timeout, input=input, env=env)
    except ProcError as exc:
        raise DebianImageError(f"{exc} ({' '.join(argv)})") from None


def _tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the sbin folders on PATH (mkfs, sfdisk, debootstrap)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join((env.get("PATH", os.defpath), "/usr/sbin", "/sbin"))
    env.update(extra or {})
    return env


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise DebianImageError("building the Debian image needs root (debootstrap, chroot)")
    path = _tool_env()["PATH"]
    missing = [t for t in ("debootstrap", "mkfs.ext4", "mkfs.vfat", "syslinux", "mcopy",
                           "sfdisk", "qemu-img")
               if shutil.which(t, path=path) is None]
    if missing:
        raise DebianImageError(
            f"missing tools: {', '.join(missing)} (apt-get install debootstrap e2fsprogs "
            "dosfstools syslinux syslinux-common mtools fdisk qemu-utils)")
    if not SYSLINUX_MBR.is_file():
        raise DebianImageError(f"{SYSLINUX_MBR} missing: apt-get install syslinux-common")


# --------------------------------------------------------------------------- the build


def _build(dest: Path, mirror: str) -> None:
    _require_tools()
    started = time.monotonic()
    debs = dest.parent / "debs"
    debs.mkdir(exist_ok=True)
    for stale in dest.parent.glob(".debian12-*.build-*"):  # killed builds (we hold the lock)
        log.info("removing the stale build folder %s", stale)
        _remove_tree(stale)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
    root = work / "root"
    try:
        log.info("debootstrap %s from %s into %s", SUITE, mirror, root)
        _run(["debootstrap", "--variant=minbase", "--arch=amd64", f"--cache-dir={debs}",
              f"--include={','.join(PACKAGES)}", SUITE, root, mirror],
             timeout=DEBOOTSTRAP_TIMEOUT, env=_tool_env({"DEBIAN_FRONTEND": "noninteractive",
                                                         "LC_ALL": "C"}))
        log.info("configuring the guest")
        configure_rootfs(root, ROOT_UUID)
        _run(["chroot", root, "update-initramfs", "-u", "-k", "all"], env=_CHROOT_ENV)
        kernel, initrd = _kernel_files(root)
        boot = work / "boot"
        boot.mkdir()
        shutil.copy2(kernel, boot / "vmlinuz")
        shutil.copy2(initrd, boot / "initrd.img")
        slim_rootfs(root)
        log.info("making the ext4 root and the FAT boot partition")
        ext4 = _root_filesystem(root, work / "root.ext4")
        _remove_tree(root)
        fat = _boot_filesystem(boot, work / "boot.fat")
        raw = _assemble(work / "disk.raw", fat, ext4)
        staged = work / "image.qcow2"
        log.info("converting to qcow2")
        images.convert(raw, "raw", staged, "qcow2", compress=COMPRESS)
        os.chmod(staged, 0o644)
        os.replace(staged, dest)
    finally:
        _remove_tree(work)
    log.info("built %s (%d MiB) in %.0f s", dest, dest.stat().st_size // 1024**2,
             time.monotonic() - started)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a guest file; a symlink there is replaced, never followed (it may be absolute,
    so it would point into the build host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)


def configure_rootfs(root: Path, root_uuid: str) -> None:
    """Write the guest's configuration into the debootstrapped folder ``root``.

    Plain file writes (no chroot): cloud-init's settings, fstab, apt sources, hosts, an empty
    machine-id (systemd and cloud-init treat the first boot as one), no SSH host keys (cloud-init
    makes them per instance), the initramfs module list, and the masked units.
    """
    etc = root / "etc"
    _write(etc / "cloud" / "cloud.cfg.d" / "90_virtfleet.cfg", CLOUD_CFG)
    _write(etc / "fstab", FSTAB_TEMPLATE.format(uuid=root_uuid))
    _write(etc / "apt" / "sources.list", SOURCES_LIST)
    _write(etc / "hosts", HOSTS)
    _write(etc / "hostname", "debian\n")
    _write(etc / "default" / "locale", "LANG=C.UTF-8\n")
    _write(etc / "machine-id", "", 0o444)
    (root / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
    _write(etc / "resolv.conf", "")  # debootstrap copied the build host's
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    _write(etc / "initramfs-tools" / "conf.d" / "virtfleet", INITRAMFS_CONF)
    _write(etc / "initramfs-tools" / "modules", "\n".join(INITRAMFS_MODULES) + "\n")
    units = etc / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        for wants in units.glob(f"*.wants/{unit}"):
            wants.unlink()
        target = units / unit
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to("/dev/null")


def slim_rootfs(root: Path) -> None:
    """Drop what a test guest never reads: downloaded .debs, apt lists, man pages, docs
    (copyright files stay), translations."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                    "var/lib/apt/lists/*_*", "var/log/*.log", "var/log/apt/*"):
        for path in root.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    share = root / "usr" / "share"
    for folder in ("man", "info", "locale"):
        for child in (share / folder).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for path in list((share / "doc").rglob("*")):
        if path.is_symlink() or (path.is_file() and path.name != "copyright"):
            path.unlink()


def _kernel_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise DebianImageError("debootstrap installed no kernel in /boot")
    kernel = kernels[-1]
    initrd = root / "boot" / f"initrd.img-{kernel.name.removeprefix('vmlinuz-')}"
    if not initrd.is_file():
        raise DebianImageError(f"no {initrd.name} next to {kernel.name}")
    return kernel, initrd


def _root_filesystem(root: Path, dest: Path) -> Path:
    """An ext4 image of ROOT_SIZE bytes populated from ``root`` (``mkfs.ext4 -d``, no mount)."""
    with dest.open("wb") as fh:
        fh.truncate(ROOT_SIZE)
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", ROOT_UUID, "-m", "1",
          "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", root, dest],
         env=_tool_env())
    return dest


def _boot_filesystem(boot: Path, dest: Path) -> Path:
    """A FAT image of BOOT_SIZE bytes with SYSLINUX, the kernel and the initrd (mtools)."""
    needed = sum(p.stat().st_size for p in boot.iterdir()) + 1024**2
    if needed > BOOT_SIZE * 0.9:
        raise DebianImageError(f"kernel + initrd ({needed} bytes) do not fit in {BOOT_SIZE}")
    with dest.open("wb") as fh:
        fh.truncate(BOOT_SIZE)
    env = _tool_env(_mtools_env())
    _run(["mkfs.vfat", "-F", "16", "-n", "VFBOOT", "-i", ROOT_UUID[:8],
          "-h", str(BOOT_START // SECTOR), dest], env=env)
    _run(["syslinux", "--install", dest], env=env)
    cfg = boot / "syslinux.cfg"
    cfg.write_text(SYSLINUX_TEMPLATE.format(uuid=ROOT_UUID, args=KERNEL_ARGS))
    for name in ("vmlinuz", "initrd.img", "syslinux.cfg"):
        _run(["mcopy", "-o", "-i", dest, boot / name, f"::{name}"], env=env)
    return dest


def _copy_sparse(src: Path, out: BinaryIO, offset: int) -> None:
    """Copy ``src`` into ``out`` at ``offset``, seeking over all-zero blocks."""
    block = 1024**2
    zero = bytes(block)
    with src.open("rb") as fh:
        pos = offset
        while chunk := fh.read(block):
            if chunk != zero[: len(chunk)]:
                out.seek(pos)
                out.write(chunk)
            pos += len(chunk)


def _assemble(dest: Path, fat: Path, ext4: Path) -> Path:
    """The raw disk: SYSLINUX's MBR code, partition 1 FAT (active), partition 2 ext4."""
    with dest.open("wb") as fh:
        fh.truncate(DISK_SIZE)
    table = (
        "label: dos\n"
        f"label-id: 0x{ROOT_UUID[:8]}\n"
        "unit: sectors\n\n"
        f"start={BOOT_START // SECTOR}, size={BOOT_SIZE // SECTOR}, type=e, bootable\n"
        f"start={ROOT_START // SECTOR}, size={ROOT_SIZE // SECTOR}, type=83\n"
    )
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "never", dest],
         input=table.encode(), env=_tool_env())
    mbr = SYSLINUX_MBR.read_bytes()
    if len(mbr) > 440:
        raise DebianImageError(f"{SYSLINUX_MBR} is larger than 440 bytes")
    with dest.open("r+b") as out:
        out.write(mbr)
        _copy_sparse(fat, out, BOOT_START)
        _copy_sparse(ext4, out, ROOT_START)
    fat.unlink()
    ext4.unlink()
    return dest


# --------------------------------------------------------------------------- cleanup


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first), from /proc/self/mountinfo."""
    prefix = os.fspath(path.resolve())
    found: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a build folder; first unmount what debootstrap may have left mounted in it
    (/proc, /sys of a failed run), and never descend into a mount that stayed."""
    if not path.exists():
        return
    for point in _mounts_under(path):
        with contextlib.suppress(DebianImageError):
            _run(["umount", "--lazy", point], timeout=60, env=_tool_env())
    left = _mounts_under(path)
    if left:
        raise DebianImageError(f"not removing {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path)


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.debian",
        description="Build (or find in the cache) the Debian 12 cloud image; print its path.")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache dir (default: ${CACHE_ENV}, else /var/cache/virtfleet/"
                             "debian12 for root, else ~/.cache/virtfleet/debian12)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        path = ensure_debian_image(args.cache_dir)
    except DebianImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
