"""Disk images through qemu-img: the only module that runs ``qemu-img``.

Owns: overlay creation (qcow2 backed by a cached base; later overlays of a size copies of
the first, kept beside the base as a template), image inspection (``info`` runs
under a time and a memory limit; :func:`check_untrusted` judges an uploaded image),
conversion (whole files, or a raw file's segment into its place in a qcow2:
:func:`convert_segment`) and growth. Every call names the image format (``-f``, and ``-F``
for a backing file; ``driver=`` in image options), so qemu-img never probes a format from
untrusted content; paths are made absolute so a name can never be read as an option or a
protocol prefix.

Must not: download images, decide where images live (a template lives beside its base),
shrink a disk, or call anything but :func:`fleet.proc.run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

from fleet.proc import run

QEMU_IMG = "qemu-img"
"""The qemu-img program (looked up on PATH)."""

INFO_TIMEOUT = 30.0
"""Seconds allowed for ``qemu-img info``."""

CREATE_TIMEOUT = 60.0
"""Seconds allowed for ``qemu-img create`` of an overlay."""

RESIZE_TIMEOUT = 120.0
"""Seconds allowed for ``qemu-img resize``."""

CONVERT_TIMEOUT = 3600.0
"""Seconds allowed for ``qemu-img convert`` (whole-image copies can be large)."""

INFO_MEMORY_LIMIT = 1024**3
"""Address space (bytes) allowed to ``qemu-img info``: a crafted image header (huge L1 or
refcount tables) must fail the call, not take the machine's memory."""

CONVERT_MEMORY_LIMIT = 2 * 1024**3
"""Address space (bytes) allowed to ``qemu-img convert`` of an untrusted image (its I/O
threads need a few hundred MiB of address space; 512 MiB is too little)."""

FORMATS = frozenset({"qcow2", "raw", "vmdk", "vdi", "vpc", "vhdx", "qed"})
"""Image formats this module accepts by name."""

SECTOR = 512
"""qemu-img sizes must be multiples of this; requested sizes are rounded up to it."""


def _fmt(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}")
    return fmt


def _abs(path: Path | str) -> str:
    return str(Path(path).absolute())


def _round_up(size_bytes: int) -> int:
    if size_bytes <= 0:
        raise ValueError("image size must be positive")
    return -(-size_bytes // SECTOR) * SECTOR


def info(path: Path, fmt: str) -> dict[str, Any]:
    """Return ``qemu-img info --output=json`` for ``path`` read as ``fmt``.

    Uses ``--force-share`` so an image in use by a running guest can still be read.
    """
    proc = run(
        [QEMU_IMG, "info", "--output=json", "--force-share", "-f", _fmt(fmt), _abs(path)],
        timeout=INFO_TIMEOUT, memory_limit=INFO_MEMORY_LIMIT,
    )
    return json.loads(proc.stdout)


def backing_file(path: Path) -> str | None:
    """The backing file a qcow2 image names (as written in it), or None."""
    data = info(path, "qcow2")
    name = data.get("full-backing-filename") or data.get("backing-filename")
    return str(name) if name else None


class UnsafeImage(ValueError):
    """``qemu-img info`` shows an image virtfleet refuses; the message is safe to show."""


def check_untrusted(path: Path, fmt: str, max_virtual_bytes: int) -> dict[str, Any]:
    """``qemu-img info`` of an uploaded image read as ``fmt`` (pinned from its header),
    under the time and memory limits; raises :class:`UnsafeImage` when it names another
    file (backing file, external data file), is encrypted or marked corrupt, is not the
    pinned format, or is larger than ``max_virtual_bytes``. Returns the info.

    The caller must have refused, from the header alone, anything that makes qemu open
    another file while merely reading the image (an external data file): ``info`` opens
    no backing file (qemu-img info never does without ``--backing-chain``).
    """
    data = info(path, fmt)
    if data.get("format") != fmt:
        raise UnsafeImage(f"the image does not read as {fmt}")
    if data.get("backing-filename") or data.get("full-backing-filename"):
        raise UnsafeImage("images with a backing file are refused")
    specific = (data.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file") or specific.get("data-file-raw"):
        raise UnsafeImage("images with an external data file are refused")
    if data.get("encrypted") or specific.get("encrypt"):
        raise UnsafeImage("encrypted images are refused")
    if specific.get("corrupt"):
        raise UnsafeImage("the image is marked corrupt")
    size = int(data.get("virtual-size") or 0)
    if size <= 0:
        raise UnsafeImage("the image has no virtual size")
    if size > max_virtual_bytes:
        raise UnsafeImage(f"the image's virtual size ({size} bytes) is above the limit of "
                          f"{max_virtual_bytes} bytes")
    return data


def virtual_size(path: Path, fmt: str) -> int:
    """Return the guest-visible size of ``path`` in bytes."""
    return int(info(path, fmt)["virtual-size"])


def create_overlay(
    base: Path, overlay: Path, size_bytes: int | None, *, base_fmt: str = "qcow2",
    base_size: int | None = None,
) -> None:
    """Create a qcow2 ``overlay`` backed by ``base``, at least as large as the base.

    A requested size smaller than the base's virtual size is raised to it (never
    shrink). Refuses to overwrite an existing overlay (``FileExistsError``): a retried
    build must not wipe a guest's disk. The overlay appears atomically (written under
    a temporary name in the same directory, then renamed), and durably (synced).

    ``base_size``, when the caller already knows the base's virtual size (a cached base's
    memo), saves a ``qemu-img info``, and lets the overlay be a copy of a template: the
    first overlay of that size on that base, made by ``qemu-img create -u`` (which leaves
    the base unopened: it would only open it to learn its size) and kept beside the base
    (:func:`overlay_template`). qemu-img writes the very same bytes for every overlay of a
    given base, format and size (nothing in a qcow2 header is random or dated), so a copy
    is what it would have written — for a file copy and one fsync instead of a qemu-img run
    (a process start and five syncs, 10 to 20 ms on the test machine).
    """
    overlay = Path(overlay)
    if overlay.exists():
        raise FileExistsError(f"overlay already exists: {overlay.name}")
    tmp = overlay.with_name(f".{overlay.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if size_bytes is not None and base_size is not None:
            size = _round_up(max(size_bytes, base_size))
            try:
                _copy_new(_template(base, base_fmt, size), tmp)
            except FileNotFoundError:  # a cache clean-up removed the template meanwhile
                _copy_new(_template(base, base_fmt, size), tmp)
        else:
            argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", _abs(base), "-F",
                    _fmt(base_fmt), _abs(tmp)]
            if size_bytes is not None:
                argv.append(str(_round_up(max(size_bytes, virtual_size(base, base_fmt)))))
            run(argv, timeout=CREATE_TIMEOUT)
        os.replace(tmp, overlay)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


TEMPLATE_HEAD = 64 * 1024
"""How much of a template is read to check it (its header cluster: the backing file's name
is in it)."""


def overlay_template(base: Path, base_fmt: str, size: int) -> Path:
    """Where the template of overlays of ``size`` bytes on ``base`` is kept: beside the base,
    ``<base name without suffix>.overlay-<format>-<size>``."""
    return Path(base).absolute().with_suffix(f".overlay-{_fmt(base_fmt)}-{size}")


def overlay_templates(base: Path) -> list[Path]:
    """Every overlay template kept for ``base`` (they go when the base goes)."""
    b = Path(base).absolute()
    return sorted(b.parent.glob(f"{b.stem}.overlay-*"))


def _template(base: Path, base_fmt: str, size: int) -> Path:
    """The template for overlays of ``size`` bytes on ``base``, made if it is missing or not
    right (a template names its base by absolute path: a moved cache makes it wrong)."""
    path = overlay_template(base, base_fmt, size)
    if _names_base(path, base, size):
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", _abs(base), "-F", _fmt(base_fmt),
             "-u", _abs(tmp), str(size)], timeout=CREATE_TIMEOUT)
        os.replace(tmp, path)  # made twice at once: the same bytes, either wins
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _names_base(template: Path, base: Path, size: int) -> bool:
    """Whether ``template`` is a qcow2 image of ``size`` bytes backed by ``base``."""
    try:
        with template.open("rb") as fh:
            head = fh.read(TEMPLATE_HEAD)
    except FileNotFoundError:
        return False
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return False
    offset, length = struct.unpack(">QI", head[8:20])
    virtual = struct.unpack(">Q", head[24:32])[0]
    return (virtual == size and 0 < offset and offset + length <= len(head)
            and head[offset:offset + length] == _abs(base).encode())


def _copy_new(src: Path, dest: Path) -> None:
    """Copy ``src`` into a new file ``dest`` and sync it (``src`` is a template: a few
    hundred KiB)."""
    with src.open("rb") as fin, dest.open("xb") as out:
        shutil.copyfileobj(fin, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())


def convert(src: Path, src_fmt: str, dst: Path, dst_fmt: str = "qcow2", *,
            compress: bool = False) -> None:
    """Copy ``src`` (read as ``src_fmt``) into a new image ``dst`` of ``dst_fmt``
    (``compress``: qcow2's zlib-compressed clusters, ``-c``)."""
    extra = ["-c"] if compress else []
    run(
        [QEMU_IMG, "convert", *extra, "-f", _fmt(src_fmt), "-O", _fmt(dst_fmt), _abs(src),
         _abs(dst)],
        timeout=CONVERT_TIMEOUT,
    )


def convert_untrusted(src: Path, src_fmt: str, dst: Path, *,
                      timeout: float = CONVERT_TIMEOUT, flush: bool = True) -> None:
    """Like :func:`convert` to qcow2, for an uploaded image: under a memory limit, and the
    output never backed by anything (``-B`` is never passed, and an image with a backing
    file must have been refused before). With ``flush=False`` qemu-img does not sync the
    output (``-t unsafe``): the caller must fsync it before relying on it."""
    cache = [] if flush else ["-t", "unsafe"]
    run(
        [QEMU_IMG, "convert", *cache, "-f", _fmt(src_fmt), "-O", "qcow2", _abs(src),
         _abs(dst)],
        timeout=timeout, memory_limit=CONVERT_MEMORY_LIMIT,
    )


def create_empty_qcow2(path: Path, size_bytes: int) -> int:
    """A new, empty qcow2 image of ``size_bytes`` (rounded up to 512) at ``path`` (an
    existing file is refused: ``FileExistsError``); returns the virtual size it got."""
    size = _round_up(size_bytes)
    if Path(path).exists():
        raise FileExistsError(f"image already exists: {Path(path).name}")
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", _abs(path), str(size)],
        timeout=CREATE_TIMEOUT)
    return size


def _opt(value: str) -> str:
    """A value for qemu's ``key=value,...`` option syntax (a comma is written twice)."""
    return value.replace(",", ",,")


def convert_segment(src: Path, dst: Path, offset: int, length: int, *,
                    timeout: float = CONVERT_TIMEOUT) -> None:
    """Copy bytes ``[offset, offset + length)`` of the raw file ``src`` into the same place
    of the qcow2 image ``dst`` (which reads as zeros there, and is as large), under the
    memory limit, not synced (``-t unsafe``: the caller fsyncs ``dst`` once at the end).

    ``qemu-img convert -n --target-is-zero`` between two ``raw`` windows (``offset``,
    ``size``): one on ``src`` read as raw, one on ``dst`` read as qcow2 — both formats
    named in the options, nothing probed; qemu-img's own zero detection leaves zeros
    unallocated, as a whole-file convert does. A raw upload is converted so, a segment at
    a time, while the rest is still arriving (scheduler/streamconvert.py).
    """
    if offset < 0 or length <= 0 or offset % SECTOR:
        raise ValueError("a segment starts on a sector and is not empty")
    window = f"driver=raw,offset={offset},size={length}"
    run([QEMU_IMG, "convert", "-n", "--target-is-zero", "-t", "unsafe",
         "--image-opts", f"{window},file.driver=file,file.filename={_opt(_abs(src))}",
         "--target-image-opts", f"{window},file.driver=qcow2,file.file.driver=file,"
                                f"file.file.filename={_opt(_abs(dst))}"],
        timeout=timeout, memory_limit=CONVERT_MEMORY_LIMIT)


def resize(path: Path, fmt: str, size_bytes: int) -> None:
    """Grow ``path`` to ``size_bytes`` (rounded up to 512). Raises ``ValueError`` on shrink."""
    size = _round_up(size_bytes)
    current = virtual_size(path, fmt)
    if size < current:
        raise ValueError(f"refusing to shrink disk from {current} to {size} bytes")
    if size == current:
        return
    run([QEMU_IMG, "resize", "-f", _fmt(fmt), _abs(path), str(size)], timeout=RESIZE_TIMEOUT)
