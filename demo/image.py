"""Builder of virtfleet's tiny demo guest disk image.

This module owns everything about the demo guest: fetching Debian's cloud kernel into a cache
directory (``apt-get download`` + ``dpkg-deb -x``, never installed into the host's /boot),
assembling a busybox initramfs (cpio newc, gzip, written in pure Python so no root-owned state
is needed), the guest's ``/init`` script, and the bootable disk itself: an MBR disk with one FAT
partition holding SYSLINUX, the kernel and the initramfs.  The disk is assembled without mounts or
loop devices (``mkfs.vfat`` / ``syslinux --install`` / ``mcopy`` on a separate FAT image file,
``sfdisk`` on the disk file, then the FAT image copied in at 1 MiB) and converted to qcow2.

The guest boots like a cloud image (SeaBIOS -> MBR -> SYSLINUX -> kernel), runs entirely from its
initramfs, reads a NoCloud seed (ISO 9660 volume labelled ``cidata``, e.g. on a virtio-scsi cdrom)
and reports on the serial console with lines starting ``virtfleet-demo:``:

    virtfleet-demo: instance-id=<id>
    virtfleet-demo: hostname=<name>
    virtfleet-demo: user-data exit=<code>          (when user-data is a #! script)
    virtfleet-demo: user-data multipart, <n> parts (a MIME multipart, e.g. virtfleet's
                                                   composed user-data; then per part, in order:)
    virtfleet-demo: user-data part <i> exit=<code> (a text/x-shellscript part, run)
    virtfleet-ready: {"v1": {...}}                 (printed by virtfleet's ready part when run)
    virtfleet-demo: skipping cloud-config part <i> (no cloud-init here to apply it)
    virtfleet-demo: skipping <type> part <i>       (any other part)
    virtfleet-demo: user-data skipped (<line 1>)   (any other user-data)
    virtfleet-demo: no cidata seed                 (no seed found)
    virtfleet-demo: ready
    virtfleet-demo: eth0 address=<ip>              (later, if DHCP answers)
    virtfleet-demo: power button, powering off     (ACPI power button -> clean power off)

A multipart's parts are split by a small awk program (MIME_AWK; base64 parts are decoded with
busybox base64). The guest has no cloud-init: virtfleet's ready part (see fleet.userdata), run
like any script part, prints the ``virtfleet-ready: {...}`` line itself, before ``ready``.

Usage: ``python -m demo.image --out PATH [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "DemoImageError",
    "IMAGE_TAG",
    "build_demo_image",
    "default_cache_dir",
    "default_image_path",
    "main",
]

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
KERNEL_CMDLINE = "console=ttyS0"

DISK_SIZE = 64 * 1024 * 1024
PARTITION_START = 1024 * 1024  # bytes; 2048 sectors of 512 bytes
SECTOR = 512

# Modules the guest loads (dependencies are added from modules.dep / the modules' modinfo).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "scsi_mod",
    "sd_mod",
    "sr_mod",
    "cdrom",
    "isofs",
    "ata_piix",  # IDE cdrom of QEMU's default "pc" machine (libvirt's cdrom bus there)
    "virtio_net",
    "virtio_console",
    "button",  # ACPI power button
    "evdev",  # so busybox acpid can read the power button's input events
)

_SHORT_TIMEOUT = 60
_DOWNLOAD_TIMEOUT = 900

SYSLINUX_CFG = f"""\
SERIAL 0 115200
DEFAULT virtfleet-demo
PROMPT 0
TIMEOUT 1
TOTALTIMEOUT 10
LABEL virtfleet-demo
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND {KERNEL_CMDLINE}
"""

INIT_SCRIPT = r"""#!/bin/sh
# virtfleet demo guest: PID 1.  The whole system runs from the initramfs.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME

/bin/busybox --install -s 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "virtfleet-demo: $*"; }

while read -r ko; do
    [ -n "$ko" ] && insmod "$ko" 2>/dev/null
done </etc/virtfleet/modules

# ACPI power button: busybox acpid runs /etc/acpi/PWRF/00000080.
acpid -c /etc/acpi -l /var/log/acpid.log 2>/dev/null

# Volume identifier of an ISO 9660 primary volume descriptor (sector 16, bytes 40..71).
iso_label() {
    [ "$(dd if="$1" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || return 1
    dd if="$1" bs=1 skip=32808 count=32 2>/dev/null | tr -d '\000 '
}

find_seed() {
    for dev in /dev/sr0 /dev/sr1 /dev/sr2 /dev/vd[a-z] /dev/sd[a-z] \
               /dev/vd[a-z][0-9] /dev/sd[a-z][0-9]; do
        [ -b "$dev" ] || continue
        label=$(iso_label "$dev") || continue
        case "$label" in cidata|CIDATA) ;; *) continue ;; esac
        if mount -t iso9660 -o ro "$dev" /mnt/seed 2>/dev/null; then
            SEED_DEV=$dev
            return 0
        fi
    done
    return 1
}

# Value of a top-level "key: value" line of meta-data (quotes and CRs dropped).
md() {
    sed -n "s/^$1[[:space:]]*:[[:space:]]*//p" /mnt/seed/meta-data 2>/dev/null \
        | head -n 1 | tr -d "\r\"'" | sed 's/[[:space:]]*$//'
}

run_script() {
    chmod 0700 "$1"
    (cd / && exec "$1" </dev/null)
}

# A MIME multipart user-data: each part in order, as cloud-init would type it.
run_multipart() {
    rm -rf /tmp/ud
    mkdir -p /tmp/ud
    if ! count=$(awk -v dir=/tmp/ud -f /etc/virtfleet/mime.awk "$1"); then
        say "user-data skipped (unreadable MIME multipart)"
        return
    fi
    say "user-data multipart, $count parts"
    for t in /tmp/ud/*.type; do
        [ -e "$t" ] || continue
        p=${t%.type}
        i=$(echo "${p##*/}" | sed 's/^0*//')
        ctype=$(cat "$t")
        cte=$(cat "$p.cte")
        case "$cte" in
            base64)
                if ! base64 -d "$p.body" >"$p.data" 2>/dev/null; then
                    say "skipping $ctype part $i (bad base64)"
                    continue
                fi
                ;;
            7bit|8bit|binary) cp "$p.body" "$p.data" ;;
            *) say "skipping $ctype part $i ($cte encoding)"; continue ;;
        esac
        case "$ctype" in
            text/plain|text/x-not-multipart)
                case "$(head -n 1 "$p.data" | tr -d '\r' | tr 'A-Z' 'a-z')" in
                    '#!'*) ctype=text/x-shellscript ;;
                    '#cloud-config'*) ctype=text/cloud-config ;;
                esac
                ;;
        esac
        case "$ctype" in
            text/x-shellscript)
                run_script "$p.data"
                say "user-data part $i exit=$?"
                ;;
            text/cloud-config) say "skipping cloud-config part $i" ;;
            *) say "skipping $ctype part $i" ;;
        esac
    done
}

SEED_DEV=
tries=0
while ! find_seed; do
    tries=$((tries + 1))
    [ "$tries" -ge 32 ] && break
    sleep 0.25
done

HN=virtfleet-demo
if [ -n "$SEED_DEV" ]; then
    IID=$(md instance-id)
    NAME=$(md local-hostname)
    [ -n "$NAME" ] || NAME=$(md hostname)
    [ -n "$NAME" ] && HN=$NAME
    say "seed=$SEED_DEV"
    say "instance-id=$IID"
    say "hostname=$HN"
    hostname "$HN"
    echo "$HN" >/etc/hostname
    if [ -s /mnt/seed/user-data ]; then
        first=$(head -n 1 /mnt/seed/user-data | tr -d '\r')
        case "$(printf '%s' "$first" | tr 'A-Z' 'a-z')" in
            '#!'*)
                cp /mnt/seed/user-data /tmp/user-data
                run_script /tmp/user-data
                say "user-data exit=$?"
                ;;
            mime-version:*|content-type:*multipart/*)
                run_multipart /mnt/seed/user-data
                ;;
            *)
                say "user-data skipped ($(printf '%s' "$first" | cut -c 1-60))"
                ;;
        esac
    else
        say "no user-data"
    fi
else
    say "no cidata seed"
    hostname "$HN"
    echo "$HN" >/etc/hostname
fi

say ready

ip link set lo up 2>/dev/null
if [ -d /sys/class/net/eth0 ]; then
    ip link set eth0 up 2>/dev/null
    # Background, retries forever with pauses: never delays or blocks PID 1.
    udhcpc -i eth0 -f -t 5 -T 2 -A 10 -x "hostname:$HN" -s /etc/virtfleet/udhcpc.script \
        >/dev/null 2>&1 </dev/null &
fi

# PID 1 must never exit: keep a root shell on the serial console (respawned), else sleep.
while :; do
    setsid cttyhack sh -l
    sleep 5
done
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script: configure $interface, report the address on the serial console.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface" 2>/dev/null
        ip link set "$interface" up 2>/dev/null
        ;;
    bound|renew)
        if [ "$1" = bound ]; then
            ip -4 addr flush dev "$interface" 2>/dev/null
        fi
        ip -4 addr replace "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            ip -4 route del default 2>/dev/null
            for r in $router; do
                ip -4 route add default via "$r" dev "$interface" && break
            done
        fi
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        if [ "$1" = bound ]; then
            # Leading newline: the console shell's prompt may be sitting on the current line.
            printf '\nvirtfleet-demo: %s address=%s\n' "$interface" "$ip" >/dev/console
        fi
        ;;
esac
exit 0
"""

MIME_AWK = r"""# Split a MIME multipart (the seed's user-data) into its top-level parts.
# For part N (001, 002, ...) it writes DIR/N.type (content type, lower case, text/plain if
# none), DIR/N.cte (transfer encoding, lower case, 7bit if none) and DIR/N.body (the body as
# it is, without the line break that belongs to the next boundary). Prints the part count;
# exits 2 if the top header has no boundary, 3 if no closing boundary was found.
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function param(h, name,    l, i, rest) {
    l = tolower(h)
    i = index(l, name "=")
    if (i == 0) return ""
    rest = substr(h, i + length(name) + 1)
    if (substr(rest, 1, 1) == "\"") {
        rest = substr(rest, 2)
        i = index(rest, "\"")
        return i ? substr(rest, 1, i - 1) : rest
    }
    i = match(rest, /[; \t]/)
    return i ? substr(rest, 1, i - 1) : rest
}
function header(h,    i, name, value) {
    i = index(h, ":")
    if (i == 0) return
    name = tolower(trim(substr(h, 1, i - 1)))
    value = trim(substr(h, i + 1))
    if (name == "content-type") {
        if (state == "top") { boundary = param(value, "boundary"); return }
        sub(/;.*/, "", value)
        ctype = tolower(trim(value))
    } else if (name == "content-transfer-encoding" && state == "head") {
        cte = tolower(value)
    }
}
BEGIN { state = "top"; n = 0; cur = "" }
{
    line = $0
    sub(/\r$/, "", line)
}
state == "top" || state == "head" {
    if (line ~ /^[ \t]/ && cur != "") { cur = cur " " trim(line); next }
    if (cur != "") header(cur)
    cur = ""
    if (line != "") { cur = line; next }
    if (state == "top") {
        if (boundary == "") { bad = 2; exit }
        state = "preamble"
    } else {
        print ctype > (prefix ".type"); close(prefix ".type")
        print cte > (prefix ".cte"); close(prefix ".cte")
        printf "" > (prefix ".body")
        state = "body"; pending = 0
    }
    next
}
state == "preamble" || state == "body" {
    sub(/[ \t]+$/, "", line)
    if (line == "--" boundary || line == "--" boundary "--") {
        if (state == "body") {
            if (pending) printf "%s", held > (prefix ".body")
            close(prefix ".body")
        }
        if (line == "--" boundary "--") { state = "end"; exit 0 }
        n++
        prefix = sprintf("%s/%03d", dir, n)
        ctype = "text/plain"; cte = "7bit"; state = "head"
        next
    }
    if (state == "body") {
        if (pending) print held > (prefix ".body")
        held = $0; pending = 1
    }
}
END {
    if (bad) exit bad
    if (state != "end") exit 3
    print n
}
"""

POWER_BUTTON_SCRIPT = r"""#!/bin/sh
printf '\nvirtfleet-demo: power button, powering off\n' >/dev/console
sync
poweroff -f
"""

PROFILE = r"""PS1='\h \w # '
export PS1
"""

_BUILDER_REVISION = "2"

IMAGE_TAG = hashlib.sha256(
    "\0".join(
        (
            _BUILDER_REVISION,
            SYSLINUX_CFG,
            INIT_SCRIPT,
            UDHCPC_SCRIPT,
            MIME_AWK,
            POWER_BUTTON_SCRIPT,
            PROFILE,
            " ".join(GUEST_MODULES),
            str(DISK_SIZE),
        )
    ).encode()
).hexdigest()[:12]
"""Short hash of everything that defines the image's content (kernel version aside)."""


class DemoImageError(RuntimeError):
    """Building the demo image failed (a tool is missing or a step failed)."""


@dataclass(frozen=True)
class KernelTree:
    """An extracted Debian kernel package."""

    version: str
    vmlinuz: Path
    modules_dir: Path


def default_cache_dir() -> Path:
    """``$VIRTFLEET_CACHE_DIR``, else ``~/.cache/virtfleet``."""
    env = os.environ.get("VIRTFLEET_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "virtfleet"


def default_image_path(cache_dir: Path | None = None) -> Path:
    """Where the image for this builder's content lives in the cache (name carries IMAGE_TAG)."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    return cache / f"virtfleet-demo-{IMAGE_TAG}.qcow2"


def _run(
    args: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = _SHORT_TIMEOUT,
    input_text: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [os.fspath(a) for a in args]
    # mkfs.vfat and sfdisk live in /usr/sbin, which a non-root PATH may lack.
    search = os.pathsep.join((os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"))
    exe = shutil.which(argv[0], path=search)
    if exe is None:
        raise DemoImageError(f"required tool not found: {argv[0]}")
    argv[0] = exe
    try:
        proc = subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoImageError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        raise DemoImageError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}"
        )
    return proc


# --------------------------------------------------------------------------- kernel


def _kernel_package_name() -> str:
    """The versioned package the cloud kernel meta-package depends on."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and m.group(1) != KERNEL_META_PACKAGE:
            return m.group(1)
    raise DemoImageError(f"no linux-image dependency in `apt-cache depends {KERNEL_META_PACKAGE}`")


def _find_kernel(root: Path) -> KernelTree | None:
    for vmlinuz in sorted((root / "boot").glob("vmlinuz-*")):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
            if (base / version).is_dir():
                return KernelTree(version, vmlinuz, base / version)
    return None


def ensure_kernel(cache_dir: Path) -> KernelTree:
    """Return the cloud kernel extracted in ``cache_dir/kernel``, downloading it if needed."""
    kernels = cache_dir / "kernel"
    if kernels.is_dir():
        for root in sorted(kernels.iterdir(), reverse=True):
            if root.name.startswith("."):
                continue
            tree = _find_kernel(root)
            if tree is not None:
                return tree
    kernels.mkdir(parents=True, exist_ok=True)
    package = _kernel_package_name()
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=kernels))
    try:
        _run(["apt-get", "download", package], cwd=work, timeout=_DOWNLOAD_TIMEOUT)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise DemoImageError(f"apt-get download {package} produced no .deb")
        root = work / "root"
        _run(["dpkg-deb", "-x", debs[0], root], timeout=300)
        if _find_kernel(root) is None:
            raise DemoImageError(f"{debs[0].name} holds no vmlinuz with its modules")
        target = kernels / package
        try:
            root.rename(target)
        except OSError:
            if not target.is_dir():  # otherwise a concurrent builder won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tree = _find_kernel(target)
    if tree is None:
        raise DemoImageError(f"no kernel found in {target}")
    return tree


# --------------------------------------------------------------------------- modules

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def _module_name(filename: str) -> str | None:
    for suffix in _KO_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed (busybox insmod wants a plain ELF object)."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return subprocess.run(
            ["zstd", "-d", "-c", "--", os.fspath(path)],
            capture_output=True,
            check=True,
            timeout=_SHORT_TIMEOUT,
        ).stdout
    return path.read_bytes()


def _modinfo_depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """Module files for ``wanted`` plus their dependencies, dependencies first.

    Dependencies come from ``modules.dep`` when the tree has one (Debian's package ships none:
    depmod runs at install time), else from each module's ``depends=`` modinfo field.
    Built-in modules are skipped.
    """
    files: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko*"):
        name = _module_name(path.name)
        if name is not None:
            files[name] = path
    builtin: set[str] = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.is_file():
        for line in builtin_file.read_text().splitlines():
            name = _module_name(line.rsplit("/", 1)[-1].strip())
            if name:
                builtin.add(name)
    dep_map: dict[str, list[str]] | None = None
    dep_file = modules_dir / "modules.dep"
    if dep_file.is_file():
        dep_map = {}
        for line in dep_file.read_text().splitlines():
            head, _, tail = line.partition(":")
            name = _module_name(head.rsplit("/", 1)[-1])
            if name:
                deps = [_module_name(d.rsplit("/", 1)[-1]) for d in tail.split()]
                dep_map[name] = [d for d in deps if d]

    ordered: list[Path] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in stack:
            raise DemoImageError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        path = files.get(name)
        if path is None:
            raise DemoImageError(f"kernel module {name} not found under {modules_dir}")
        if dep_map is not None and name in dep_map:
            deps = dep_map[name]
        else:
            deps = _modinfo_depends(_read_module(path))
        for dep in deps:
            visit(dep, (*stack, name))
        done.add(name)
        ordered.append(path)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return ordered


# --------------------------------------------------------------------------- initramfs


class CpioWriter:
    """Minimal writer of a ``newc`` cpio archive (all entries owned by root, fixed mtime)."""

    _S_IFDIR = 0o040000
    _S_IFREG = 0o100000
    _S_IFLNK = 0o120000
    _S_IFCHR = 0o020000

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self._out = out
        self._pos = 0
        self._ino = 0
        self._mtime = mtime
        self._dirs: set[str] = {""}

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._pos += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self._pos % 4))

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == self._S_IFDIR else 1
        fields = (
            self._ino, mode, 0, 0, nlink, self._mtime, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._write(b"070701" + "".join(f"{f:08X}" for f in fields).encode() + encoded)
        self._pad()
        if data:
            self._write(data)
            self._pad()

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def directory(self, name: str, perm: int = 0o755) -> None:
        name = name.strip("/")
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, self._S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, self._S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, self._S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        name = name.strip("/")
        self._parents(name)
        self._entry(name, self._S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)
        self._write(b"\0" * (-self._pos % 512))


def build_initramfs(kernel: KernelTree, dest: Path) -> list[str]:
    """Write the gzip'd initramfs to ``dest``; return the module paths it loads, in order."""
    if not BUSYBOX.is_file():
        raise DemoImageError(f"{BUSYBOX} missing: apt-get install busybox-static")
    modules = resolve_modules(kernel.modules_dir, GUEST_MODULES)
    guest_paths: list[str] = []
    with dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        cpio = CpioWriter(gz)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
                  "root", "mnt/seed", "var/log", "etc/virtfleet"):  # fmt: skip
            cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("etc/virtfleet/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
        cpio.file("etc/virtfleet/mime.awk", MIME_AWK.encode())
        cpio.file("etc/acpi/PWRF/00000080", POWER_BUTTON_SCRIPT.encode(), 0o755)
        cpio.file("etc/profile", PROFILE.encode())
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("etc/hostname", b"virtfleet-demo\n")
        for path in modules:
            rel = path.relative_to(kernel.modules_dir).as_posix()
            rel = rel[: rel.index(".ko")] + ".ko"
            guest = f"lib/modules/{kernel.version}/{rel}"
            cpio.file(guest, _read_module(path))
            guest_paths.append("/" + guest)
        cpio.file("etc/virtfleet/modules", ("\n".join(guest_paths) + "\n").encode())
        cpio.finish()
    return guest_paths


# --------------------------------------------------------------------------- disk


def _mtools_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MTOOLS_SKIP_CHECK"] = "1"
    env["MTOOLS_NO_VFAT"] = "0"
    return env


def build_raw_disk(kernel: KernelTree, initrd: Path, work: Path) -> Path:
    """Assemble the bootable raw disk in ``work`` (no mount, no loop device); return its path."""
    if not SYSLINUX_MBR.is_file():
        raise DemoImageError(f"{SYSLINUX_MBR} missing: apt-get install syslinux-common")
    part_size = DISK_SIZE - PARTITION_START
    needed = kernel.vmlinuz.stat().st_size + initrd.stat().st_size + 1024 * 1024
    if needed > part_size * 0.95:
        raise DemoImageError(f"kernel + initramfs ({needed} bytes) do not fit in {part_size}")

    fat = work / "boot.fat"
    with fat.open("wb") as f:
        f.truncate(part_size)
    _run(["mkfs.vfat", "-F", "16", "-n", "VFDEMOBOOT", "-i", "7f7f0001",
          "-h", str(PARTITION_START // SECTOR), fat])  # fmt: skip
    env = _mtools_env()
    _run(["syslinux", "--install", fat], env=env)
    cfg = work / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG)
    for src, name in ((kernel.vmlinuz, "vmlinuz"), (initrd, "initrd.gz"), (cfg, "syslinux.cfg")):
        _run(["mcopy", "-o", "-i", fat, src, f"::{name}"], env=env)

    disk = work / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(DISK_SIZE)
    table = (
        "label: dos\n"
        "label-id: 0x7f7f0001\n"
        "unit: sectors\n\n"
        f"start={PARTITION_START // SECTOR}, size={part_size // SECTOR}, type=e, bootable\n"
    )
    _run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "never", disk], input_text=table)
    mbr = SYSLINUX_MBR.read_bytes()
    if len(mbr) > 440:
        raise DemoImageError(f"{SYSLINUX_MBR} is larger than 440 bytes")
    with disk.open("r+b") as out:
        out.seek(0)
        out.write(mbr)
        out.seek(PARTITION_START)
        with fat.open("rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
    fat.unlink()
    return disk


def build_demo_image(dest: Path, cache_dir: Path | None = None) -> Path:
    """Build the demo guest's qcow2 image at ``dest`` (returned as is if it already exists).

    The kernel comes from ``cache_dir`` (default :func:`default_cache_dir`), downloaded there
    with apt on first use.  The image is built in a temporary file next to ``dest`` and renamed.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel(cache)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        initrd = work / "initrd.gz"
        build_initramfs(kernel, initrd)
        disk = build_raw_disk(kernel, initrd, work)
        staged = work / "image.qcow2"
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, staged], timeout=300)
        os.replace(staged, dest)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.image", description="Build virtfleet's tiny demo guest image."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="qcow2 to write (default: the cache's virtfleet-demo-<tag>.qcow2)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache dir (default: $VIRTFLEET_CACHE_DIR or ~/.cache/virtfleet)",
    )
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_image_path(args.cache)
    try:
        path = build_demo_image(out, args.cache)
    except DemoImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
