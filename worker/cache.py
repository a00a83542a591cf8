"""The host's cache of base images: fetched from the control plane, sha256-checked, qcow2.

Owns `<storage_dir>/bases/<sha256>.qcow2` (with its `.size` memo, its `.lock` file, and the
overlay templates worker.images keeps beside it, which go with it). The control
plane converts raw images to qcow2 at import; a raw image is still converted here, once, on the
way in (images registered before that). Concurrent builds of the same image wait on one file
lock instead of fetching twice. Using a base touches its mtime, and :func:`collect_garbage`
removes the least recently used bases no instance disk is backed by while the cache is above
its limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import download
from worker import images

log = logging.getLogger(__name__)

GC_GRACE_SECONDS = 600.0
"""A base used (or fetched) this recently is never collected: a build between ensure_base and
its overlay's creation is not yet visible as an overlay."""

STALE_TMP_SECONDS = 6 * 3600.0
"""Leftover partial downloads (hidden files in bases/) older than this are removed."""


class CacheError(Exception):
    """The base image could not be brought into the cache."""


def bases_dir(storage_dir: Path) -> Path:
    return storage_dir / "bases"


def base_path(storage_dir: Path, sha256: str) -> Path:
    return bases_dir(storage_dir) / f"{sha256}.qcow2"


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(ch in "0123456789abcdef" for ch in name)


def _bases(storage_dir: Path) -> list[Path]:
    """The complete bases (`<sha256>.qcow2`; not a partial download or conversion, whose
    hidden names pathlib's glob would match too)."""
    d = bases_dir(storage_dir)
    if not d.is_dir():
        return []
    return [p for p in d.glob("*.qcow2") if _is_sha256(p.name.removesuffix(".qcow2"))]


def cached(storage_dir: Path) -> list[str]:
    """The sha256 of every base in the cache (for heartbeats)."""
    return sorted(p.name.removesuffix(".qcow2") for p in _bases(storage_dir))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_virtual_size(base: Path) -> int:
    """The base's virtual size, read once and remembered beside it (bases never change)."""
    memo = base.with_suffix(".size")
    try:
        return int(memo.read_text())
    except (OSError, ValueError):
        size = images.virtual_size(base, "qcow2")
        # Unique per thread too: a worker's builds are threads of one process, and several
        # starting on a new base at once each write the memo.
        tmp = memo.with_suffix(f".size.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(str(size))
        os.replace(tmp, memo)
        return size


def ensure_base(storage_dir: Path, image: dict[str, Any], token: str) -> Path:
    """Return the cached qcow2 base for `image`, fetching and checking it if missing."""
    sha = str(image["sha256"])
    if not _is_sha256(sha):
        raise CacheError("the image reference has no valid sha256")
    final = base_path(storage_dir, sha)
    with _lock(final):  # held while touching too: the clean-up removes a base under it
        if final.exists():
            os.utime(final)  # least recently used is what a cache clean-up removes first
            return final
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{sha[:12]}-")
        tmp = Path(tmp_name)
        converted = tmp.with_suffix(".qcow2")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                for chunk in download.stream(image["url"], headers=headers, public_only=False):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha:
                raise CacheError("the downloaded image does not match its sha256")
            if image.get("disk_format", "qcow2") == "qcow2":
                os.replace(tmp, final)
            else:
                images.convert(tmp, str(image["disk_format"]), converted, "qcow2")
                os.replace(converted, final)
            os.chmod(final, 0o644)
            return final
        except Exception as exc:
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"the base image could not be fetched: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
            converted.unlink(missing_ok=True)


def instances_dir(storage_dir: Path) -> Path:
    return storage_dir / "instances"


def bases_in_use(storage_dir: Path) -> set[str]:
    """The sha256 of every base an instance disk under `instances/` is backed by.

    Every qcow2 file of every instance is read (disks, and overlays still being created, whose
    hidden temporary names end in `.tmp`), with ``qemu-img info -f qcow2``. Raises when one
    cannot be read: not knowing is not "unused".
    """
    used: set[str] = set()
    root = instances_dir(storage_dir)
    if not root.is_dir():
        return used
    for inst in root.iterdir():
        try:
            disks = list(inst.iterdir()) if inst.is_dir() else []
        except FileNotFoundError:  # the VM was deleted meanwhile
            continue
        for disk in disks:
            if not (disk.name.endswith(".qcow2") or disk.name.endswith(".qcow2.tmp")):
                continue
            try:
                backing = images.backing_file(disk)
            except FileNotFoundError:
                continue
            except Exception:
                if not disk.exists():  # removed (VM deleted, overlay renamed) meanwhile
                    continue
                raise
            if backing:
                name = Path(backing).name
                if name.endswith(".qcow2"):
                    used.add(name.removesuffix(".qcow2"))
    return used


@dataclass
class GCReport:
    removed: list[str] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0


def cache_size(storage_dir: Path) -> int:
    return sum(p.stat().st_size for p in _bases(storage_dir))


def collect_garbage(storage_dir: Path, max_bytes: int, *, now: float | None = None,
                    grace: float = GC_GRACE_SECONDS) -> GCReport:
    """Remove least recently used bases that no instance disk uses, oldest first, only while
    the cache holds more than `max_bytes`. A base in use, used in the last `grace` seconds,
    or being fetched (its lock held) is kept. Removes the base's `.size` memo with it."""
    now = time.time() if now is None else now
    d = bases_dir(storage_dir)
    report = GCReport()
    if not d.is_dir():
        return report
    _remove_stale_partials(d, now)
    bases = []
    for p in _bases(storage_dir):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        bases.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in bases)
    report.size_before = report.size_after = total
    if total <= max_bytes:
        return report
    in_use = bases_in_use(storage_dir)
    for mtime, size, path in sorted(bases, key=lambda b: b[0]):
        if total <= max_bytes:
            break
        sha = path.name.removesuffix(".qcow2")
        if sha in in_use:
            report.kept_in_use.append(sha)
            continue
        if now - mtime < grace:
            continue
        if _remove_base(path, now - grace):
            total -= size
            report.removed.append(sha)
    report.size_after = total
    if report.removed:
        log.info("cache clean-up removed %d bases (%d -> %d bytes)", len(report.removed),
                 report.size_before, report.size_after)
    return report


def _remove_base(path: Path, used_before: float) -> bool:
    """Remove a base, its memo and its overlay templates under its lock, unless it is being
    fetched or used (then ensure_base holds the lock) or was used since `used_before`
    (looked at again here)."""
    with open(path.with_suffix(".lock"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            try:
                if path.stat().st_mtime >= used_before:
                    return False
            except FileNotFoundError:
                return False
            path.unlink(missing_ok=True)
            path.with_suffix(".size").unlink(missing_ok=True)
            for template in images.overlay_templates(path):
                template.unlink(missing_ok=True)
            return True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_partials(d: Path, now: float) -> None:
    for p in d.glob(".*"):
        try:
            if p.is_file() and now - p.stat().st_mtime > STALE_TMP_SECONDS:
                p.unlink()
        except FileNotFoundError:
            continue
